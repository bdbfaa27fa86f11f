import json
import math

import pytest

from ragsae.bench import (
    BenchConfig,
    apply_setting,
    evaluate,
    load_beir,
    parse_sweep,
    run_benchmark,
    sweep_stem,
    to_document_run,
)
from ragsae.config import BuildConfig
from ragsae.provenance import command_line, machine


def test_evaluate_matches_hand_computed_values():
    qrels = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
    run = {"q1": {"d2": 2.0, "d1": 1.0}, "q2": {}}
    result = evaluate(run, qrels)
    assert result["per_query"]["nDCG@10"]["q1"] == pytest.approx(1 / math.log2(3))
    assert result["per_query"]["RR@10"]["q1"] == pytest.approx(0.5)
    assert result["per_query"]["nDCG@10"]["q2"] == 0.0  # nothing retrieved still counts
    assert result["aggregate"]["nDCG@10"] == pytest.approx((1 / math.log2(3)) / 2)


def test_document_run_keeps_best_passage():
    import numpy as np

    run = to_document_run(np.array([[3.0, 2.0, 1.0, -np.inf]]), np.array([[1, 0, 2, -1]]), ["q"], ["a", "a", "b"])
    assert run == {"q": {"a": 3.0, "b": 1.0}}


def test_sweep_parsing_and_validation():
    settings = parse_sweep(["layer=4,8", "pooling=max,sum"])
    assert settings == [
        {"layer": 4, "pooling": "max"},
        {"layer": 4, "pooling": "sum"},
        {"layer": 8, "pooling": "max"},
        {"layer": 8, "pooling": "sum"},
    ]
    config = apply_setting(BuildConfig(), {"layer": 4, "latents": 1024, "k": 16})
    assert (config.capture.layer, config.sae.num_latents, config.sae.k) == (4, 1024, 16)
    with pytest.raises(ValueError, match="expected NAME=V1,V2"):
        parse_sweep(["depth=3"])
    with pytest.raises(ValueError, match="values must be int"):
        parse_sweep(["layer=four"])
    assert parse_sweep(["max_latents=128,all", "feedback=0"]) == [
        {"max_latents": 128, "feedback": 0},
        {"max_latents": None, "feedback": 0},
    ]
    assert apply_setting(BuildConfig(), {"max_latents": None, "feedback": 0}).scoring.feedback_passages == 0
    assert apply_setting(BuildConfig(), parse_sweep(["auxk=0.125"])[0]).sae.auxk_coef == 0.125
    assert apply_setting(BuildConfig(), parse_sweep(["seed=3"])[0]).sae.seed == 3
    assert apply_setting(BuildConfig(), parse_sweep(["window=384"])[0]).capture.window == 384
    assert sweep_stem("cranfield", ["layer=4,8", "k=16"]) == "cranfield-sweep-layer-k"
    assert sweep_stem("cranfield", []) == "cranfield"
    with pytest.raises(ValueError, match="pooling must be one of"):
        apply_setting(BuildConfig(), {"pooling": "median"})


def test_harness_on_tiny_collection(tiny_collection, tiny_build_config, tmp_path):
    import bm25s
    import ir_measures

    bench = BenchConfig(
        dataset=str(tiny_collection),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        latency_queries=2,
        build=tiny_build_config,
    )
    result = run_benchmark(bench)
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    for key in (
        "collection",
        "dataset",
        "documents",
        "queries",
        "created",
        "command",
        "git_commit",
        "machine",
        "versions",
        "seed",
        "bench_config",
        "wall_seconds",
        "rows",
    ):
        assert key in saved, key
    methods = [row["method"] for row in saved["rows"]]
    assert methods == ["ragsae-sparse", "ragsae-faiss", "ragsae-fused", "bm25", "dense-minilm"]
    for row in saved["rows"]:
        assert set(row["metrics"]) == {"nDCG@10", "R@100", "RR@10"}
        assert set(row["per_query"]["nDCG@10"]) == set(saved["rows"][0]["per_query"]["nDCG@10"])
        mean = sum(row["per_query"]["nDCG@10"].values()) / saved["queries"]
        assert row["metrics"]["nDCG@10"] == pytest.approx(mean)
        assert {"p50_ms", "p95_ms", "batch_queries_per_s"} <= set(row["latency"])
        assert row["index_bytes"]["disk_per_passage"] > 0
    sparse = saved["rows"][0]
    for section, keys in {
        "capture": ("passages_per_s", "tokens_per_s", "seconds"),
        "sae": ("fvu", "mean_l0", "dead_fraction", "train_seconds"),
        "sae_encode": ("tokens_per_s",),
        "index_bytes": ("disk", "memory"),
        "active_latents": ("per_passage", "per_query"),
    }.items():
        for key in keys:
            assert sparse[section][key] is not None, (section, key)
    assert len(result["plots"]) == 3 and all((tmp_path / "out" / p.split("/")[-1]).is_file() for p in result["plots"])
    assert "| bm25 |" in (tmp_path / "out" / "tiny.md").read_text()

    # BM25 figures equal ir-measures on a run computed here independently.
    documents, queries, qrels = load_beir(tiny_collection)
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([d.full_text for d in documents], stopwords="en", show_progress=False), show_progress=False
    )
    ids, scores = retriever.retrieve(
        bm25s.tokenize(list(queries.values()), stopwords="en", show_progress=False),
        k=len(documents),
        show_progress=False,
    )
    run = {
        qid: {documents[i].doc_id: float(s) for i, s in zip(ids[row], scores[row])} for row, qid in enumerate(queries)
    }
    expected = ir_measures.calc_aggregate([ir_measures.parse_measure("nDCG@10")], qrels, run)
    assert saved["rows"][3]["metrics"]["nDCG@10"] == pytest.approx(list(expected.values())[0])

    # A rerun reuses cached activations and SAE: same numbers.
    again = run_benchmark(bench)
    assert again["rows"][0]["metrics"] == saved["rows"][0]["metrics"]


def test_command_line_is_written_as_typed(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/some/where/ragsae/__main__.py", "bench", "data dir", "--sweep", "k=8"])
    assert command_line() == "python -m ragsae bench 'data dir' --sweep k=8"
    monkeypatch.setattr("sys.argv", ["benchmarks/run_bench.py", "data"])
    assert command_line() == "python benchmarks/run_bench.py data"
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/ragsae", "bench", "data"])
    assert command_line() == "ragsae bench data"


def test_git_commit_marks_changed_code(monkeypatch):
    import subprocess

    from ragsae import provenance

    status = {"out": ""}

    def fake_run(args, **kwargs):
        out = "a" * 40 + "\n" if args[1] == "rev-parse" else status["out"]
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert provenance.git_commit() == "a" * 40
    status["out"] = " M ragsae/retrieve.py\n"
    assert provenance.git_commit() == "a" * 40 + "+dirty"


def test_machine_names_the_processor():
    info = machine()
    assert isinstance(info["cpu"], str) and info["cpu"] and info["cpus"] >= 1
