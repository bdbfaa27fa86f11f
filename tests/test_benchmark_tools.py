"""The benchmark tools beside the bench: capture_speed.py, trim_gguf.py and milvus_quality.py (benchmarks/)."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import load_benchmark_script

from ragsae.capture import capture, tokenize
from ragsae.config import LlmConfig
from ragsae.lm.linear import prepack

capture_speed = load_benchmark_script("capture_speed")
trim_gguf = load_benchmark_script("trim_gguf")
milvus_quality = load_benchmark_script("milvus_quality")
scale = load_benchmark_script("scale")
distributed = load_benchmark_script("distributed")
personalisation = load_benchmark_script("personalisation")
gpu = load_benchmark_script("gpu")


def test_capture_speed_compares_trunk_and_hooked_paths(tiny_llm_dir, tiny_collection, tmp_path):
    args = [str(tiny_collection), "--model", str(tiny_llm_dir), "--device", "cpu", "--layers", "3,1"]
    assert capture_speed.main([*args, "--passages", "5", "--queries", "2", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "capture-speed-cpu.json").read_text())
    assert result["passages"] == 5 and result["queries"] == 2
    assert "trunk" in result["agreement"] and set(result["agreement"]["trunk"]) == {"1", "3"}
    for layer in result["agreement"]["trunk"].values():
        assert layer["equal_fraction"] > 0.99 and layer["max_abs_diff"] < 0.05
    for path in ("trunk", "hooked"):
        assert result["tokens_per_s"][path] > 0 and result["query_p50_ms"][path] > 0
    assert "| trunk |" in (tmp_path / "capture-speed-cpu.md").read_text()


def test_capture_speed_also_times_unpacked_weights_in_bfloat16(tiny_llm_dir, tiny_collection, tmp_path):
    if prepack(torch.randn(8, 8).bfloat16()) is None:
        pytest.skip("this PyTorch build cannot prepack bfloat16 weights")
    args = [
        str(tiny_collection),
        "--model",
        str(tiny_llm_dir),
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--layers",
        "3",
    ]
    assert capture_speed.main([*args, "--passages", "3", "--queries", "2", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "capture-speed-cpu.json").read_text())
    assert result["dtype"] == "bfloat16" and set(result["query_p50_ms"]) == {"trunk", "trunk-unpacked", "hooked"}
    # the same kernels, packed or not: both paths agree with the hooked forward identically
    assert result["agreement"]["trunk"] == result["agreement"]["trunk-unpacked"]
    assert all(layer["equal_fraction"] > 0.99 for layer in result["agreement"]["trunk"].values())


def test_capture_speed_refuses_a_model_without_a_trunk(monkeypatch, tiny_llm_dir, tiny_collection, tmp_path):
    monkeypatch.setattr("ragsae.lm.loading.LoadedLlm.trunk", lambda self, layer: None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        capture_speed.main([str(tiny_collection), "--model", str(tiny_llm_dir), "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_trimmed_gguf_keeps_activations_and_only_the_kept_tokens(tmp_path):
    """The bundled GGUF cut to 2 blocks and one sentence's tokens: layer-1 activations of that
    sentence equal the full model's; other tokens' embeddings are zero."""
    from ragsae.lm.loading import DEFAULT_GGUF_FILE, default_gguf_folder, load_llm

    full = load_llm(LlmConfig(device="cpu"))
    text = ["Sparse autoencoders read the residual stream."]
    kept = set(full.tokenizer.all_special_ids) | set(tokenize(full, text, 64, "Document: ")[0][0])
    trim_gguf.write_trimmed(default_gguf_folder() / DEFAULT_GGUF_FILE, tmp_path / "small.gguf", 2, kept)
    small = load_llm(LlmConfig(model=str(tmp_path), gguf_file="small.gguf", device="cpu"))
    assert small.num_layers == 2 and full.num_layers == 30
    a = capture(full, text, [1], 64, 1, "Document: ")[1].values
    b = capture(small, text, [1], 64, 1, "Document: ")[1].values
    assert np.array_equal(a, b)
    embedding = small.model.get_input_embeddings().weight.detach()
    unused = next(t for t in range(1000, 2000) if t not in kept)
    assert float(embedding[unused].abs().sum()) == 0.0
    assert float(embedding[sorted(kept)[-1]].abs().sum()) > 0.0


def test_milvus_quality_compares_top_lists_rank_by_rank():
    """Same list, swapped order, another passage, -inf padding on both sides, a missing hit; only the
    first `top` hits count."""
    scores = np.array([[3, 2, 1, 0.5], [3, 2, 1, 0.5], [3, 2, 1, 0.5], [4, 2, -np.inf, -np.inf]], dtype=np.float32)
    ids = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [1, 2, -1, -1]])
    served_ids = np.array([[5, 6, 7, 9], [6, 5, 7, 8], [5, 6, 9, 8], [1, 2, -1, -1]])
    served_scores = scores + np.array([[0, 0, 0, 9], [0, 0, 0, 0], [0, 0, 0, 0], [0.004, 0, 0, 0]], dtype=np.float32)
    got = milvus_quality.agreement((scores, ids), (served_scores, served_ids), top=3)
    assert got["same_top_ordered"] == 0.5 and got["same_top_set"] == 0.75
    assert got["differing_rows"] == [1, 2]
    assert got["max_score_difference"] == pytest.approx(0.004, rel=1e-3)
    assert got["max_relative_score_difference"] == pytest.approx(0.001, rel=1e-3)
    cut = milvus_quality.agreement((scores, ids), (scores, served_ids), top=1)
    assert cut["same_top_ordered"] == 0.75 and cut["max_score_difference"] == 0.0
    missing = scores.copy()
    missing[0, 2] = -np.inf  # a hit the reference has and the served run lacks
    assert milvus_quality.agreement((scores, ids), (missing, ids), top=3)["max_score_difference"] == np.inf


def test_scale_samples_rows_like_the_real_ones():
    rng = np.random.default_rng(0)
    mask = rng.random((400, 64)) < 0.6 * 0.93 ** np.arange(64)  # skewed latent frequencies
    real = sp.csr_matrix(mask * rng.uniform(1.0, 2.0, mask.shape).astype(np.float32))
    real = sp.vstack([real, sp.csr_matrix(np.ones((40, 64), dtype=np.float32) * 7.0)], format="csr")  # full rows
    synthetic = scale.sample_weights(real, 3000, rng, chunk=700)
    assert synthetic.shape == (3000, 64) and synthetic.dtype == np.float32 and synthetic.has_canonical_format
    assert set(np.diff(synthetic.indptr).tolist()) <= set(np.diff(real.indptr).tolist())
    assert abs(np.diff(synthetic.indptr).mean() - np.diff(real.indptr).mean()) < 1.0
    real_df, got_df = np.diff(real.tocsc().indptr) / 440, np.diff(synthetic.tocsc().indptr) / 3000
    assert np.corrcoef(real_df, got_df)[0, 1] > 0.95
    values = {j: set(real[:, j].data.tolist()) for j in range(64)}
    coo = synthetic.tocoo()
    assert all(v in values[j] for j, v in zip(coo.col.tolist(), coo.data.tolist()))


def test_distributed_estimate_scales_the_shards_stage_down_to_the_reduction_floor():
    same = {"same_nonzeros": True, "max_relative_difference": 0.0, "same_top10": 1.0}
    runs = [
        {"name": "process, 1 thread", "kind": "process", "threads": 1, "total_s": 100.0, **same},
        {
            "name": "ray, 1 worker",
            "kind": "ray",
            "workers": 1,
            "total_s": 110.0,
            "ready_s": 4.0,
            "shards_s": 96.0,
            "reduce_s": 1.0,
            **same,
        },
        {
            "name": "ray, 2 workers",
            "kind": "ray",
            "workers": 2,
            "total_s": 74.0,
            "ready_s": 4.0,
            "shards_s": 60.0,
            "reduce_s": 1.5,
            **same,
        },
    ]
    estimate = distributed.estimate(runs)
    assert estimate["efficiency_1_to_2"] == pytest.approx(0.8)  # 96 / (2 * 60)
    assert estimate["fixed_s"] == pytest.approx(14.0)
    assert estimate["total_s"][4] == pytest.approx(14.0 + 96.0 / (4 * 0.8))
    assert estimate["total_s"][64] == pytest.approx(14.0 + 96.0 / (64 * 0.8))
    assert distributed.estimate(runs[:2]) is None  # needs the 1- and 2-worker runs
    result = {
        "dataset": "d",
        "passages": 10,
        "runs": runs,
        "estimate": estimate,
        "command": "c",
        "commit": "x",
        "machine": {"cpu": "cpu", "cpus": 2},
    }
    table = distributed.markdown(result)
    assert "| ray, 2 workers | 74.0 | 4.0 | 60.0 | 1.5 | 10.0 | 1.35 |" in table


def test_personalisation_pairs_are_words_spread_over_topics_with_a_minority_in_the_users():
    # 12 documents in 4 topics: "engine" is in 10 documents of 3 topics (topic 0 has 4 of them: at most
    # half, at least 3), "pasta" in topic 2 only, "rare" in too few documents.
    topic = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    words = [{"engine"}] * 4 + [{"engine"}] * 3 + [{"engine", "pasta"}] * 3 + [{"rare"}, {"pasta"}]
    pairs = personalisation.ambiguous_pairs(words, topic)
    assert pairs == [(0, "engine"), (1, "engine"), (2, "engine")]


def test_gpu_flop_count_and_agreement(tiny_llm):
    c = tiny_llm.model.config  # hidden 64, intermediate 128, 4 heads, 2 key-value heads
    per_block = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 4 * 64 * 100 / 2
    assert (c.hidden_size, c.intermediate_size) == (64, 128)
    assert gpu.flops_per_token(tiny_llm, 3, 100) == pytest.approx(3 * per_block)
    exact = np.array([[1.0, -2.0], [4.0, 0.5]], dtype=np.float32)
    near = exact * (1 + np.array([[0.001, 0.0], [0.0, 0.1]], dtype=np.float32))
    found = gpu.agreement(exact, near)
    assert found["within_one_rounding"] == 0.75 and found["max_relative_to_scale"] == pytest.approx(0.05 / 4)
