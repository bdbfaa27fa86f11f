"""Shared fixtures: a seeded RNG, a tiny random Llama saved as a local HF folder, toy corpora."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The shared BEIR collections live beside the checkout: ../shared/datasets.
SHARED = Path(os.environ.get("RAGSAE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

TOY_DOCS = [
    {"_id": "csv", "title": "csv", "text": "The csv module reads and writes comma separated value files row by row."},
    {"_id": "json", "title": "json", "text": "The json module encodes and decodes JavaScript Object Notation data."},
    {"_id": "math", "title": "math", "text": "The math module offers square roots, logarithms and trigonometry."},
    {"_id": "time", "title": "time", "text": "The time module reads the clock, sleeps and formats timestamps."},
    {"_id": "zip", "title": "zipfile", "text": "The zipfile module creates, reads and extracts ZIP archives on disk."},
    {"_id": "re", "title": "re", "text": "The re module matches text against regular expression patterns."},
    {"_id": "os", "title": "os", "text": "The os module talks to the operating system: files, processes, environment."},
    {"_id": "sock", "title": "socket", "text": "The socket module opens network connections with TCP and UDP sockets."},
]


@pytest.fixture(scope="session", autouse=True)
def llm_cache_dir(tmp_path_factory):
    """De-quantised GGUF models are cached for this session only (never in the home folder); subprocesses
    (the notebook kernel, CLI runs) inherit the variable."""
    from ragsae.lm.weights_cache import CACHE_DIR_ENV

    folder = tmp_path_factory.mktemp("ragsae-cache")
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from ragsae.lm.loading import DEFAULT_GGUF_FILE, default_gguf_folder

    return AutoTokenizer.from_pretrained(str(default_gguf_folder()), gguf_file=DEFAULT_GGUF_FILE)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 4-layer Llama with the real SmolLM2 tokenizer, saved as a local HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir):
    from ragsae.config import LlmConfig
    from ragsae.lm.loading import load_llm

    # float32 pinned: these tests compare activations and codes exactly, whatever the CPU's bfloat16 support.
    return load_llm(LlmConfig(model=str(tiny_llm_dir), device="cpu", dtype="float32"))


def tiny_config(tiny_llm_dir: Path, **scoring):
    """A BuildConfig for the tiny Llama: layer 2, 32-token windows, a 128-latent SAE trained in seconds."""
    from ragsae.config import BuildConfig, CaptureConfig, LlmConfig, SaeConfig, ScoringConfig

    return BuildConfig(
        llm=LlmConfig(model=str(tiny_llm_dir), device="cpu", dtype="float32"),
        capture=CaptureConfig(layer=2, window=32, overlap=4, batch_size=4),
        sae=SaeConfig(num_latents=128, k=8, epochs=2, batch_size=32, auxk_k=16, dead_after_tokens=64),
        scoring=ScoringConfig(**scoring),
    )


@pytest.fixture
def tiny_build_config(tiny_llm_dir):
    return tiny_config(tiny_llm_dir)


def shared_collection(name: str) -> Path:
    path = SHARED / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"shared collection {path} not found")
    return path


def msmarco_slice(folder: Path, n_queries: int, max_judged: int, fillers: int) -> Path:
    """A BEIR folder with the first judged msmarco-5k queries, their judged passages and unjudged fillers."""
    source = shared_collection("msmarco-5k")
    qrels_rows = (source / "qrels" / "test.tsv").read_text().splitlines()
    qids = []
    for line in qrels_rows:
        qid = line.split("\t")[0]
        if qid.isdigit() and qid not in qids:
            qids.append(qid)
    qids = qids[:n_queries]
    kept_rows = [r for r in qrels_rows if r.split("\t")[0] in qids]
    judged = {r.split("\t")[1] for r in kept_rows}
    corpus = [json.loads(line) for line in open(source / "corpus.jsonl", encoding="utf-8")]
    chosen = [d for d in corpus if d["_id"] in judged][:max_judged] + [d for d in corpus if d["_id"] not in judged][
        :fillers
    ]
    ids = {d["_id"] for d in chosen}
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    queries = [json.loads(line) for line in open(source / "queries.jsonl", encoding="utf-8")]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in qids))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(r + "\n" for r in kept_rows if r.split("\t")[1] in ids)
    )
    return folder


@pytest.fixture
def tiny_collection(tmp_path):
    return msmarco_slice(tmp_path / "tiny", 3, 30, 12)


def warm_load_in_fresh_process(config: str, forward: str, timeout: int) -> dict:
    """Load `LlmConfig(config)` in a fresh interpreter (from the cache the environment names) and run
    `forward` on it (`llm` bound): whether that built the transformers model, and which of transformers'
    modeling modules it imported."""
    import subprocess

    script = (
        "import json, sys, torch\n"
        "from ragsae.config import LlmConfig\n"
        "from ragsae.lm import load_llm\n"
        f"llm = load_llm(LlmConfig({config}))\n"
        f"{forward}\n"
        "modeling = sorted(m for m in sys.modules if m == 'transformers.modeling_utils' or '.modeling_llama' in m)\n"
        "print(json.dumps({'built': llm.model_built, 'modeling': modeling}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_benchmark_script(name: str, folder: str = "benchmarks"):
    """FOLDER/NAME.py (benchmarks/ or research/) imported as module NAME (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """$RAGSAE_CHROMIUM, else the first Chromium on PATH."""
    given = os.environ.get("RAGSAE_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by playwright; the test is skipped, saying why, without either."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests drive Chromium with playwright")
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "no Chromium binary found (looked for $RAGSAE_CHROMIUM and " + ", ".join(CHROMIUM_NAMES) + " on PATH); "
            "install one with scripts/install_browser.sh"
        )
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=binary, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()
