"""Sanitisation (`ragsae.text.sanitize`): detection quality on a generated labelled set, replacements on
unmodified passages, throughput.

python benchmarks/sanitize.py [--datasets DIR ...] [--per-type 200] [--near-misses 80] [--seed 0] [--out DIR]

1. Unmodified passages: every document of each collection (msmarco-5k and cranfield by default) goes
   through `Sanitizer.detect`; each replacement is counted by type and listed with its context, for
   inspection (these collections hold no planted values, but real ones: msmarco passages quote the
   phone numbers and addresses of businesses).
2. Labelled set: `--per-type` values of each entity type, generated valid (Luhn-valid card numbers,
   IBANs with correct check digits, numbers `phonenumbers` takes for valid, Base58Check Bitcoin
   addresses, secrets in their issuers' formats, ...), each written into a sentence template and
   inserted at a sentence boundary of a msmarco passage in which step 1 found nothing; plus
   `--near-misses` values of each near-miss kind that must stay (Luhn-invalid card numbers, IBANs with
   wrong check digits, order numbers, dates, times, versions, section numbers, hashes, UUIDs, ISBNs,
   prices, URLs, invalid SSNs, ZIP+4 codes, identifiers). Per type: recall (planted values whose span
   a detection of that type covers), removed (covered by any detection: the value is gone, whatever
   its label), precision (detections of the type that overlap a planted value of the type), and per
   near-miss kind the share replaced.
3. Throughput: `Sanitizer.sanitize_document` over the first collection's documents in 'redact' and
   'hash' modes (best of `--runs`, the modes taking turns), in documents/s and MB/s of UTF-8 text; and
   the time to build the first Sanitizer in this process (importing Presidio, which imports spaCy and
   transformers modules).

Writes OUT/sanitize.json and OUT/sanitize.md (default benchmarks/results/sanitize).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import random
import re
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ragsae.config import SANITIZE_ENTITIES, SanitizeConfig
from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic
from ragsae.text import Document, Sanitizer, load_documents

# The shared BEIR collections live beside the checkout, as for the tests (RAGSAE_DATASETS overrides).
DATASETS = Path(os.environ.get("RAGSAE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

# ------------------------------------------------------------------------------------ generators

FIRST = ["james", "maria", "wei", "fatima", "olga", "juan", "aisha", "lucas", "emma", "ravi", "chloe", "kenji"]
LAST = ["smith", "garcia", "chen", "okafor", "ivanova", "muller", "khan", "rossi", "dubois", "tanaka", "nguyen"]
DOMAINS = [
    "gmail.com", "yahoo.com", "outlook.com", "example.org", "acme-corp.com", "mail.univ-lyon.fr",
    "stats.ox.ac.uk", "company.io", "protonmail.ch", "post.example.de", "health.gov", "school.edu",
]  # fmt: skip
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
B64 = string.ascii_letters + string.digits + "+/"
ALNUM = string.ascii_letters + string.digits


def rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial` + digit pass the Luhn checksum."""
    total = 0
    for i, digit in enumerate(reversed(partial)):
        d = int(digit)
        if i % 2 == 0:  # doubled: these sit at odd positions from the right once the check digit is added
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    odd, even = digits[-1::-2], digits[-2::-2]
    return (sum(odd) + sum(sum(divmod(2 * d, 10)) for d in even)) % 10 == 0


def card_number(rng: random.Random, valid: bool = True) -> str:
    kind = rng.choice(["visa", "visa", "mastercard", "amex", "discover"])
    prefix, length = {
        "visa": ("4", 16),
        "mastercard": (str(rng.randint(51, 55)), 16),
        "amex": (rng.choice(["34", "37"]), 15),
        "discover": ("6011", 16),
    }[kind]
    body = prefix + rand(rng, string.digits, length - len(prefix) - 1)
    check = luhn_check_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    number = body + check
    groups = [number[:4], number[4:10], number[10:]] if kind == "amex" else [number[i : i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


IBAN_FORMATS = {  # country: BBAN as (alphabet, length) parts
    "DE": [(string.digits, 18)],
    "GB": [(string.ascii_uppercase, 4), (string.digits, 14)],
    "FR": [(string.digits, 10), (string.ascii_uppercase + string.digits, 11), (string.digits, 2)],
    "ES": [(string.digits, 20)],
    "NL": [(string.ascii_uppercase, 4), (string.digits, 10)],
    "IT": [(string.ascii_uppercase, 1), (string.digits, 10), (string.ascii_uppercase + string.digits, 12)],
    "CH": [(string.digits, 5), (string.ascii_uppercase + string.digits, 12)],
}


def iban_check_digits(country: str, bban: str) -> str:
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(digits) % 97:02d}"


def iban_valid(iban: str) -> bool:
    compact = iban.replace(" ", "")
    digits = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


def iban(rng: random.Random, valid: bool = True) -> str:
    country = rng.choice(sorted(IBAN_FORMATS))
    bban = "".join(rand(rng, alphabet, n) for alphabet, n in IBAN_FORMATS[country])
    check = iban_check_digits(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 90)) % 97 + 2:02d}"
        if check == iban_check_digits(country, bban):
            check = f"{(int(check) + 1) % 97 + 2:02d}"
    compact = country + check + bban
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4)) if rng.random() < 0.6 else compact


def phone(rng: random.Random) -> str:
    import phonenumbers

    while True:
        region = rng.choice(["US", "US", "US", "GB", "DE", "FR", "IN", "CA"])
        if region in ("US", "CA"):
            area = f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}"
            national = f"{area}{rng.randint(2, 9)}{rand(rng, string.digits, 6)}"
        else:
            sample = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
            national = str(sample.national_number)
            national = national[:2] + rand(rng, string.digits, len(national) - 2)
        try:
            number = phonenumbers.parse(national, region)
        except phonenumbers.NumberParseException:
            continue
        if not phonenumbers.is_valid_number(number):
            continue
        if region == "US":
            a, b, c = national[:3], national[3:6], national[6:]
            return rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}", f"1-{a}-{b}-{c}"])
        style = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL])
        return phonenumbers.format_number(number, style)


def email(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first}{last}{rng.randint(1, 99)}",
            f"{first[0]}.{last}",
            f"{first}_{last}",
            f"{first}+news",
        ]
    )
    return f"{local}@{rng.choice(DOMAINS)}"


def ip_address(rng: random.Random) -> str:
    if rng.random() < 0.7:
        while True:
            address = ipaddress.IPv4Address(rng.getrandbits(32))
            if not (
                address.is_multicast or address.is_reserved or address.is_unspecified or str(address).startswith("0.")
            ):
                return str(address)
    return ipaddress.IPv6Address(
        rng.getrandbits(128) if rng.random() < 0.5 else (0x20010DB8 << 96) | rng.getrandbits(32)
    ).compressed


def ssn(rng: random.Random) -> str:
    while True:
        area = rng.randint(1, 899)
        if area != 666:
            break
    value = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    return value if value != "078-05-1120" and rng.random() < 0.8 else value.replace("-", " ")


def base58check(payload: bytes) -> str:
    checked = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    number, out = int.from_bytes(checked, "big"), ""
    while number:
        number, rest = divmod(number, 58)
        out = BASE58[rest] + out
    return "1" * (len(checked) - len(checked.lstrip(b"\0"))) + out


def bitcoin_address(rng: random.Random) -> str:
    return base58check(bytes([rng.choice([0x00, 0x05])]) + rng.randbytes(20))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(rng: random.Random) -> str:
    header = b64url(json.dumps({"alg": rng.choice(["HS256", "RS256"]), "typ": "JWT"}).encode())
    claims = {
        "sub": str(rng.randint(10**6, 10**9)),
        "name": rng.choice(FIRST).title(),
        "iat": rng.randint(1_500_000_000, 1_800_000_000),
    }
    return f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(rng.randbytes(32))}"


def api_key(rng: random.Random) -> tuple[str, str]:
    """(template with {v}, value) of a credential in one of the formats ragsae recognises."""
    kind = rng.randrange(10)
    if kind == 0:
        return "export AWS_ACCESS_KEY_ID={v}", "AKIA" + rand(rng, string.ascii_uppercase + "234567", 16)
    if kind == 1:
        return "aws_secret_access_key = {v}", rand(rng, B64, 40)
    if kind == 2:
        return "git clone with token {v} failed", "ghp_" + rand(rng, ALNUM, 36)
    if kind == 3:
        return "the GitLab token {v} was rotated", "glpat-" + rand(rng, ALNUM + "_-", 20)
    if kind == 4:
        return (
            "slack bot token {v}",
            f"xoxb-{rand(rng, string.digits, 12)}-{rand(rng, string.digits, 13)}-{rand(rng, ALNUM, 24)}",
        )
    if kind == 5:
        return "Stripe charged it with key {v}.", rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + rand(
            rng, ALNUM, 24
        )
    if kind == 6:
        return "maps?key={v}&q=paris", "AIza" + rand(rng, ALNUM + "_-", 35)
    if kind == 7:
        return "Authorization header carried {v} in the request", jwt(rng)
    if kind == 8:
        return 'config: {{"api_key": "{v}"}}', rand(rng, ALNUM, 32)
    return "OPENAI_API_KEY={v}", "sk-proj-" + rand(rng, ALNUM + "_-", 48)


def password(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(["Sunny", "dragon", "Monkey", "letmein", "Winter", "qwerty", "Tr0ub4dor", "Purple"])
    value = rng.choice(
        [
            f"{word}{rng.randint(1, 9999)}!",
            f"{word}#{rng.randint(10, 99)}",
            rand(rng, ALNUM + "!@#$%&*", 12),
            f"{word}{word[::-1]}",
        ]
    )
    template = rng.choice(
        [
            "password={v}",
            'DB_PASSWORD: "{v}"',
            "pwd = '{v}'",
            "login with passwd={v} then",
            "https://admin:{v}@db.example.com/main",
        ]
    )
    if template.startswith("https"):  # '@', '/' and '%' would be percent-encoded in a URL
        value = re.sub(r"[@/%#]", lambda m: rng.choice("!$*"), value)
    return template, value


def private_key(rng: random.Random) -> str:
    label = rng.choice(
        ["RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY"]
    )
    lines = [rand(rng, B64, 64) for _ in range(rng.randint(3, 12))] + [rand(rng, B64, rng.randint(8, 60)) + "=="]
    end = "" if rng.random() < 0.1 else f"\n-----END {label}-----"
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + end


def secret_token(rng: random.Random) -> str:
    while True:
        token = rand(rng, ALNUM, rng.randint(20, 48)) if rng.random() < 0.7 else rand(rng, B64, 40)
        if token[0] not in "+/":
            return token


TEMPLATES: dict[str, list[str]] = {
    "EMAIL": ["For questions email {v}.", "Contact: {v}", "Send your CV to {v} before Friday.", "({v})"],
    "PHONE": ["Call {v} for details.", "Phone: {v}.", "Reach our office at {v} during business hours.", "Tel. {v}."],
    "CREDIT_CARD": ["The card {v} was charged twice.", "Card number: {v}", "Paid with {v} on file."],
    "IBAN": ["Please wire the deposit to IBAN {v}.", "Account {v} (SEPA).", "Bank details: {v}"],
    "IP_ADDRESS": ["Login from {v} was blocked.", "The server at {v} stopped answering.", "client={v}"],
    "US_SSN": ["SSN {v} is on the form.", "Social security number: {v}", "Her number, {v}, was stolen."],
    "CRYPTO": ["Donations: {v}", "Send BTC to {v} only.", "The wallet {v} received 0.3 BTC."],
    "PRIVATE_KEY": ["The server key was pasted here:\n{v}\nand then deleted.", "{v}"],
    "SECRET": ["session cookie {v} expired", "the reset link token is {v} and", "id {v}"],
}

NEAR_MISSES: dict[str, Any] = {
    "luhn_invalid_card": lambda r: ("The card {v} was declined.", card_number(r, valid=False)),
    "bad_iban_checksum": lambda r: ("Wire to IBAN {v}.", iban(r, valid=False)),
    "order_number": lambda r: (
        "Your order {v} has shipped.",
        r.choice(
            [
                f"#{r.randint(10**5, 10**8)}",
                f"ORD-{r.randint(2015, 2025)}-{r.randint(0, 999999):06d}",
                f"INV{r.randint(10**7, 10**8)}",
                f"PO-{r.randint(10000, 99999)}-{r.randint(100, 999)}",
            ]
        ),
    ),
    "date": lambda r: (
        "It opened on {v}.",
        r.choice(
            [
                f"{r.randint(1990, 2025)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                f"{r.randint(1, 12):02d}/{r.randint(1, 28):02d}/{r.randint(1990, 2025)}",
                f"{r.randint(1, 28)}.{r.randint(1, 12):02d}.{r.randint(1990, 2025)}",
            ]
        ),
    ),
    "time": lambda r: (
        "The store opens at {v} daily.",
        f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}" + r.choice(["", f":{r.randint(0, 59):02d}"]),
    ),
    "version": lambda r: (
        r.choice(["Upgrade to version {v} today.", "Fixed in {v}.", "Requires Python {v} or later."]),
        r.choice(
            [
                f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 20)}.{r.randint(0, 200)}",
                f"{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 30)}",
                f"{r.randint(1, 5)}.{r.randint(0, 9)}.0-rc.{r.randint(1, 5)}",
            ]
        ),
    ),
    "section_number": lambda r: (
        "As described in section {v}, the rule applies.",
        f"{r.randint(1, 20)}.{r.randint(1, 9)}.{r.randint(1, 9)}.{r.randint(1, 9)}",
    ),
    "hex_hash": lambda r: (
        r.choice(["commit {v} fixed it", "SHA-256: {v}", "md5 {v}"]),
        rand(r, "0123456789abcdef", r.choice([7, 32, 40, 64])),
    ),
    "uuid": lambda r: ("request id {v}", str(__import__("uuid").UUID(int=r.getrandbits(128)))),
    "isbn": lambda r: (
        "ISBN {v}",
        f"978-{r.randint(0, 9)}-{r.randint(10, 99)}-{r.randint(100000, 999999)}-{r.randint(0, 9)}",
    ),
    "price": lambda r: ("It costs {v} per year.", f"${r.randint(1, 99)},{r.randint(100, 999)}.{r.randint(0, 99):02d}"),
    "url": lambda r: (
        "See {v} for more.",
        r.choice(
            [
                "https://www.example.com/docs/guide/getting-started.html?page=2",
                "https://en.wikipedia.org/wiki/Fahrenheit",
                f"http://shop.example.net/item/{r.randint(1000, 99999)}/reviews",
            ]
        ),
    ),
    "invalid_ssn": lambda r: (
        "SSN {v} is not valid.",
        r.choice(
            [
                "000-12-3456",
                "666-45-6789",
                "123-45-6789",
                "078-05-1120",
                f"{r.randint(100, 899)}-00-{r.randint(1000, 9999)}",
            ]
        ),
    ),
    "zip_plus_4": lambda r: ("Mail it to Madison, WI {v}.", f"{r.randint(10000, 99999)}-{r.randint(1000, 9999)}"),
    "identifier": lambda r: (
        "Call {v} first.",
        r.choice(
            ["AbstractSingletonProxyFactoryBean", "getElementById", "XMLHttpRequestUpload2", "numpy.linalg.eigvalsh"]
        ),
    ),
}


def planted_value(entity: str, rng: random.Random) -> tuple[str, str]:
    """(template, value) of one planted entity of type `entity`."""
    if entity == "API_KEY":
        return api_key(rng)
    if entity == "PASSWORD":
        return password(rng)
    if entity == "IP_ADDRESS":
        address = ip_address(rng)
        if ":" not in address and rng.random() < 0.2:
            return "Connect to {v}:8443 first.", address  # the port is not part of the value
        return rng.choice(TEMPLATES[entity]), address
    value = {
        "EMAIL": email,
        "PHONE": phone,
        "CREDIT_CARD": card_number,
        "IBAN": iban,
        "IP_ADDRESS": ip_address,
        "US_SSN": ssn,
        "CRYPTO": bitcoin_address,
        "PRIVATE_KEY": private_key,
        "SECRET": secret_token,
    }[entity](rng)
    return rng.choice(TEMPLATES[entity]), value


@dataclass
class LabelledText:
    """A carrier passage with one value inserted; `label` is its entity type or near-miss kind."""

    text: str
    label: str
    start: int
    end: int
    near_miss: bool = False
    value: str = field(default="", repr=False)


def insert(carrier: str, template: str, value: str, rng: random.Random, label: str, near_miss: bool) -> LabelledText:
    """`template` with `value`, inserted at a sentence boundary of `carrier` (or at its end)."""
    boundaries = [m.end() for m in re.finditer(r"[.!?] ", carrier)] + [len(carrier)]
    # A private key without its END line stands for a document cut off in the middle of one.
    at = len(carrier) if label == "PRIVATE_KEY" and "-----END" not in value else rng.choice(boundaries)
    head, tail = carrier[:at], carrier[at:]
    sep = "" if not head or head.endswith(" ") else " "
    phrase = template.replace("{v}", "\0")
    start = len(head) + len(sep) + phrase.index("\0")
    text = head + sep + phrase.replace("\0", value) + (" " if tail and not tail.startswith(" ") else "") + tail
    return LabelledText(text, label, start, start + len(value), near_miss, value)


def labelled_set(carriers: list[str], per_type: int, near_misses: int, seed: int) -> list[LabelledText]:
    rng = random.Random(seed)
    items = []
    for entity in SANITIZE_ENTITIES:
        for _ in range(per_type):
            template, value = planted_value(entity, rng)
            items.append(insert(rng.choice(carriers), template, value, rng, entity, False))
    for kind, make in NEAR_MISSES.items():
        for _ in range(near_misses):
            template, value = make(rng)
            items.append(insert(rng.choice(carriers), template, value, rng, kind, True))
    return items


# ----------------------------------------------------------------------------------------- scoring


def score_labelled(sanitizer: Sanitizer, items: list[LabelledText]) -> dict[str, Any]:
    """Per type: planted, recall, removed, detections, precision; per near-miss kind: share replaced."""
    planted: Counter[str] = Counter()
    recalled: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    detected: Counter[str] = Counter()
    true_pos: Counter[str] = Counter()
    confusions: Counter[tuple[str, str]] = Counter()
    near: Counter[str] = Counter()
    near_hit: Counter[str] = Counter()
    false_examples: dict[str, list[str]] = defaultdict(list)
    leaked = 0
    for item in items:
        detections = sanitizer.detect(item.text)
        covered = any(d.start <= item.start and d.end >= item.end for d in detections)
        overlapping = [d for d in detections if d.start < item.end and d.end > item.start]
        if item.near_miss:
            near[item.label] += 1
            near_hit[item.label] += bool(overlapping)
            if overlapping and len(false_examples[item.label]) < 5:
                false_examples[item.label].append(f"{item.value} -> {overlapping[0].entity}")
        else:
            planted[item.label] += 1
            removed[item.label] += covered
            recalled[item.label] += any(
                d.entity == item.label and d.start <= item.start and d.end >= item.end for d in detections
            )
            leaked += item.value in sanitizer.sanitize(item.text).text
            for d in overlapping:
                if d.entity != item.label:
                    confusions[(item.label, d.entity)] += 1
        for d in detections:
            detected[d.entity] += 1
            if not item.near_miss and d.entity == item.label and d.start < item.end and d.end > item.start:
                true_pos[d.entity] += 1
            elif len(false_examples[d.entity]) < 5:
                false_examples[d.entity].append(item.text[max(0, d.start - 30) : d.end + 30].replace("\n", " "))
    per_type = {
        entity: {
            "planted": planted[entity],
            "recall": recalled[entity] / planted[entity] if planted[entity] else None,
            "removed": removed[entity] / planted[entity] if planted[entity] else None,
            "detections": detected[entity],
            "precision": true_pos[entity] / detected[entity] if detected[entity] else None,
        }
        for entity in SANITIZE_ENTITIES
    }
    near_misses = {kind: {"values": near[kind], "replaced": near_hit[kind] / near[kind]} for kind in near}
    return {
        "per_type": per_type,
        "near_misses": near_misses,
        "planted": sum(planted.values()),
        "leaked_values": leaked,
        "confusions": {f"{a} as {b}": n for (a, b), n in sorted(confusions.items())},
        "false_examples": dict(false_examples),
    }


def scan_unmodified(sanitizer: Sanitizer, documents: list[Document]) -> dict[str, Any]:
    """Replacements on a collection as it is: counts by type and every one with its context."""
    counts: Counter[str] = Counter()
    examples: list[dict[str, str]] = []
    changed = 0
    for doc in documents:
        text = doc.full_text
        detections = sanitizer.detect(text)
        changed += bool(detections)
        for d in detections:
            counts[d.entity] += 1
            context = (
                text[max(0, d.start - 40) : d.start] + "[[" + text[d.start : d.end] + "]]" + text[d.end : d.end + 40]
            )
            examples.append({"doc_id": doc.doc_id, "entity": d.entity, "context": context.replace("\n", " ")})
    return {
        "documents": len(documents),
        "documents_changed": changed,
        "replacements": sum(counts.values()),
        "per_1000_documents": 1000 * sum(counts.values()) / max(len(documents), 1),
        "counts": dict(sorted(counts.items())),
        "examples": examples,
    }


def throughput(sanitizers: dict[str, Sanitizer], documents: list[Document], runs: int) -> dict[str, dict[str, float]]:
    """Best time of `runs` passes of each sanitizer over `documents`, the sanitizers taking turns so that
    they share whatever else the machine is doing."""
    megabytes = sum(len(d.full_text.encode()) for d in documents) / 1e6
    best = dict.fromkeys(sanitizers, float("inf"))
    for _ in range(runs):
        for mode, sanitizer in sanitizers.items():
            start = time.perf_counter()
            for doc in documents:
                sanitizer.sanitize_document(doc)
            best[mode] = min(best[mode], time.perf_counter() - start)
    return {
        mode: {"seconds": s, "docs_per_s": len(documents) / s, "mb_per_s": megabytes / s, "megabytes": megabytes}
        for mode, s in best.items()
    }


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    labelled, speed = result["labelled"], result["throughput"]
    near_total = sum(v["values"] for v in labelled["near_misses"].values())
    lines = [
        "# Sanitisation: detection on a labelled set, replacements on unmodified passages, throughput",
        "",
        f"`{result['command']}` at git {result['git_commit']} on {result['machine']['cpu']} "
        f"({result['machine']['cpus']} cores), Presidio {result['versions']['presidio-analyzer']}.",
        "",
        f"## Labelled set: {labelled['planted']} planted values in msmarco passages, {near_total} near misses",
        "",
        "Recall: planted values replaced under their own type; removed: replaced under any type (the value is "
        "gone); precision: detections of the type that are a planted value of the type.",
        "",
        row("type", "planted", "recall", "removed", "detections", "precision"),
        row("---", "---:", "---:", "---:", "---:", "---:"),
    ]
    for entity, r in labelled["per_type"].items():
        lines.append(
            row(entity, r["planted"], share(r["recall"]), share(r["removed"]), r["detections"], share(r["precision"]))
        )
    lines += [
        "",
        f"Planted values still present verbatim after sanitising: {labelled['leaked_values']}.",
        "",
        row("near miss (must stay)", "values", "share replaced"),
        row("---", "---:", "---:"),
    ]
    lines += [row(kind, r["values"], share(r["replaced"])) for kind, r in labelled["near_misses"].items()]
    if labelled["confusions"]:
        confusions = ", ".join(f"{k}: {v}" for k, v in labelled["confusions"].items())
        lines += ["", f"Typed otherwise: {confusions}."]
    lines += [
        "",
        "## Replacements on unmodified collections",
        "",
        row("collection", "documents", "changed", "replacements", "per 1,000 docs", "by type"),
        row("---", "---:", "---:", "---:", "---:", "---"),
    ]
    for name, scan in result["unmodified"].items():
        by_type = ", ".join(f"{k} {v}" for k, v in scan["counts"].items()) or "none"
        per_1000 = f"{scan['per_1000_documents']:.1f}"
        lines.append(row(name, scan["documents"], scan["documents_changed"], scan["replacements"], per_1000, by_type))
    for name, scan in result["unmodified"].items():
        if scan["examples"]:
            lines += ["", f"Every replacement in {name} (the replaced span in [[ ]]):", ""]
            lines += [f"- {e['entity']}: `{e['context'].replace('`', ' ')}`" for e in scan["examples"]]
    megabytes = speed["redact"]["megabytes"]
    lines += [
        "",
        f"## Throughput on {result['throughput_collection']} ({megabytes:.2f} MB, one thread, "
        f"best of {result['runs']})",
        "",
        row("mode", "documents/s", "MB/s"),
        row("---", "---:", "---:"),
    ]
    lines += [row(mode, f"{speed[mode]['docs_per_s']:.0f}", f"{speed[mode]['mb_per_s']:.2f}") for mode in speed]
    lines += [
        "",
        f"First Sanitizer built in {result['first_build_s']:.2f} s (importing Presidio included), "
        f"later ones in {result['next_build_s']:.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", type=Path, default=[DATASETS / "msmarco-5k", DATASETS / "cranfield"])
    parser.add_argument("--per-type", type=int, default=200)
    parser.add_argument("--near-misses", type=int, default=80)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sanitize")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    redact = Sanitizer(SanitizeConfig(mode="redact"))
    first_build = time.perf_counter() - start
    start = time.perf_counter()
    hashed = Sanitizer(SanitizeConfig(mode="hash"), salt=b"benchmark salt, not a secret")
    next_build = time.perf_counter() - start

    collections = {path.name: load_documents(path / "corpus.jsonl", skip_empty=True) for path in args.datasets}
    unmodified = {name: scan_unmodified(redact, docs) for name, docs in collections.items()}
    print(json.dumps({k: v["counts"] for k, v in unmodified.items()}), file=sys.stderr)

    first = next(iter(collections))
    flagged = {e["doc_id"] for e in unmodified[first]["examples"]}
    carriers = [d.text for d in collections[first] if d.doc_id not in flagged and len(d.text) > 80]
    items = labelled_set(carriers, args.per_type, args.near_misses, args.seed)
    labelled = score_labelled(redact, items)

    speed = throughput({"redact": redact, "hash": hashed}, collections[first], args.runs)
    result = {
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": {
            **library_versions(),
            **{name: version(name) for name in ("presidio-analyzer", "phonenumbers", "tldextract")},
        },
        "seed": args.seed,
        "per_type": args.per_type,
        "runs": args.runs,
        "first_build_s": first_build,
        "next_build_s": next_build,
        "labelled": labelled,
        "unmodified": unmodified,
        "throughput_collection": first,
        "throughput": speed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "sanitize.json", result)
    write_text_atomic(args.out / "sanitize.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
