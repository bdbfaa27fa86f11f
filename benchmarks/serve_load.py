"""Load test of `ragsae serve` on 127.0.0.1: throughput and latency of /search and /encode at several
numbers of concurrent clients, with micro-batching on and off, against the same work in one process.

python benchmarks/serve_load.py [--index INDEX | --dataset DIR --docs 300 [--sae SAE]]
    [--concurrency 1,4,16,64] [--requests 200] [--soak 2000] [--max-batch 32] [--max-wait-ms 2]

For each batching setting (`--max-batch` and 1, which turns batching off) the service runs as its own
process (`python -m ragsae.service.cli`, loopback only) and, per endpoint and concurrency c, c clients
each send their next request as soon as the last one answered (closed loop; asyncio + httpx in this
process) until `--requests` have been answered or `--time-limit` seconds passed. Queries are the
collection's, in turn. Recorded: requests/s, p50/p95/p99 latency, errors (any non-200 or failed
request; must be 0), the mean number of requests per micro-batch (from /metrics), the server's
resident memory after each run and after each of `--soak-parts` parts of a `--soak` of mixed requests at
the highest concurrency (`--soak-only on` soaks the batching server alone, with no load runs before).
The service's overhead: each query one at a time through the Python API in this process
(`Index.search`, `Index.encode_queries`) and through each server, taking turns pass by pass
(`--repeats` passes each), p50 over p50.

Without `--index`, the index is built from the first `--docs` documents of `--dataset` with the
default configuration (reusing the SAE at `--sae` when given) in `--index-dir`, and reused from there.
Writes OUTPUT_DIR/serve-load.json and .md, stamped with the command, git commit, machine and versions.
Client and server share the machine's cores, as they would on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ragsae.provenance import command_line, git_commit, library_versions, machine
from ragsae.storage import write_json_atomic, write_text_atomic

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "msmarco-5k"
OMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")
"""Recorded with the results (servers inherit them): on a busy 2-core machine, OpenMP threads that spin
while waiting (GNU OpenMP's default) slowed a process's LLM forward up to twentyfold, `OMP_WAIT_POLICY=PASSIVE` not."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ensure_index(args: argparse.Namespace) -> Path:
    """The index to serve: `--index`, or one built from the first `--docs` documents of `--dataset`."""
    if args.index:
        return Path(args.index)
    folder = Path(args.index_dir or f"indexes/{Path(args.dataset).name}-{args.docs}")
    if (folder / "manifest.json").is_file():
        return folder
    from ragsae.index import Index

    corpus = [json.loads(line) for _, line in zip(range(args.docs), open(Path(args.dataset) / "corpus.jsonl"))]
    print(f"building {folder} from {len(corpus)} documents of {args.dataset}", file=sys.stderr)
    Index.build(corpus, folder, sae=args.sae, progress=True)
    return folder


class Server:
    """`python -m ragsae.service.cli INDEX` on a free loopback port, until closed."""

    def __init__(self, index: Path, max_batch: int, max_wait_ms: float, threads: int | None):
        self.index = index
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "ragsae.service.cli", str(index), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
        argv += ["--max-queue", "1024"] + (["--threads", str(threads)] if threads else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("RAGSAE_API_KEY", None)
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would block the server once full
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        return rss_mb(self.process.pid)

    def output(self) -> str:
        """What the server printed (its warnings and errors), last 3,000 characters."""
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> str:
        """Stop the server; what it printed."""
        self.process.terminate()
        self.process.wait(60)
        printed = self.output()
        self.log.close()
        return printed


def body(endpoint: str, query: str, k: int) -> dict[str, Any]:
    return {"query": query, "k": k} if endpoint == "search" else {"texts": [query]}


async def load(
    url: str, endpoints: list[str], queries: list[str], clients: int, requests: int, k: int, time_limit: float
) -> dict[str, Any]:
    """`clients` closed-loop clients sending `requests` requests in all (endpoints and queries in turn)."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    # Idle connections are dropped after 2 s, before uvicorn closes them (after 5 s): a request sent on a
    # connection the server is closing at that moment would fail with a read error.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    stop_at = time.monotonic() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < stop_at:
            n = sent
            sent += 1
            endpoint = endpoints[n % len(endpoints)]
            start = time.perf_counter()
            try:
                response = await http.post(f"/{endpoint}", json=body(endpoint, queries[n % len(queries)], k))
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": len(errors),
        "error_examples": errors[:3],
        "stopped_by_time_limit": len(latencies) < requests,
    }


def batch_stats(url: str) -> dict[str, float]:
    """Micro-batches so far and the requests they served, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return {
        "batches": found.get("ragsae_batch_requests_count", 0.0),
        "requests": found.get("ragsae_batch_requests_sum", 0.0),
    }


def serve_runs(index: Path, args: argparse.Namespace, queries: list[str]) -> tuple[list[dict[str, Any]], dict]:
    """Both settings (batching on: `--max-batch`; off: 1), each in its own server; the runs of each
    (endpoint, clients) pair take turns between them, so that both see the same machine."""
    batches = {"both": (args.max_batch, 1), "on": (args.max_batch,), "off": (1,)}[args.soak_only or "both"]
    servers: list[Server] = []
    settings: list[dict[str, Any]] = [{"max_batch": b, "runs": [], "soak": None} for b in batches]
    try:
        for max_batch in batches:
            servers.append(Server(index, max_batch, args.max_wait_ms, args.threads))
        for server, setting in zip(servers, settings):
            asyncio.run(load(server.url, ["search", "encode"], queries, 2, 20, args.k, args.time_limit))  # warm-up
            setting["rss_after_warmup_mb"] = server.rss_mb()
        if args.soak_only:
            for server, setting in zip(servers, settings):
                setting["soak"] = soak(server, args, queries)
            return settings, {}
        for endpoint in args.endpoints:
            for clients in args.concurrency:
                for server, setting in zip(servers, settings):
                    before = batch_stats(server.url)
                    run = asyncio.run(
                        load(server.url, [endpoint], queries, clients, args.requests, args.k, args.time_limit)
                    )
                    after = batch_stats(server.url)
                    done = after["batches"] - before["batches"]
                    run.update(
                        endpoint=endpoint,
                        clients=clients,
                        mean_batch_requests=(after["requests"] - before["requests"]) / done if done else None,
                        server_rss_mb=server.rss_mb(),
                    )
                    setting["runs"].append(run)
                    print(row(setting["max_batch"], run), file=sys.stderr)
                    # Kept as it goes: a long run cut short still leaves what it measured.
                    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                    write_json_atomic(Path(args.output_dir) / "serve-load.partial.json", {"settings": settings})
        single = one_at_a_time(servers, settings, args, queries)
        if args.soak:
            for server, setting in zip(servers, settings):
                setting["soak"] = soak(server, args, queries)
    finally:
        for server, setting in zip(servers, settings):
            setting["server_output"] = server.close()
    return settings, single


def soak(server: Server, args: argparse.Namespace, queries: list[str]) -> dict[str, Any]:
    """`--soak` mixed requests at the highest concurrency in five parts, the server's memory after each."""
    clients = max(args.concurrency)
    rss = [server.rss_mb()]
    parts = []
    deadline = time.monotonic() + args.soak_time_limit
    for part in range(args.soak_parts):
        size = args.soak // args.soak_parts + (1 if part < args.soak % args.soak_parts else 0)
        left = deadline - time.monotonic()
        if size == 0 or left <= 0:
            break
        parts.append(asyncio.run(load(server.url, args.endpoints, queries, clients, size, args.k, left)))
        rss.append(server.rss_mb())
    seconds = sum(p["seconds"] for p in parts)
    return {
        "clients": clients,
        "requests": sum(p["requests"] for p in parts),
        "seconds": seconds,
        "throughput_rps": sum(p["requests"] for p in parts) / seconds if seconds else 0.0,
        "errors": sum(p["errors"] for p in parts),
        "error_examples": [e for p in parts for e in p["error_examples"]][:3],
        "rss_mb": rss,
        "rss_before_mb": rss[0],
        "rss_after_mb": rss[-1],
    }


def one_at_a_time(servers: list[Server], settings: list[dict[str, Any]], args: argparse.Namespace, queries: list[str]):
    """The queries one at a time through the Python API in this process and through each server, the
    three taking turns pass by pass so that they see the same machine; p50 and the ratios."""
    import torch

    from ragsae.index import Index

    if args.threads:
        torch.set_num_threads(args.threads)
    index = Index.load(servers[0].index)
    calls = {
        "search": (lambda q: index.search(q, args.k), lambda q: {"query": q, "k": args.k}),
        "encode": (lambda q: index.encode_queries([q]), lambda q: {"texts": [q]}),
    }
    out: dict[str, Any] = {}
    clients = [httpx.Client(base_url=server.url, timeout=300) for server in servers]
    try:
        for endpoint in args.endpoints:
            local, payload = calls[endpoint]
            local(queries[0])  # warm-up: lazily built state
            times: dict[str, list[float]] = {"in_process": [], **{setting_name(s): [] for s in settings}}
            for _ in range(args.repeats):
                # Whole passes take turns, not single queries: torch's idle threads keep their cores busy
                # for a moment after each call, which would slow whichever process goes next.
                for query in queries:
                    start = time.perf_counter()
                    local(query)
                    times["in_process"].append(time.perf_counter() - start)
                for client, setting in zip(clients, settings):
                    for query in queries:
                        start = time.perf_counter()
                        response = client.post(f"/{endpoint}", json=payload(query))
                        times[setting_name(setting)].append(time.perf_counter() - start)
                        if response.status_code != 200:
                            raise RuntimeError(f"/{endpoint}: {response.status_code} {response.text[:300]}")
            stats = {
                name: {"requests": len(t), "p50_ms": 1000 * statistics.median(t), "p95_ms": 1000 * percentile(t, 95)}
                for name, t in times.items()
            }
            for setting in settings:
                name = setting_name(setting)
                stats[name]["over_in_process"] = stats[name]["p50_ms"] / stats["in_process"]["p50_ms"]
            out[endpoint] = stats
    finally:
        for client in clients:
            client.close()
    return out


def setting_name(setting: dict[str, Any]) -> str:
    return "service_batching_on" if setting["max_batch"] > 1 else "service_batching_off"


def row(max_batch: int, run: dict[str, Any]) -> str:
    batching = "on" if max_batch > 1 else "off"
    mean = run["mean_batch_requests"]
    return (
        f"| /{run['endpoint']} | {run['clients']} | {batching} | {run['throughput_rps']:.1f} | {run['p50_ms']:.1f} | "
        f"{run['p95_ms']:.1f} | {run['p99_ms']:.1f} | {'-' if mean is None else f'{mean:.1f}'} | {run['errors']} | "
        f"{run['server_rss_mb']:.0f} |"
    )


def load_tables(result: dict[str, Any]) -> list[str]:
    """The load runs' rows (batching on, then off, per endpoint and clients) and the in-process comparison."""
    lines = []
    on, off = result["settings"]
    for run_on, run_off in zip(on["runs"], off["runs"]):
        lines += [row(on["max_batch"], run_on), row(off["max_batch"], run_off)]
    lines += [
        "",
        "One request at a time, taking turns with the Python API in one process (`Index.search`, "
        "`Index.encode_queries`):",
        "",
        "| endpoint | in process p50 ms | service p50 ms, batching off | service p50 ms, batching on | "
        "service / in process (off, on) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for endpoint, stats in result["one_at_a_time"].items():
        local, off, on = stats["in_process"], stats["service_batching_off"], stats["service_batching_on"]
        lines.append(
            f"| /{endpoint} | {local['p50_ms']:.1f} | {off['p50_ms']:.1f} | {on['p50_ms']:.1f} | "
            f"{off['over_in_process']:.2f}x, {on['over_in_process']:.2f}x |"
        )
    return lines


def report(result: dict[str, Any]) -> str:
    lines = [
        f"## ragsae serve on {result['machine']['cpu']} ({result['machine']['cpus']} cores), loopback",
        "",
        f"Index: {result['index']} ({result['passages']} passages). {result['requests_per_run']} requests per run "
        f"(closed loop), `--max-wait-ms {result['max_wait_ms']}`; batching on = `--max-batch {result['max_batch']}`, "
        "off = `--max-batch 1`.",
        "",
        "| endpoint | clients | batching | req/s | p50 ms | p95 ms | p99 ms | requests/batch | errors | "
        "server RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if not result["one_at_a_time"]:  # --soak-only
        lines = lines[:2] + [f"Index: {result['index']} ({result['passages']} passages); soak only."]
    else:
        lines += load_tables(result)
    for setting in result["settings"]:
        soak = setting["soak"]
        if soak:
            lines.append(
                f"\nSoak, batching {'on' if setting['max_batch'] > 1 else 'off'}: {soak['requests']} mixed requests at "
                f"{soak['clients']} clients, {soak['errors']} errors, server RSS before and after each of "
                f"{len(soak['rss_mb']) - 1} parts "
                f"{' / '.join(f'{mb:.0f}' for mb in soak['rss_mb'])} MB ({soak['throughput_rps']:.1f} req/s)."
            )
    load = result["load_average_1_5_15min"]
    lines += ["", f"Load average (1 min) before / after: {load['before'][0]:.2f} / {load['after'][0]:.2f}."]
    settings = ", ".join(f"{k}={v}" for k, v in result["environment"].items() if v is not None) or "none"
    lines += [f"OpenMP environment: {settings}; torch threads: {result['threads'] or 'default'}."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", help="index folder to serve (default: build one from --dataset)")
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="BEIR folder (default: msmarco-5k)")
    parser.add_argument("--docs", type=int, default=300, help="documents of the index built (default: 300)")
    parser.add_argument("--sae", help="reuse this SAE folder for the index built (default: train one)")
    parser.add_argument("--index-dir", help="where the built index goes (default: indexes/DATASET-DOCS)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="clients per run, comma-separated")
    parser.add_argument("--endpoints", default="search,encode", help="endpoints to load, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (default: 200)")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds at most per run (default: 120)")
    parser.add_argument("--soak", type=int, default=2000, help="mixed requests of the memory check; 0: none")
    parser.add_argument("--soak-time-limit", type=float, default=600, help="seconds at most for the soak")
    parser.add_argument("--soak-parts", type=int, default=5, help="parts of the soak, memory read after each")
    parser.add_argument(
        "--soak-only",
        choices=("on", "off", "both"),
        help="only the soak, of the batching server ('on'), the other ('off') or both: serve-soak.json/.md",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="micro-batch size with batching on (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the service's batching window (default: 2)")
    parser.add_argument("-k", type=int, default=10, help="hits per search (default: 10)")
    parser.add_argument("--threads", type=int, help="torch threads of the server and the in-process runs")
    parser.add_argument(
        "--repeats", type=int, default=3, help="passes over the queries, one at a time, in and out of process"
    )
    parser.add_argument("--output-dir", default="benchmarks/results/serve")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.endpoints = [e for e in args.endpoints.split(",") if e]
    if not set(args.endpoints) <= {"search", "encode"} or min(args.concurrency) < 1 or args.requests < 1:
        parser.error("endpoints are search and encode; concurrency and requests must be >= 1")
    os.environ["HF_HUB_OFFLINE"] = "1"

    index = ensure_index(args)
    with open(Path(args.dataset) / "queries.jsonl", encoding="utf-8") as lines:
        queries = [json.loads(line)["text"] for line in lines if line.strip()]
    load_before = os.getloadavg()
    settings, single = serve_runs(index, args, queries)
    manifest = json.loads((index / "manifest.json").read_text())
    result = {
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": library_versions(),
        "index": str(index),
        "passages": manifest.get("counts", {}).get("passages"),
        "queries": str(Path(args.dataset) / "queries.jsonl"),
        "requests_per_run": args.requests,
        "time_limit_s": args.time_limit,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "k": args.k,
        "threads": args.threads,
        "environment": {name: os.environ.get(name) for name in OMP_VARIABLES},
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "settings": settings,
        "one_at_a_time": single,
    }
    table = report(result)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "serve-soak" if args.soak_only else "serve-load"
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", table)
    (out / "serve-load.partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
