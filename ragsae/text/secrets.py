"""Presidio recognizers ragsae adds or adjusts: secrets, and offline variants of three PII recognizers.

Secrets (Presidio has none):

- `KnownTokenRecognizer` (API_KEY): credentials whose format names their issuer: AWS access key ids,
  GitHub, GitLab, Slack, Stripe, Google, OpenAI/Anthropic, Hugging Face, npm, PyPI and SendGrid tokens,
  Slack webhooks. Matched case-sensitively, as issued.
- `JwtRecognizer` (API_KEY): JSON Web Tokens whose header decodes to a JSON object.
- `PrivateKeyRecognizer` (PRIVATE_KEY): `-----BEGIN ... PRIVATE KEY-----` blocks, to their END line or,
  when cut off, to the end of their base64 body.
- `AssignmentRecognizer` (API_KEY, PASSWORD): the value of `api_key=...`, `password: "..."`,
  `AWS_SECRET_ACCESS_KEY=...`, `Authorization: Bearer ...`, and the password of `scheme://user:pass@host`.
  Only the value is replaced; the name stays, so the text still says what was there.
- `HighEntropyRecognizer` (SECRET): tokens of 20 or more base64/base64url characters that mix upper
  case, lower case and digits, carry at least `ENTROPY_BITS` bits of Shannon entropy per character (the
  idea of truffleHog's and detect-secrets' entropy scans) and do not read as words run together
  (`looks_random`).

Adjusted Presidio recognizers (same patterns and checksums):

- `OfflineEmailRecognizer`: Presidio validates an address's domain with `tldextract`, which downloads
  the Public Suffix List on first use; this one reads the snapshot the package ships and never goes on
  the network.
- `VersionAwareIpRecognizer`: a dotted quad after 'v', 'version', 'release', 'build', 'section', '§',
  'chapter', 'clause', 'article', 'rule', 'figure' or 'table' is a version or a numbering, not an address.
- `OverlappingCardRecognizer`: Presidio's card pattern, searched at every start: its matches do not
  overlap, so a run of digits that fails the Luhn check ('6891 4672-1106-8403') used to hide the card
  that starts inside it.
- `BoundedIbanRecognizer`: Presidio's IBAN pattern takes up to 7 groups of 4 characters, so an IBAN
  whose length is a multiple of 4 (ES, SE, CZ, ...) followed by a 4-character group ('ES91 ... 1332
  1714') fails its checksum and is dropped; this one also tries the first `IBAN_LENGTHS[country]`
  characters of such a match.
- `StrictPhoneRecognizer`: `phonenumbers` at its strict-grouping leniency, 7 to 15 digits, not a URL
  path segment: drops digit runs of nutrition tables, 4-digit numbers, 16-digit card-shaped numbers
  and ISBNs in URLs, which the default takes for phones.

Imported only when a `Sanitizer` is built with a mode other than 'off' (needs `pip install
'ragsae[privacy]'`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import Counter
from typing import Any

import regex
from presidio_analyzer import EntityRecognizer, LocalRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
)

CASE_SENSITIVE = re.DOTALL | re.MULTILINE
"""Regex flags of the secret recognizers: Presidio's default adds IGNORECASE, which would let `akia...`
pass for an AWS key id."""

ENTROPY_MIN_LENGTH = 20
"""Shortest token the entropy scan considers."""
ENTROPY_BITS = 3.5
"""Shannon entropy (bits per character) from which a mixed-class token counts as random: a random
20-character base62 token scores 3.65 or more in 99% of draws, 32 characters 4.2."""
MAX_SEGMENT_LENGTH = 3.0
"""Longest mean length of a token's segments (runs of one word shape: `XML`, `Http`, `2`, `-`) for it to
count as random: identifiers such as `XMLHttpRequestUpload2` or `COVID19VaccineTracker2021` average 3.1
to 5.3 characters a segment, random base62 tokens of 32 characters 2.9 or less in 99% of draws (of 20
characters, 3.3). benchmarks/sanitize.py measures the recall this costs."""

_TOKEN_END = r"(?![A-Za-z0-9_\-])"
KNOWN_TOKENS: tuple[tuple[str, str], ...] = (
    ("AWS access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}\b"),
    ("GitHub token", r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),
    ("GitHub fine-grained token", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    ("GitLab token", r"\bgl(?:pat|ptt|dt|rt|cbt|oas|ft|imt|agent)-[A-Za-z0-9_\-]{20,}" + _TOKEN_END),
    ("Slack token", r"\bxox[abposre]-[A-Za-z0-9\-]{10,}" + _TOKEN_END),
    ("Slack webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/\-]{20,}"),
    ("Stripe key", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("Stripe webhook secret", r"\bwhsec_[A-Za-z0-9]{24,}\b"),
    ("Google API key", r"\bAIza[0-9A-Za-z_\-]{35}" + _TOKEN_END),
    ("Google OAuth secret", r"\bGOCSPX-[A-Za-z0-9_\-]{20,}" + _TOKEN_END),
    ("Google OAuth access token", r"\bya29\.[0-9A-Za-z_\-]{20,}" + _TOKEN_END),
    (
        "OpenAI or Anthropic key",
        r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?[A-Za-z0-9_\-]{20,}" + _TOKEN_END,
    ),
    ("Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}\b"),
    ("npm token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("PyPI token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}" + _TOKEN_END),
    ("SendGrid key", r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}" + _TOKEN_END),
)
"""(name, regex) of credentials whose prefix names their issuer (formats as the issuers document them)."""
_TOKEN_HINT = re.compile(
    r"A[A-Z0-9]{3}[A-Z0-9]{16}|gh[pousr]_|github_pat_|gl[a-z]+-|xox[a-z]-|hooks\.slack\.com|_(?:live|test)_|whsec_"
    r"|AIza|GOCSPX-|ya29\.|sk-|hf_|npm_|pypi-|SG\."
)
"""Something every `KNOWN_TOKENS` match holds (its prefix)."""

_KEY_LABEL = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
PRIVATE_KEY_PATTERN = (
    _KEY_LABEL + r"(?:(?:(?!-----BEGIN ).)*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"|(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/=]+(?=[ \t]*$)|\s+[A-Za-z0-9+/=]{16,}"
    r"|\s+(?:Proc-Type|DEK-Info): [A-Za-z0-9,\-]+)*)"
)
"""A PEM/OpenSSH/PGP private-key block to its END line; without one (a cut-off document), the BEGIN line
and what follows it of base64 lines, base64 runs of 16 characters or more (newlines lost) and encryption
headers."""

_SECRET_NAME = (
    r"(?:api[_.\-]?key|apikey|access[_.\-]?key(?:[_.\-]?id)?|secret(?:[_.\-]?(?:access[_.\-]?)?key)?"
    r"|client[_.\-]?secret|(?:access|auth|refresh|session|bearer|api)[_.\-]?token|token|private[_.\-]?key"
    r"|passwd|password|passphrase|pwd)"
)
ASSIGNMENT_PATTERN = re.compile(
    r"(?i)(?P<name>" + _SECRET_NAME + r")(?![A-Za-z])[\"']?\s{0,3}"
    r"(?P<op>:=|=>|=|:)\s{0,3}(?:(?P<quote>[\"'`])(?P<quoted>[^\"'`\n]{4,200}?)(?P=quote)"
    r"|(?P<value>[^\s\"'`,;<>(){}\[\]]{4,}))"
)
"""`name = value`, `name: value`, `"name": "value"` for a name that says it holds a secret, or ends with such
a word (`db_password`, `AWS_SECRET_ACCESS_KEY`, `GITHUB_TOKEN`); a quoted value may hold spaces."""
_ASSIGNMENT_HINT = re.compile(r"(?i)key|secret|token|pass|pwd|bearer|://")
"""Something every assignment, Bearer header and URL password holds."""
BEARER_PATTERN = re.compile(r"\b[Bb]earer\s+(?P<value>[A-Za-z0-9\-._~+/]{16,}=*)")
URL_PASSWORD_PATTERN = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s/:@]+:(?P<value>[^\s/@]+)@[A-Za-z0-9]")
_PLACEHOLDER_VALUE = re.compile(
    r"^(?:\$[{(]|\$[A-Z_][A-Z0-9_]*$|%\(|\{|<|\*+$|(?i:x+|null|none|true|false|undefined|changeme|redacted)$)"
)
"""Values that stand for a secret without being one: `${VAR}`, `$VAR`, `%(name)s`, `{{...}}`, `<...>`,
`****`, `xxx`, `null`."""

ENTROPY_CANDIDATE = re.compile(
    rf"(?<![A-Za-z0-9+/=_\-])[A-Za-z0-9+/_\-]{{{ENTROPY_MIN_LENGTH},}}={{0,2}}(?![A-Za-z0-9+/=_\-])"
)
_HEX_LIKE = re.compile(r"[0-9a-fA-F\-]+")
_SEGMENT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+|[^A-Za-z0-9]+")


def shannon_entropy(text: str) -> float:
    """Bits per character of `text`'s character distribution."""
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def looks_random(token: str) -> bool:
    """True for a token the entropy scan takes for a secret: not hex alone (commit hashes, checksums,
    UUIDs: left to the assignment recognizer); two upper-case letters, two lower-case ones and a digit
    (words, slugs, paths and chemical names rarely mix all three); `ENTROPY_BITS` bits per character or
    more; and short segments (`MAX_SEGMENT_LENGTH`), which camel-case identifiers do not have."""
    if _HEX_LIKE.fullmatch(token):
        return False
    if (
        sum(c.isupper() for c in token) < 2
        or sum(c.islower() for c in token) < 2
        or not any(c.isdigit() for c in token)
    ):
        return False
    body = token.rstrip("=")
    if len(body) / len(_SEGMENT.findall(body)) > MAX_SEGMENT_LENGTH:
        return False
    return shannon_entropy(body) >= ENTROPY_BITS


def _result(recognizer: Any, entity: str, start: int, end: int, score: float) -> RecognizerResult:
    return RecognizerResult(
        entity_type=entity,
        start=start,
        end=end,
        score=score,
        recognition_metadata={
            RecognizerResult.RECOGNIZER_NAME_KEY: recognizer.name,
            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: recognizer.id,
        },
    )


class KnownTokenRecognizer(PatternRecognizer):
    """Credentials with an issuer's prefix (`KNOWN_TOKENS`) as API_KEY."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="API_KEY",
            patterns=[Pattern(name, regex, 1.0) for name, regex in KNOWN_TOKENS],
            name="KnownTokenRecognizer",
            global_regex_flags=CASE_SENSITIVE,
        )

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None, regex_flags: Any = None
    ) -> list[RecognizerResult]:
        if not _TOKEN_HINT.search(text):  # one scan for every issuer's prefix instead of one per pattern
            return []
        return super().analyze(text, entities, nlp_artifacts, regex_flags)


class JwtRecognizer(PatternRecognizer):
    """JSON Web Tokens (header.payload.signature, base64url) as API_KEY; the header must decode to JSON."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="API_KEY",
            patterns=[Pattern("JWT", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*", 0.6)],
            name="JwtRecognizer",
            global_regex_flags=CASE_SENSITIVE,
        )

    def validate_result(self, pattern_text: str) -> bool:
        header = pattern_text.split(".", 1)[0]
        try:
            decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        except (binascii.Error, ValueError):
            return False
        return isinstance(decoded, dict)


class PrivateKeyRecognizer(PatternRecognizer):
    """PEM, OpenSSH and PGP private-key blocks as PRIVATE_KEY."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity="PRIVATE_KEY",
            patterns=[Pattern("private key block", PRIVATE_KEY_PATTERN, 1.0)],
            name="PrivateKeyRecognizer",
            global_regex_flags=CASE_SENSITIVE | re.DOTALL,
        )


class AssignmentRecognizer(LocalRecognizer):
    """The value of a secret-named assignment (API_KEY; PASSWORD when the name says pass/pwd), of a
    Bearer authorization, and the password of a URL's user:password@ part.

    In prose a colon after such a name often introduces words ('Password: the one you chose'), so after
    `:` an unquoted value must hold a character other than a letter; after `=` or in quotes any value
    of 4 or more characters counts. Template values (`${VAR}`, `<...>`, `****`, `xxx`, `null`) stay.
    """

    SCORE = 0.8

    def __init__(self) -> None:
        super().__init__(supported_entities=["API_KEY", "PASSWORD"], name="AssignmentRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = []
        if not _ASSIGNMENT_HINT.search(text):
            return results
        for match in ASSIGNMENT_PATTERN.finditer(text):
            group = "quoted" if match.group("quote") else "value"
            value = match.group(group)
            if _PLACEHOLDER_VALUE.match(value):
                continue
            if match.group("op") == ":" and group == "value" and value.isalpha():
                continue
            name = match.group("name").lower()
            entity = "PASSWORD" if ("pass" in name or "pwd" in name) else "API_KEY"
            results.append(_result(self, entity, match.start(group), match.end(group), self.SCORE))
        for match in BEARER_PATTERN.finditer(text):
            results.append(_result(self, "API_KEY", match.start("value"), match.end("value"), self.SCORE))
        for match in URL_PASSWORD_PATTERN.finditer(text):
            results.append(_result(self, "PASSWORD", match.start("value"), match.end("value"), self.SCORE))
        return [r for r in results if r.entity_type in entities] if entities else results


class HighEntropyRecognizer(LocalRecognizer):
    """Random-looking base64/base64url tokens of `ENTROPY_MIN_LENGTH`+ characters (`looks_random`) as SECRET."""

    SCORE = 0.5

    def __init__(self) -> None:
        super().__init__(supported_entities=["SECRET"], name="HighEntropyRecognizer")

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        return [
            _result(self, "SECRET", match.start(), match.end(), self.SCORE)
            for match in ENTROPY_CANDIDATE.finditer(text)
            if looks_random(match.group())
        ]


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recognizer with its domain check read from tldextract's bundled suffix snapshot."""

    def __init__(self) -> None:
        import tldextract

        # suffix_list_urls=() and no cache: the shipped Public Suffix List snapshot, no download, no file.
        self._extract = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())
        self._extract("warm.up")  # parse the snapshot now, not in a first (possibly concurrent) query
        super().__init__(name="OfflineEmailRecognizer")

    def validate_result(self, pattern_text: str) -> bool:
        return self._extract(pattern_text).fqdn != ""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None, regex_flags: Any = None
    ) -> list[RecognizerResult]:
        # `scheme://user:password@host` is a URL's credentials (AssignmentRecognizer), not an address.
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        return [r for r in results if not _URL_USERINFO_BEFORE.search(text[max(0, r.start - 200) : r.start])]


# fmt: off
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 28, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 25, "PT": 21, "QA": 25, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# fmt: on
"""IBAN length per country (the SWIFT IBAN registry, as Presidio's per-country formats give it)."""


class OverlappingCardRecognizer(CreditCardRecognizer):
    """Presidio's credit-card recognizer (pattern and Luhn check) with overlapping matches."""

    def __init__(self) -> None:
        super().__init__(name="OverlappingCardRecognizer")
        # Presidio's default flags for pattern recognizers.
        flags = regex.DOTALL | regex.MULTILINE | regex.IGNORECASE
        self._patterns = [regex.compile(p.regex, flags) for p in CreditCardRecognizer.PATTERNS]

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None, regex_flags: Any = None
    ) -> list[RecognizerResult]:
        results = [
            _result(self, self.supported_entities[0], match.start(), match.end(), EntityRecognizer.MAX_SCORE)
            for pattern in self._patterns
            for match in pattern.finditer(text, overlapped=True)
            if self.validate_result(match.group())
        ]
        return EntityRecognizer.remove_duplicates(results)


class BoundedIbanRecognizer(IbanRecognizer):
    """Presidio's IBAN recognizer, plus IBANs cut back to their country's length when the pattern ran on
    into a following group of characters."""

    def __init__(self) -> None:
        super().__init__(name="BoundedIbanRecognizer")
        self._candidate = re.compile(IbanRecognizer.PATTERNS[0].regex, re.DOTALL | re.MULTILINE)  # as Presidio's

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None, regex_flags: Any = None
    ) -> list[RecognizerResult]:
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        found = [(r.start, r.end) for r in results]
        position = 0
        # Searched again after each IBAN rather than with finditer: a match that ran on may hold the
        # start of the next IBAN ('ES91 ... 1332 DE89 ...').
        while (match := self._candidate.search(text, position)) is not None:
            start = position = match.start()
            position += 1
            covering = [hi for lo, hi in found if lo <= start < hi]
            if covering:
                position = max(covering)
                continue
            length = IBAN_LENGTHS.get(match.group()[:2])
            if length is None:
                continue
            seen, end = 0, None
            for i in range(start, match.end()):
                seen += text[i].isalnum()
                if seen == length:
                    end = i + 1
                    break
            if end is None or text[end : end + 1].isalnum() or not self.validate_result(text[start:end]):
                continue
            results.append(_result(self, self.supported_entities[0], start, end, EntityRecognizer.MAX_SCORE))
            found.append((start, end))
            position = end
        return results


_URL_USERINFO_BEFORE = re.compile(r"://[^\s/@]*:[^\s/@]*$")
_IP_HINT = re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]|:[0-9A-Fa-f]{0,4}:")
"""What every IPv4 address (a dotted triple at least) and every IPv6 address (two colons with at most one
group between) holds."""
_NUMBERING_BEFORE = re.compile(
    r"(?i)(?:\bv|\b(?:versions?|ver\.?|release|build|sections?|sec\.|chapter|clause|article|art\.|rule|figure|fig\.|table)\s*|§\s*)$"
)


class VersionAwareIpRecognizer(IpRecognizer):
    """Presidio's IP recognizer, less dotted quads that follow a version or numbering word ('v1.2.3.4',
    'version 2.0.0.1', 'section 1.2.3.4', '§ 4.1.2.3')."""

    def __init__(self) -> None:
        super().__init__(name="VersionAwareIpRecognizer")

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None, regex_flags: Any = None
    ) -> list[RecognizerResult]:
        if not _IP_HINT.search(text):  # Presidio's five address patterns are slow to fail: skip them
            return []
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        return [r for r in results if not _NUMBERING_BEFORE.search(text[max(0, r.start - 12) : r.start])]


_SEVEN_DIGITS = re.compile(r"(?:[0-9][\s().\-/]{0,3}){7}")
"""Seven digits apart from phone-number punctuation: a text without them holds no phone number."""


class StrictPhoneRecognizer(PhoneRecognizer):
    """Presidio's phone recognizer at strict-grouping leniency, for numbers of 7 to 15 digits (E.164's
    longest) that are not a segment of a URL path (`/boyer/0470003790/` is an ISBN)."""

    MIN_DIGITS = 7
    MAX_DIGITS = 15

    def __init__(self) -> None:
        super().__init__(leniency=2, name="StrictPhoneRecognizer")

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        if not _SEVEN_DIGITS.search(text):  # phonenumbers' matcher is the slowest recognizer: skip it
            return []
        results = super().analyze(text, entities, nlp_artifacts)
        return [
            r
            for r in results
            if self.MIN_DIGITS <= sum(c.isdigit() for c in text[r.start : r.end]) <= self.MAX_DIGITS
            and not (text[r.start - 1 : r.start] == "/" and text[r.end : r.end + 1] == "/")
        ]
