"""Shared fixtures: a seeded RNG, a tiny random Llama saved as a local HF folder, toy corpora."""

from __future__ import annotations

import os
import random
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


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from ragsae.llm import DEFAULT_GGUF_FILE, default_gguf_folder

    return AutoTokenizer.from_pretrained(str(default_gguf_folder()), gguf_file=DEFAULT_GGUF_FILE)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised 4-layer Llama with the real SmolLM2 tokenizer, saved as a local HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir):
    from ragsae.config import LlmConfig
    from ragsae.llm import load_llm

    return load_llm(LlmConfig(model=str(tiny_llm_dir), device="cpu"))


@pytest.fixture
def tiny_build_config(tiny_llm_dir):
    from ragsae.config import BuildConfig, CaptureConfig, LlmConfig, SaeConfig, ScoringConfig

    return BuildConfig(
        llm=LlmConfig(model=str(tiny_llm_dir), device="cpu"),
        capture=CaptureConfig(layer=2, window=32, overlap=4, batch_size=4),
        sae=SaeConfig(num_latents=128, k=8, epochs=2, batch_size=32, auxk_k=16, dead_after_tokens=64),
        scoring=ScoringConfig(),
    )


def shared_collection(name: str) -> Path:
    path = SHARED / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"shared collection {path} not found")
    return path
