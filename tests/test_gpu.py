"""The GPU path against the CPU path, on the tiny Llama: capture, SAE encoding, a whole index, and FAISS
from GPU memory. Each test needs CUDA (and the FAISS test a GPU build of FAISS) and is skipped without it;
they run on a lent GPU machine (`pytest -m gpu`), never in CI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ragsae import Index
from ragsae.capture import capture
from ragsae.config import LlmConfig
from ragsae.encode import encode_tokens
from ragsae.lm import load_llm
from ragsae.retrieval.backends import FaissBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU and a CUDA build of PyTorch)"),
]

TEXTS = [
    "The csv module reads and writes tabular data in comma-separated files.",
    "Bread dough rises in a warm place until it doubles.",
    "A socket is one end of a network connection.",
    "x",
]
BF16_RELATIVE = 2.0**-7
"""bfloat16 keeps 8 significant bits: one rounding is at most this relative error."""


@pytest.fixture(scope="module")
def gpu_llm(tiny_llm_dir):
    return load_llm(LlmConfig(model=str(tiny_llm_dir), device="cuda", dtype="float32"))


def test_capture_on_the_gpu_equals_the_cpu_capture(tiny_llm, tiny_llm_dir, gpu_llm):
    cpu = capture(tiny_llm, TEXTS, [1, 3], batch_invariant=True)
    gpu = capture(gpu_llm, TEXTS, [1, 3], batch_invariant=True)
    for layer in (1, 3):
        assert np.array_equal(cpu[layer].offsets, gpu[layer].offsets)
        np.testing.assert_allclose(gpu[layer].values, cpu[layer].values, rtol=1e-4, atol=1e-4)
    bf16 = load_llm(LlmConfig(model=str(tiny_llm_dir), device="cuda", dtype="bfloat16"))
    low = capture(bf16, TEXTS, [3], batch_invariant=True)[3].values.astype(np.float64)
    exact = cpu[3].values.astype(np.float64)
    scale = np.abs(exact).max()
    # Three blocks of bfloat16 products: the error stays within a few roundings of the largest value.
    assert np.abs(low - exact).max() <= 3 * 8 * BF16_RELATIVE * scale


def test_sae_codes_on_the_gpu_equal_the_cpus(tiny_llm, tiny_llm_dir, tiny_collection):
    index = Index.build(tiny_collection, config=tiny_config(tiny_llm_dir), llm=tiny_llm)
    acts = capture(tiny_llm, TEXTS, [2], batch_invariant=True)[2].values
    cpu_values, cpu_indices = encode_tokens(index.sae, acts)
    gpu_values, gpu_indices = encode_tokens(index.sae.to("cuda"), acts)
    index.sae.cpu()
    same = np.mean(np.sort(cpu_indices, axis=1) == np.sort(gpu_indices, axis=1))
    assert same > 0.99  # ties at the k-th latent may fall either way
    np.testing.assert_allclose(np.sort(gpu_values, axis=1), np.sort(cpu_values, axis=1), rtol=1e-4, atol=1e-5)


def test_an_index_built_on_the_gpu_searches_as_the_cpu_one(tiny_llm, tiny_llm_dir, gpu_llm, tiny_collection):
    config = tiny_config(tiny_llm_dir)
    on_cpu = Index.build(tiny_collection, config=config, llm=tiny_llm)
    gpu_config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, device="cuda"))
    on_gpu = Index.build(tiny_collection, config=gpu_config, sae=on_cpu.sae, llm=gpu_llm)
    for query in TEXTS[:3]:
        assert [h.passage_id for h in on_gpu.search(query, k=5)] == [h.passage_id for h in on_cpu.search(query, k=5)]


def test_faiss_searches_from_gpu_memory_as_on_the_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("needs a GPU build of FAISS (faiss-gpu-cu12) that sees a GPU")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2_000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:20] + 0.01 * rng.standard_normal((20, 64)).astype(np.float32)
    for quantized in (False, True):
        gpu = FaissBackend.build(vectors, use_gpu=True, quantized=quantized)
        cpu = FaissBackend.build(vectors, use_gpu=False, quantized=quantized)
        assert gpu.on_gpu and not cpu.on_gpu
        (gpu_scores, gpu_ids), (cpu_scores, cpu_ids) = gpu.search(queries, 10), cpu.search(queries, 10)
        assert np.mean(gpu_ids == cpu_ids) > 0.95  # float16 on the GPU may swap near ties
        np.testing.assert_allclose(gpu_scores, cpu_scores, atol=2e-3)
