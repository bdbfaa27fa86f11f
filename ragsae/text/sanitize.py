"""Sanitisation: personal data and secrets found in a text and replaced by typed placeholders.

A `Sanitizer` (built from a `SanitizeConfig`) runs before tokenisation: whole documents are sanitised
before they are split into passages, and queries before they are encoded or logged, so that neither
the LLM, nor the codes computed from its activations, nor the stored text hold a detected value.

Detection is Presidio's `AnalyzerEngine` with pattern recognizers only and its no-op NLP engine (no
spaCy model is needed or loaded): EMAIL, PHONE (`phonenumbers`), CREDIT_CARD (Luhn checksum), IBAN
(mod-97 checksum), IP_ADDRESS, US_SSN, CRYPTO (Bitcoin address checksum), plus the secret recognizers
of `ragsae.text.secrets` (API_KEY, PASSWORD, PRIVATE_KEY, SECRET). Detections below `MIN_SCORE` are
dropped (Presidio's "very weak" SSN patterns such as any 9-digit number, and a bare `::`). Overlapping
detections are merged into one replaced span, so no part of either value stays; the span takes the type
of its best detection (highest score, then longest, then earliest, then type name): deterministic.

Placeholders are `<EMAIL>`, `<PHONE>`, ... ('redact'), or `<EMAIL_3f2a9c1b>` ('hash'): the first
`hash_length` hex digits of HMAC-SHA256(salt, type + value), the value first normalised (an email
lower-cased, a phone in E.164 where `phonenumbers` parses it, card and SSN digits only, an IBAN without
spaces in upper case, an IP address in its canonical form), so equal values get equal placeholders and
a query holding a value finds the passages that hold it.

The salt is a secret. Without it a placeholder cannot be reversed; with it, a value from a small space
can be found by trying them all: a US phone number is one of about 10**10, an SSN one of 10**9, a card
number with a known issuer prefix about 10**9 (Luhn leaves a tenth): minutes of HMACs. It therefore
never enters the manifest: it comes from the environment variable `SanitizeConfig.salt_env`, or from a
file of random bytes that `write_salt` creates readable by its owner only (the index folder's
`sanitize.salt`). Whoever can read that file can test guesses, so share an index without it (queries
then cannot be hashed the same way), or keep the salt in the environment. `salt_fingerprint` names a
salt without revealing it, so a loader can check that a query is hashed with the index's salt.

Offsets. Documents are sanitised whole (title and body, before splitting), so passage offsets count
characters of the sanitised document, consistent with the stored ('redacted') text. Every
`SanitizedText` keeps where each placeholder came from, and `original_span` maps a span of the
sanitised text back to the original one, for callers that hold the original document (store_text
'none'). `sanitize_document` returns that mapping over `Document.full_text`, the text passages index.

Not detected: names of people, places and organisations (PERSON needs a NER model, which this offline
pipeline does not have), postal addresses, dates of birth, national ids other than US SSNs, hex-only
secrets outside an assignment (they look like commit hashes and checksums), secrets shorter than 20
characters outside an assignment, and values split across a document's title and body.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..config import SANITIZE_ENTITIES, SanitizeConfig
from ..errors import ConfigError, IndexFolderError
from .corpus import Document

logger = logging.getLogger(__name__)

MIN_SCORE = 0.4
"""Presidio score below which a detection is dropped: its unvalidated phone matches score 0.4, its
weakest SSN and IPv6 patterns 0.05 and 0.1."""
SALT_BYTES = 32
"""Size of a salt `new_salt` draws."""
MIN_SALT_BYTES = 16
"""Shortest salt accepted (from the environment or a file)."""

PRESIDIO_TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_SSN": "US_SSN",
    "CRYPTO": "CRYPTO",
    "API_KEY": "API_KEY",
    "PASSWORD": "PASSWORD",
    "PRIVATE_KEY": "PRIVATE_KEY",
    "SECRET": "SECRET",
}
"""Presidio entity name -> ragsae entity type (the placeholder's name)."""


class Detection(NamedTuple):
    """A span to replace, after overlaps are merged: its type, offsets and best score (never its value)."""

    entity: str
    start: int
    end: int
    score: float


@dataclass(frozen=True)
class Replacement:
    """One replaced span: its entity type, where it was in the original text and where its placeholder
    is in the sanitised text. Never the value."""

    entity: str
    start: int
    end: int
    new_start: int
    new_end: int
    score: float


@dataclass(frozen=True)
class SanitizedText:
    """A sanitised text, the spans replaced in it and the original's length."""

    text: str
    replacements: tuple[Replacement, ...] = ()
    original_length: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.replacements)

    @property
    def counts(self) -> dict[str, int]:
        """Replacements per entity type."""
        return dict(Counter(r.entity for r in self.replacements))

    def original_offset(self, offset: int, end: bool = False) -> int:
        """The original text's offset for an offset of the sanitised text. An offset inside a placeholder
        maps to the start of the replaced span, or to its end when `end` (the end of a span)."""
        if not 0 <= offset <= len(self.text):
            raise ValueError(f"offset {offset} outside the sanitised text (length {len(self.text)})")
        ends = [r.new_end for r in self.replacements]
        i = bisect.bisect_right(ends, offset)  # replacements wholly at or before offset
        if i < len(self.replacements) and self.replacements[i].new_start < offset:
            inside = self.replacements[i]
            return inside.end if end else inside.start
        if i == 0:
            return offset
        last = self.replacements[i - 1]
        return last.end + (offset - last.new_end)

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original text's span for a span of the sanitised text (a passage's char_start, char_end);
        a placeholder cut by the span's edge is included whole."""
        return self.original_offset(start), self.original_offset(end, end=True)

    @classmethod
    def concat(cls, parts: Sequence[SanitizedText | str]) -> SanitizedText:
        """The sanitisation of the original texts joined, from each part's (a str is a part left as is)."""
        text: list[str] = []
        replacements: list[Replacement] = []
        old = new = 0
        for part in parts:
            if isinstance(part, str):
                part = cls(part, (), len(part))
            replacements += [
                Replacement(r.entity, r.start + old, r.end + old, r.new_start + new, r.new_end + new, r.score)
                for r in part.replacements
            ]
            text.append(part.text)
            old += part.original_length
            new += len(part.text)
        return cls("".join(text), tuple(replacements), old)


@dataclass(frozen=True)
class Audit:
    """What a batch of sanitisations replaced: texts seen, texts changed, replacements per entity type.
    Counts only, never values: safe to store in a manifest. Merge two with `+`."""

    texts: int = 0
    changed: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, results: Iterable[SanitizedText]) -> Audit:
        texts = changed = 0
        counts: Counter[str] = Counter()
        for result in results:
            texts += 1
            changed += result.changed
            counts.update(r.entity for r in result.replacements)
        return cls(texts, changed, dict(sorted(counts.items())))

    def __add__(self, other: Audit) -> Audit:
        counts = Counter(self.counts)
        counts.update(other.counts)
        return Audit(self.texts + other.texts, self.changed + other.changed, dict(sorted(counts.items())))

    def merge(self, other: Audit) -> Audit:
        return self + other

    @property
    def total(self) -> int:
        """Replacements of every type."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "changed": self.changed, "counts": dict(sorted(self.counts.items()))}

    @classmethod
    def from_dict(cls, data: Any) -> Audit:
        """An audit read back from JSON (a manifest); IndexFolderError naming what is wrong."""

        def count(value: Any, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IndexFolderError(f"sanitisation audit: {what} must be a count, got {value!r}")
            return value

        if not isinstance(data, dict) or not isinstance(data.get("counts", {}), dict):
            raise IndexFolderError(f"sanitisation audit: expected {{texts, changed, counts}}, got {data!r}")
        counts = {str(k): count(v, f"counts[{k!r}]") for k, v in data.get("counts", {}).items()}
        return cls(
            count(data.get("texts", 0), "texts"), count(data.get("changed", 0), "changed"), dict(sorted(counts.items()))
        )


# ---------------------------------------------------------------------------------------------- salt


def new_salt() -> bytes:
    """`SALT_BYTES` random bytes from the operating system's CSPRNG."""
    return os.urandom(SALT_BYTES)


def write_salt(path: str | Path, salt: bytes | None = None) -> bytes:
    """Create `path` holding `salt` (a new one by default), readable and writable by its owner only;
    refuses to overwrite (IndexFolderError): a new salt would make every hash placeholder of the index
    unmatchable. `storage.apply_umask` leaves a file named `layout.SALT_FILE` to its owner."""
    salt = new_salt() if salt is None else salt
    _check_salt(salt, str(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IndexFolderError(f"{path}: a salt file already exists; it is not replaced") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(salt)
    os.chmod(path, 0o600)  # whatever the umask
    return salt


def read_salt(path: str | Path) -> bytes:
    """The salt in `path` (IndexFolderError if missing or short); logs a warning when others can read it."""
    try:
        salt = Path(path).read_bytes()
        mode = os.stat(path).st_mode
    except OSError as error:
        raise IndexFolderError(f"{path}: cannot read the hash-mode salt: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s: the hash-mode salt is readable by other users (mode %o)", path, mode & 0o777)
    if len(salt) < MIN_SALT_BYTES:
        raise IndexFolderError(f"{path}: the hash-mode salt holds {len(salt)} bytes, expected {MIN_SALT_BYTES} or more")
    return salt


def _check_salt(salt: Any, where: str) -> None:
    if not isinstance(salt, bytes) or len(salt) < MIN_SALT_BYTES:
        size = len(salt) if isinstance(salt, bytes) else type(salt).__name__
        raise ConfigError(f"{where}: the hash-mode salt must be {MIN_SALT_BYTES} bytes or more, got {size}")


def env_salt(config: SanitizeConfig) -> bytes | None:
    """The salt in `config.salt_env` (its UTF-8 bytes), None without salt_env; ConfigError naming the
    variable if it is unset or short."""
    if config.salt_env is None:
        return None
    value = os.environ.get(config.salt_env)
    if value is None:
        raise ConfigError(f"salt_env: the environment variable {config.salt_env} is not set")
    salt = value.encode("utf-8", "surrogateescape")
    _check_salt(salt, f"${config.salt_env}")
    return salt


def resolve_salt(config: SanitizeConfig, salt_file: str | Path | None = None, create: bool = False) -> bytes | None:
    """The hash-mode salt for `config`: None unless mode is 'hash'; else from `config.salt_env`, else read
    from `salt_file`, or written there with a new salt when `create` (building a new index)."""
    if config.mode != "hash":
        return None
    salt = env_salt(config)
    if salt is not None:
        return salt
    if salt_file is None:
        raise ConfigError("mode='hash' needs a salt: set salt_env or keep a salt file in the index folder")
    if create and not Path(salt_file).exists():
        return write_salt(salt_file)
    return read_salt(salt_file)


def salt_fingerprint(salt: bytes) -> str:
    """16 hex digits that identify a salt without revealing it (an HMAC of a fixed message): store it in
    the manifest and compare at load, so that a query is never hashed with another salt unnoticed."""
    return hmac.new(salt, b"ragsae sanitize salt fingerprint", hashlib.sha256).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ hashing

_NOT_DIGIT = re.compile(r"\D")
_SPACE = re.compile(r"\s+")


def normalize_value(entity: str, value: str) -> str:
    """The form of a value that is hashed, so that spellings of one value share a placeholder."""
    if entity == "EMAIL":
        return value.casefold()
    if entity in ("CREDIT_CARD", "US_SSN"):
        return _NOT_DIGIT.sub("", value)
    if entity == "IBAN":
        return _SPACE.sub("", value).upper()
    if entity == "IP_ADDRESS":
        try:
            return str(ipaddress.ip_interface(value))
        except ValueError:
            return value
    if entity == "PHONE":
        import phonenumbers

        try:
            number = phonenumbers.parse(value, "US")
            if phonenumbers.is_valid_number(number):
                return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        except phonenumbers.NumberParseException:
            pass
        return _NOT_DIGIT.sub("", value)
    return value


def hash_placeholder(entity: str, value: str, salt: bytes, length: int) -> str:
    """`<ENTITY_hex>`: the first `length` hex digits of HMAC-SHA256(salt, entity NUL normalised value)."""
    message = f"{entity}\0{normalize_value(entity, value)}".encode("utf-8", "surrogatepass")
    return f"<{entity}_{hmac.new(salt, message, hashlib.sha256).hexdigest()[:length]}>"


# ---------------------------------------------------------------------------------------- detection


def merge_overlaps(detections: Iterable[Detection]) -> list[Detection]:
    """Overlapping detections as one span each (their union, so no part of a value stays), typed by the
    best of them: highest score, then longest, then earliest, then entity name. Sorted by start."""
    merged: list[Detection] = []
    group: list[Detection] = []
    end = -1

    def close() -> None:
        if group:
            best = min(group, key=lambda d: (-d.score, -(d.end - d.start), d.start, d.entity))
            merged.append(Detection(best.entity, group[0].start, max(d.end for d in group), best.score))

    for detection in sorted(detections, key=lambda d: (d.start, d.end, d.entity)):
        if detection.start >= end:
            close()
            group, end = [], detection.end
        group.append(detection)
        end = max(end, detection.end)
    close()
    return merged


def build_analyzer(entities: Sequence[str]) -> Any:
    """A Presidio AnalyzerEngine with the pattern recognizers of `entities` and no NLP model."""
    try:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine
        from presidio_analyzer.predefined_recognizers import CryptoRecognizer, UsSsnRecognizer

        from . import secrets
    except ImportError as error:
        raise ImportError(f"sanitisation needs Presidio: pip install 'ragsae[privacy]' ({error})") from error

    factories: dict[str, list[Any]] = {
        "EMAIL": [secrets.OfflineEmailRecognizer],
        "PHONE": [secrets.StrictPhoneRecognizer],
        "CREDIT_CARD": [secrets.OverlappingCardRecognizer],
        "IBAN": [secrets.BoundedIbanRecognizer],
        "IP_ADDRESS": [secrets.VersionAwareIpRecognizer],
        "US_SSN": [UsSsnRecognizer],
        "CRYPTO": [CryptoRecognizer],
        "API_KEY": [secrets.KnownTokenRecognizer, secrets.JwtRecognizer, secrets.AssignmentRecognizer],
        "PASSWORD": [secrets.AssignmentRecognizer],
        "PRIVATE_KEY": [secrets.PrivateKeyRecognizer],
        "SECRET": [secrets.HighEntropyRecognizer],
    }
    registry = RecognizerRegistry(supported_languages=["en"])
    for factory in dict.fromkeys(f for entity in entities for f in factories[entity]):
        registry.add_recognizer(factory())
    engine = AnalyzerEngine(
        registry=registry,
        nlp_engine=NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}]),
        supported_languages=["en"],
    )
    # Compile every pattern now (a text past each recognizer's quick pre-check): recognizers compile them
    # lazily on first use, and a Sanitizer is shared by concurrent queries.
    engine.analyze("warm up 0.0.0.0 a@b.cd sk- key=1234567", language="en")
    return engine


class Sanitizer:
    """Replaces the personal data and secrets of `config.entities` in texts by typed placeholders.

    Args:
        config: what to replace and how.
        salt: the hash-mode salt (`resolve_salt`); by default read from `config.salt_env`.

    Immutable once built, so one Sanitizer may serve concurrent threads.
    """

    def __init__(self, config: SanitizeConfig | None = None, salt: bytes | None = None) -> None:
        self.config = config or SanitizeConfig()
        self.entities: tuple[str, ...] = tuple(self.config.entities or SANITIZE_ENTITIES)
        self._salt: bytes | None = None
        if self.config.mode == "hash":
            salt = salt if salt is not None else env_salt(self.config)
            if salt is None:
                raise ConfigError("mode='hash' needs a salt: pass one (resolve_salt) or set salt_env")
            _check_salt(salt, "salt")
            self._salt = salt
        self._analyzer = build_analyzer(self.entities) if self.enabled else None
        self._presidio_entities = [name for name, ours in PRESIDIO_TYPES.items() if ours in self.entities]

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    @property
    def salt_fingerprint(self) -> str | None:
        """`salt_fingerprint` of the hash-mode salt; None in other modes."""
        return salt_fingerprint(self._salt) if self._salt is not None else None

    def detect(self, text: str) -> list[Detection]:
        """The spans `sanitize` replaces, overlaps merged, sorted by start."""
        if self._analyzer is None or not text:
            return []
        results = self._analyzer.analyze(text, language="en", entities=self._presidio_entities)
        return merge_overlaps(
            Detection(PRESIDIO_TYPES[r.entity_type], r.start, r.end, float(r.score))
            for r in results
            if r.score >= MIN_SCORE and PRESIDIO_TYPES.get(r.entity_type) in self.entities
        )

    def placeholder(self, entity: str, value: str) -> str:
        if self._salt is None:
            return f"<{entity}>"
        return hash_placeholder(entity, value, self._salt, self.config.hash_length)

    def sanitize(self, text: str) -> SanitizedText:
        """`text` with each detected value replaced by its placeholder, and where each was."""
        pieces: list[str] = []
        replacements: list[Replacement] = []
        position = length = 0
        for d in self.detect(text):
            pieces.append(text[position : d.start])
            length += d.start - position
            placeholder = self.placeholder(d.entity, text[d.start : d.end])
            replacements.append(Replacement(d.entity, d.start, d.end, length, length + len(placeholder), d.score))
            pieces.append(placeholder)
            length += len(placeholder)
            position = d.end
        if not replacements:
            return SanitizedText(text, (), len(text))
        pieces.append(text[position:])
        return SanitizedText("".join(pieces), tuple(replacements), len(text))

    def sanitize_many(self, texts: Iterable[str]) -> list[SanitizedText]:
        return [self.sanitize(text) for text in texts]

    def sanitize_document(self, document: Document) -> tuple[Document, SanitizedText]:
        """The document with title and body sanitised, and the sanitisation of its `full_text` (what
        passages are cut from; `original_span` maps passage offsets back to the original document)."""
        if not self.enabled:
            return document, SanitizedText(document.full_text, (), len(document.full_text))
        title, body = self.sanitize(document.title), self.sanitize(document.text)
        clean = Document(document.doc_id, body.text, title.text)
        full = SanitizedText.concat([title, "\n", body]) if document.title else body
        return clean, full

    def sanitize_query(self, query: str) -> str:
        """The query as it should be encoded and logged: sanitised unless `config.queries` is off."""
        return self.sanitize(query).text if self.config.queries else query
