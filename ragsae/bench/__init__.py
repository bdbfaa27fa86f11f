"""Benchmarks: BEIR collections, metrics, baselines, sweeps and reports (`ragsae bench`)."""

from .baselines import run_bm25, run_dense
from .beir import load_beir, read_qrels, read_queries
from .metrics import MEASURES, evaluate, percentiles, to_document_run
from .report import markdown_table, plot
from .runner import BenchConfig, cached_sae, run_benchmark, run_ragsae, timed_capture
from .sweep import SWEEP_KEYS, apply_setting, parse_sweep, sweep_stem
from .timing import MethodRun, score, time_methods

__all__ = [
    "MEASURES",
    "SWEEP_KEYS",
    "BenchConfig",
    "MethodRun",
    "apply_setting",
    "cached_sae",
    "evaluate",
    "load_beir",
    "markdown_table",
    "parse_sweep",
    "percentiles",
    "plot",
    "read_qrels",
    "read_queries",
    "run_benchmark",
    "run_bm25",
    "run_dense",
    "run_ragsae",
    "score",
    "sweep_stem",
    "time_methods",
    "timed_capture",
    "to_document_run",
]
