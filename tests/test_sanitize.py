"""Sanitisation (ragsae.text.sanitize, ragsae.text.secrets) with the real Presidio recognizers."""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import string
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import load_benchmark_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragsae.config import SANITIZE_ENTITIES, BuildConfig, SanitizeConfig, from_dict, to_dict
from ragsae.errors import ConfigError, IndexFolderError
from ragsae.text import Audit, Document, Sanitizer, resolve_salt, salt_fingerprint
from ragsae.text.sanitize import Detection, merge_overlaps, read_salt, write_salt

pytest.importorskip("presidio_analyzer")
bench = load_benchmark_script("sanitize")

SALT = b"a test salt of thirty-two bytes!"


@pytest.fixture(scope="module")
def redact() -> Sanitizer:
    return Sanitizer(SanitizeConfig(mode="redact"))


@pytest.fixture(scope="module")
def hashed() -> Sanitizer:
    return Sanitizer(SanitizeConfig(mode="hash"), salt=SALT)


# One sentence per entity type: (type, text, the value in it).
PII = [
    ("EMAIL", "For questions write to maria.garcia@acme-corp.com before Friday.", "maria.garcia@acme-corp.com"),
    ("EMAIL", "Contact: j.smith+news@stats.ox.ac.uk", "j.smith+news@stats.ox.ac.uk"),
    ("PHONE", "Call our office at (212) 555-0143 during business hours.", "(212) 555-0143"),
    ("PHONE", "From abroad dial +44 20 7946 0958, the London desk.", "+44 20 7946 0958"),
    ("PHONE", "Toll free: 1-800-633-4227.", "1-800-633-4227"),
    ("CREDIT_CARD", "The card 4111 1111 1111 1111 was charged twice.", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "Amex 3782-822463-10005 on file.", "3782-822463-10005"),
    ("CREDIT_CARD", "Paid with 5555555555554444 yesterday.", "5555555555554444"),
    ("IBAN", "Please wire the deposit to GB82 WEST 1234 5698 7654 32 today.", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN", "Konto DE89370400440532013000 (SEPA).", "DE89370400440532013000"),
    ("IP_ADDRESS", "Login from 203.0.113.77 was blocked.", "203.0.113.77"),
    ("IP_ADDRESS", "The host 2001:db8:85a3::8a2e:370:7334 stopped answering.", "2001:db8:85a3::8a2e:370:7334"),
    ("US_SSN", "Her social security number, 219-09-9999, was stolen.", "219-09-9999"),
    ("CRYPTO", "Donations go to 1BoatSLRHtKNngkdXEeobR76b53LETtpyT only.", "1BoatSLRHtKNngkdXEeobR76b53LETtpyT"),
]

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
SECRETS = [
    ("API_KEY", "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    (
        "API_KEY",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "API_KEY",
        "cloned with ghp_16C7e42F292c6912E7710c838347Ae178B4a yesterday",
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    ),
    ("API_KEY", "the token glpat-Xb3kT9qLm2Rz7WvN4pYs was rotated", "glpat-Xb3kT9qLm2Rz7WvN4pYs"),
    (
        "API_KEY",
        "bot: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    ("API_KEY", "Stripe key sk_live_4eC39HqLyjWDarjtT1zdp7dc in the repo", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("API_KEY", "maps?key=AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI&q=paris", "AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI"),
    (
        "API_KEY",
        f"jwt {JWT} here",
        JWT,
    ),
    ("API_KEY", 'config = {"api_key": "0123456789abcdef0123456789abcdef"}', "0123456789abcdef0123456789abcdef"),
    ("API_KEY", "Authorization: Bearer abcdefGHIJKL0123456789xyz", "abcdefGHIJKL0123456789xyz"),
    ("PASSWORD", "password=hunter2!", "hunter2!"),
    ("PASSWORD", 'DB_PASSWORD: "correct horse battery"', "correct horse battery"),
    ("PASSWORD", "connect to https://admin:s3cr3tPa55@db.example.com/main", "s3cr3tPa55"),
    ("SECRET", "the session cookie q8Zr5Tk2Lw9Vx3Nb7Hj4Pm6Ys1 expired", "q8Zr5Tk2Lw9Vx3Nb7Hj4Pm6Ys1"),
]

PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA75fakeKEYmaterialXyZ0123456789abcdefABCDEF+/abcdefghij\n"
    "Qm9ndXNLZXlNYXRlcmlhbEZvclRlc3RpbmdPbmx5MDEyMzQ1Njc4OWFiY2RlZmdo\n"
    "-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("entity", "text", "value"), PII + SECRETS, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(PII + SECRETS)]
)
def test_each_type_is_replaced_in_context(redact, entity, text, value):
    result = redact.sanitize(text)
    assert value not in result.text
    assert f"<{entity}>" in result.text, result.text
    assert result.counts == {entity: 1}
    (replacement,) = result.replacements
    assert text[replacement.start : replacement.end] == value
    assert result.text[replacement.new_start : replacement.new_end] == f"<{entity}>"


@pytest.mark.parametrize(
    "block",
    [
        PRIVATE_KEY,
        PRIVATE_KEY.replace("RSA PRIVATE KEY", "OPENSSH PRIVATE KEY"),
        PRIVATE_KEY.replace("\n", " "),  # newlines lost, as in flattened passages
        PRIVATE_KEY.rsplit("\n", 1)[0],  # cut off before its END line
    ],
    ids=["pem", "openssh", "flattened", "cut-off"],
)
def test_private_key_blocks_are_replaced_whole(redact, block):
    result = redact.sanitize(f"The deploy key was pasted here:\n{block}")
    assert result.text == "The deploy key was pasted here:\n<PRIVATE_KEY>"


@pytest.mark.parametrize(
    "text",
    [
        "The card 4111 1111 1111 1112 was declined.",  # Luhn checksum fails
        "Card number 4976 0651 2222 1734 on the receipt.",  # fails too (and is no phone: 16 digits)
        "Wire to GB82 WEST 1234 5698 7654 33 please.",  # IBAN check digits wrong
        "Konto DE89370400440532013001.",
        "SSN 078-05-1120 is the Woolworth sample card.",
        "SSN 000-12-3456 and 666-45-6789 are never issued.",
    ],
)
def test_checksum_and_range_failures_stay(redact, text):
    result = redact.sanitize(text)
    kinds = {r.entity for r in result.replacements}
    assert not kinds & {"CREDIT_CARD", "IBAN", "US_SSN"}, result.text


ORDINARY = [
    "Daniel Gabriel Fahrenheit invented the mercury thermometer in 1714 and the alcohol thermometer in 1709.",
    "See https://en.wikipedia.org/wiki/Charles_de_Gaulle_Airport and https://www.example.com/a/guide.html?page=2.",
    "Upgrade to version 2.0.0.1 (or v1.2.3.4); Python 3.11.2 was released on 2023-04-05 at 10:30.",
    "As described in section 1.2.3.4, the clause applies. ISBN 978-3-16-148410-0 costs $1,234.56.",
    "commit 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b fixed it; request id 123e4567-e89b-12d3-a456-426614174000.",
    "Call getElementsByTagName2 or XMLHttpRequestUpload2 first; the AbstractSingletonProxyFactoryBean stays.",
    "Famciclovir is 2-[2-(2-amino-9H-purin-9-yl)ethyl]-1,3-propanediol diacetate.",
    "Your order #10293847 (ORD-2023-004512) shipped to Madison, WI 53703-1423 on 04/05/2023.",
    "The password must hold 12 characters. Password: the one you chose at sign-up. Token: a small coin.",
    "monotonic increasing (mathematics, of a function) always increasing or remaining constant, and never decreasing.",
    "A Double Cheeseburger has 162g 420 20 31 10 0.5 53 70 1050 44 35 12 2 8 7 2 of nutrients.",
    "The Aviation Glossary :: Convective SIGMET. Jamaica weather :: hurricane season.",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_not_redacted(redact, text):
    assert redact.sanitize(text).text == text


def test_msmarco_passages_are_left_nearly_alone(redact):
    from conftest import shared_collection

    from ragsae.text import load_documents

    documents = load_documents(shared_collection("msmarco-5k") / "corpus.jsonl", skip_empty=True)[:1000]
    results = [redact.sanitize(d.full_text) for d in documents]
    audit = Audit.of(results)
    # The first 1,000 passages quote a handful of business phone numbers and e-mail addresses, which
    # are real values; nothing else may be replaced (benchmarks/sanitize.py lists every one).
    assert set(audit.counts) <= {"PHONE", "EMAIL", "IP_ADDRESS"}
    assert audit.changed <= 10, [r.text for r in results if r.changed]


def test_hash_mode_keeps_equal_values_equal(hashed):
    text = "Mail maria@acme-corp.com, then MARIA@acme-corp.com, not bob@acme-corp.com."
    out = hashed.sanitize(text).text
    placeholders = [part.split(">")[0] for part in out.split("<")[1:]]
    assert len(placeholders) == 3 and all(p.startswith("EMAIL_") and len(p) == 6 + 8 for p in placeholders)
    assert placeholders[0] == placeholders[1] != placeholders[2]
    # Spellings of one phone number or card share a placeholder too (normalised before hashing).
    phones = hashed.sanitize("Call (212) 555-0143 or +1 212-555-0143.").text
    assert phones.count(phones.split("<")[1].split(">")[0]) == 2
    cards = hashed.sanitize("4111 1111 1111 1111 and 4111-1111-1111-1111").text
    assert cards.split(" and ")[0] == cards.split(" and ")[1]


def test_hash_placeholders_depend_on_the_salt_only():
    text = "Contact maria@acme-corp.com about GB82 WEST 1234 5698 7654 32."
    config = SanitizeConfig(mode="hash")
    first = Sanitizer(config, salt=SALT).sanitize(text).text
    assert Sanitizer(config, salt=SALT).sanitize(text).text == first
    other = Sanitizer(config, salt=b"another salt, also 32 bytes long").sanitize(text).text
    assert other != first and other.count("<EMAIL_") == 1
    short = Sanitizer(SanitizeConfig(mode="hash", hash_length=4), salt=SALT).sanitize(text).text
    assert short.split("<EMAIL_")[1][:4] == first.split("<EMAIL_")[1][:4] and short.split("<EMAIL_")[1][4] == ">"


def test_audit_holds_counts_and_never_values(redact):
    texts = [text for _, text, _ in PII + SECRETS] + [f"Key:\n{PRIVATE_KEY}", "nothing to see here"]
    audit = Audit.of(redact.sanitize(t) for t in texts)
    assert audit.texts == len(texts) and audit.changed == len(texts) - 1
    assert audit.counts["EMAIL"] == 2 and audit.counts["PRIVATE_KEY"] == 1 and audit.total == len(texts) - 1
    dumped = json.dumps(audit.to_dict())
    for _, _, value in PII + SECRETS:
        assert value not in dumped
    assert "MIIE" not in dumped and "@" not in dumped
    assert set(audit.to_dict()) == {"texts", "changed", "counts"}
    assert Audit.from_dict(json.loads(dumped)) == audit


def test_audits_merge():
    a = Audit(2, 1, {"EMAIL": 1})
    b = Audit(3, 2, {"EMAIL": 2, "PHONE": 1})
    assert a + b == Audit(5, 3, {"EMAIL": 3, "PHONE": 1}) == a.merge(b)
    assert Audit() + a == a


@pytest.mark.parametrize(
    "data", [[1], {"texts": -1}, {"texts": 1, "counts": {"EMAIL": "2"}}, {"counts": []}, {"changed": True}]
)
def test_a_bad_audit_is_named(data):
    with pytest.raises(IndexFolderError, match="sanitisation audit"):
        Audit.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "mask"}, "mode must be one of"),
        ({"store_text": "partial"}, "store_text must be one of"),
        ({"store_text": "redacted"}, "store_text='redacted' needs mode"),
        ({"mode": "redact", "entities": ("EMAIL", "PERSON")}, "unknown type"),
        ({"mode": "redact", "entities": ()}, "at least one type"),
        ({"mode": "redact", "entities": "EMAIL"}, "entities must be"),
        ({"mode": "hash", "hash_length": 3}, "hash_length must be in"),
        ({"mode": "hash", "hash_length": 65}, "hash_length must be in"),
        ({"mode": "hash", "salt_env": "MY SALT"}, "salt_env must be an environment variable name"),
        ({"queries": "yes"}, "queries must be bool"),
    ],
)
def test_sanitize_config_errors_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SanitizeConfig(**kwargs)


def test_sanitize_config_round_trips_in_build_config():
    config = BuildConfig(sanitize=SanitizeConfig(mode="hash", entities=("EMAIL", "API_KEY"), salt_env="RAGSAE_SALT"))
    data = json.loads(json.dumps(to_dict(config)))  # as a manifest stores it: the tuple becomes a list
    assert BuildConfig.from_dict(data) == config
    old = to_dict(BuildConfig())
    del old["sanitize"]  # a manifest written before sanitisation existed
    assert BuildConfig.from_dict(old).sanitize == SanitizeConfig()
    assert from_dict(SanitizeConfig, {"mode": "redact", "future": 1}).mode == "redact"
    assert SanitizeConfig().stored_text == "full" and SanitizeConfig(mode="redact").stored_text == "redacted"
    assert SanitizeConfig(mode="redact", store_text="none").stored_text == "none"


def test_only_the_chosen_entities_are_replaced():
    sanitizer = Sanitizer(SanitizeConfig(mode="redact", entities=("EMAIL",)))
    text = "Mail maria@acme-corp.com or call (212) 555-0143 with key AKIAIOSFODNN7EXAMPLE."
    assert sanitizer.sanitize(text).text == "Mail <EMAIL> or call (212) 555-0143 with key AKIAIOSFODNN7EXAMPLE."


def test_off_mode_does_not_import_presidio():
    # Presidio imports spaCy and transformers modules (seconds): an index without sanitisation skips it.
    code = (
        "import sys; from ragsae.text import Sanitizer; from ragsae.config import SanitizeConfig; "
        "Sanitizer(SanitizeConfig()).sanitize('a@b.com'); assert 'presidio_analyzer' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_off_mode_changes_nothing_and_needs_no_analyzer():
    sanitizer = Sanitizer(SanitizeConfig())
    assert not sanitizer.enabled and sanitizer._analyzer is None
    text = "Mail maria@acme-corp.com"
    result = sanitizer.sanitize(text)
    assert result.text == text and not result.changed
    doc = Document("d1", text, "title")
    assert sanitizer.sanitize_document(doc)[0] is doc


def test_queries_are_sanitised_unless_turned_off(redact):
    assert redact.sanitize_query("orders of maria@acme-corp.com") == "orders of <EMAIL>"
    raw = Sanitizer(SanitizeConfig(mode="redact", queries=False))
    assert raw.sanitize_query("orders of maria@acme-corp.com") == "orders of maria@acme-corp.com"


def test_documents_are_sanitised_whole_and_offsets_map_back(redact):
    doc = Document("d1", "Write to maria@acme-corp.com or call (212) 555-0143 today.", "Card 4111 1111 1111 1111")
    clean, mapping = redact.sanitize_document(doc)
    assert clean.title == "Card <CREDIT_CARD>"
    assert clean.text == "Write to <EMAIL> or call <PHONE> today."
    assert mapping.text == clean.full_text and mapping.original_length == len(doc.full_text)
    original = doc.full_text
    # A passage cut from the sanitised document maps back to the original span it came from.
    start, end = clean.full_text.index("Write"), clean.full_text.index(" today")
    lo, hi = mapping.original_span(start, end)
    assert original[lo:hi] == "Write to maria@acme-corp.com or call (212) 555-0143"
    # A span edge inside a placeholder takes the whole replaced value.
    inside = clean.full_text.index("<EMAIL>") + 3
    assert mapping.original_span(inside, inside + 1) == (original.index("maria"), original.index(" or call"))
    for r in mapping.replacements:
        assert mapping.original_span(r.new_start, r.new_end) == (r.start, r.end)
    with pytest.raises(ValueError, match="outside"):
        mapping.original_offset(len(clean.full_text) + 1)


def test_overlaps_merge_deterministically():
    detections = [
        Detection("PHONE", 10, 20, 0.4),
        Detection("CREDIT_CARD", 5, 24, 1.0),
        Detection("SECRET", 30, 50, 0.5),
        Detection("API_KEY", 30, 50, 0.8),
        Detection("EMAIL", 60, 70, 1.0),
        Detection("PASSWORD", 55, 62, 0.8),
    ]
    expected = [
        Detection("CREDIT_CARD", 5, 24, 1.0),
        Detection("API_KEY", 30, 50, 0.8),
        Detection("EMAIL", 55, 70, 1.0),  # the union, typed by the best score
    ]
    assert merge_overlaps(detections) == expected
    assert merge_overlaps(reversed(detections)) == expected
    assert merge_overlaps([Detection("B", 0, 5, 1.0), Detection("A", 0, 5, 1.0)]) == [Detection("A", 0, 5, 1.0)]


def test_entropy_scan_tells_random_tokens_from_words():
    from ragsae.text.secrets import looks_random

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits
    tokens = ["".join(rng.choice(alphabet) for _ in range(40)) for _ in range(200)]
    assert sum(map(looks_random, tokens)) >= 195
    for word in [
        "XMLHttpRequestUpload2",
        "COVID19VaccineTracker2021",
        "2-amino-9H-purin-9-yl",
        "a" * 30,
        "9f86d081884c7d659a2feaa0c55ad015",
    ]:
        assert not looks_random(word), word


def test_salt_file_is_private_and_never_replaced(tmp_path, monkeypatch):
    path = tmp_path / "sanitize.salt"
    salt = write_salt(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(salt) == 32
    assert read_salt(path) == salt
    with pytest.raises(IndexFolderError, match="already exists"):
        write_salt(path)
    config = SanitizeConfig(mode="hash")
    assert resolve_salt(config, path) == salt
    assert resolve_salt(config, tmp_path / "new.salt", create=True) != salt
    with pytest.raises(IndexFolderError, match="cannot read"):
        resolve_salt(config, tmp_path / "missing.salt")
    assert resolve_salt(SanitizeConfig(mode="redact"), path) is None
    assert salt_fingerprint(salt) == salt_fingerprint(read_salt(path)) != salt_fingerprint(SALT)
    assert salt.hex() not in salt_fingerprint(salt)


def test_salt_from_the_environment(monkeypatch):
    config = SanitizeConfig(mode="hash", salt_env="RAGSAE_TEST_SALT")
    monkeypatch.delenv("RAGSAE_TEST_SALT", raising=False)
    with pytest.raises(ConfigError, match="RAGSAE_TEST_SALT is not set"):
        Sanitizer(config)
    monkeypatch.setenv("RAGSAE_TEST_SALT", "short")
    with pytest.raises(ConfigError, match="16 bytes or more"):
        resolve_salt(config)
    monkeypatch.setenv("RAGSAE_TEST_SALT", SALT.decode())
    assert resolve_salt(config) == SALT
    assert (
        Sanitizer(config).sanitize("x maria@acme-corp.com").text
        == Sanitizer(SanitizeConfig(mode="hash"), salt=SALT).sanitize("x maria@acme-corp.com").text
    )
    with pytest.raises(ConfigError, match="needs a salt"):
        Sanitizer(SanitizeConfig(mode="hash"))


def test_no_network_is_touched(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sanitisation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    sanitizer = Sanitizer(SanitizeConfig(mode="redact"))  # a new email recognizer: its suffix list too
    assert sanitizer.sanitize("mail maria@acme-corp.co.uk").text == "mail <EMAIL>"


def test_one_sanitizer_serves_threads(redact):
    texts = [text for _, text, _ in PII + SECRETS] * 4
    expected = [redact.sanitize(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(redact.sanitize, texts)) == expected


def test_benchmark_generators_make_valid_and_invalid_values():
    rng = random.Random(0)
    for _ in range(200):
        assert bench.luhn_valid(bench.card_number(rng))
        assert not bench.luhn_valid(bench.card_number(rng, valid=False))
        assert bench.iban_valid(bench.iban(rng))
        assert not bench.iban_valid(bench.iban(rng, valid=False))
    assert bench.iban_valid("GB82 WEST 1234 5698 7654 32") and bench.luhn_valid("4111111111111111")
    items = bench.labelled_set(["First sentence. Second one here."], per_type=3, near_misses=2, seed=0)
    assert {i.label for i in items if not i.near_miss} == set(SANITIZE_ENTITIES)
    assert all(i.text[i.start : i.end] == i.value for i in items)


# ------------------------------------------------------------------------------------ properties

PLAIN_WORDS = ("the", "thermometer", "invented", "in", "1714", "Paris", "order", "was", "shipped", "and", "call")
WORDS = st.sampled_from(PLAIN_WORDS)
VALUES = st.one_of(
    st.builds(bench.email, st.randoms(use_true_random=True)),
    st.builds(bench.card_number, st.randoms(use_true_random=True)),
    st.builds(bench.iban, st.randoms(use_true_random=True)),
    st.builds(bench.ssn, st.randoms(use_true_random=True)),
    st.builds(bench.bitcoin_address, st.randoms(use_true_random=True)),
    st.builds(
        lambda r: "AKIA" + "".join(r.choice(string.ascii_uppercase + "234567") for _ in range(16)),
        st.randoms(use_true_random=True),
    ),
    st.builds(lambda r: "ghp_" + "".join(r.choice(bench.ALNUM) for _ in range(36)), st.randoms(use_true_random=True)),
    st.builds(bench.jwt, st.randoms(use_true_random=True)),
    st.builds(
        lambda r: "IP " + str(bench.ipaddress.IPv4Address(r.getrandbits(32) | 0x01000000)),
        st.randoms(use_true_random=True),
    ),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    parts=st.lists(st.one_of(WORDS, VALUES), min_size=1, max_size=8), sep=st.sampled_from([" ", ", ", ". ", "\n", "; "])
)
def test_sanitised_text_never_holds_a_detected_value(redact, parts, sep):
    text = sep.join(parts)
    result = redact.sanitize(text)
    values = [text[d.start : d.end] for d in redact.detect(text)]
    for value in values:
        assert value not in result.text
    # The text between placeholders is the original's, and offsets map back exactly.
    position = 0
    for r in result.replacements:
        assert result.text[position : r.new_start] == text[result.original_offset(position) : r.start]
        position = r.new_end
    assert result.text[position:] == text[result.original_offset(position) :]
    # The planted structured values are always among the detected ones.
    for part in parts:
        if part.startswith("IP "):
            part = part[3:]
        if part not in PLAIN_WORDS:
            assert part not in result.text, (part, result.text)
