"""Personalisation in a simulation: users are topics of a collection, queries are ambiguous words, and a
profile built from a few of a user's documents should rank that user's documents first.

python benchmarks/personalisation.py [--index indexes/msmarco-5k] [--topics 20] [--queries 200]
    [--sizes 1,2,5,10,20] [--weights 0,0.5,1,2,4] [--cache-dir benchmarks/.cache]
    [--output-dir benchmarks/results/personalisation]

The simulation, stated so that it can be judged:
- Users: the index's documents are clustered into `--topics` topics by all-MiniLM-L6-v2 (the mean of
  each document's passage embeddings, spherical k-means), a model independent of ragsae's codes; each
  topic is one user, who reads in it.
- Ambiguous queries: single words (lower-case, alphabetic, 4+ letters, not stopwords) found in 10 to
  200 documents spread over at least 3 topics, of which the user's topic holds at least 3 documents and
  at most half. `--queries` (user, word) pairs are drawn at random (seeded) among all such pairs.
- Relevant: the user's documents that contain the word; the other topics' documents with the word are
  what an unpersonalised search mixes in.
- Profile: `Profile.from_passages` over `size` documents of the user's topic drawn at random among those
  that do not contain the word (what the user read before, not the answer), for each of `--sizes`.
- Scored: `Index.search(word, per_doc=True, profile=p, weight=w)` for each of `--weights` (0 is the plain
  search), the profile's documents taken out of the ranking; nDCG@10 over the pairs.

Writes OUTPUT_DIR/personalisation-INDEX.json and .md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ragsae.bench.baselines import dense_model_path
from ragsae.bench.metrics import evaluate
from ragsae.index import Index
from ragsae.provenance import command_line, git_commit, machine
from ragsae.routing import Profile, spherical_kmeans
from ragsae.storage import save_npy_atomic, write_json_atomic, write_text_atomic
from ragsae.text import STOPWORD_LISTS, fingerprint

WORD = re.compile(r"[a-z]{4,}")
MIN_DOCS, MAX_DOCS, MIN_TOPICS, MIN_USER_DOCS = 10, 200, 3, 3


def document_embeddings(index: Index, cache_dir: Path) -> tuple[list[str], np.ndarray]:
    """(document ids, unit MiniLM vectors): the mean of each live document's passage embeddings (cached by
    the passages' fingerprint, as `routing.py` caches them)."""
    from sentence_transformers import SentenceTransformer

    rows = sorted(r for rs in index.doc_rows.values() for r in rs)
    texts = [index.passages[r].text for r in rows]
    path = cache_dir / "dense" / f"minilm-passages-{fingerprint(texts)[:24]}.npy"
    if not path.is_file():
        model = SentenceTransformer(str(dense_model_path()), device="cpu")
        vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, np.asarray(vectors, dtype=np.float32))
    passages = np.load(path).astype(np.float64)
    position = {r: i for i, r in enumerate(rows)}
    doc_ids = sorted(index.doc_rows)
    docs = np.stack([passages[[position[r] for r in index.doc_rows[d]]].mean(axis=0) for d in doc_ids])
    return doc_ids, docs / np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)


def topics_of(vectors: np.ndarray, topics: int) -> np.ndarray:
    """Topic of each unit row: its nearest centroid of seeded spherical k-means."""
    centroids = spherical_kmeans(sp.csr_matrix(vectors), topics)
    return np.asarray(vectors @ centroids.T).argmax(axis=1)


def ambiguous_pairs(words_of: list[set[str]], topic: np.ndarray) -> list[tuple[int, str]]:
    """Every (user topic, word) pair that makes an ambiguous query (see the module's docstring)."""
    docs_with: dict[str, list[int]] = {}
    for doc, words in enumerate(words_of):
        for word in words:
            docs_with.setdefault(word, []).append(doc)
    pairs = []
    for word in sorted(docs_with):
        docs = docs_with[word]
        if not MIN_DOCS <= len(docs) <= MAX_DOCS:
            continue
        counts = np.bincount(topic[docs], minlength=int(topic.max()) + 1)
        if (counts > 0).sum() < MIN_TOPICS:
            continue
        pairs += [(int(u), word) for u in np.flatnonzero((counts >= MIN_USER_DOCS) & (counts <= len(docs) / 2))]
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default="indexes/msmarco-5k")
    parser.add_argument("--topics", type=int, default=20)
    parser.add_argument("--queries", type=int, default=200, help="(user, word) pairs drawn")
    parser.add_argument("--sizes", default="1,2,5,10,20", help="documents a profile is built from")
    parser.add_argument("--weights", default="0,0.5,1,2,4", help="profile weights (0: plain search)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="benchmarks/.cache")
    parser.add_argument("--output-dir", default="benchmarks/results/personalisation")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    weights = [float(x) for x in args.weights.split(",")]
    index = Index.load(args.index)
    doc_ids, vectors = document_embeddings(index, Path(args.cache_dir))
    topic = topics_of(vectors, args.topics)
    stop = STOPWORD_LISTS["english"]
    texts = [" ".join(index.passages[r].text for r in index.doc_rows[d]).lower() for d in doc_ids]
    words_of = [set(WORD.findall(text)) - stop for text in texts]
    rng = np.random.default_rng(args.seed)
    pairs = ambiguous_pairs(words_of, topic)
    chosen = [pairs[i] for i in np.sort(rng.choice(len(pairs), min(args.queries, len(pairs)), replace=False))]
    queries = {f"{user}:{word}": word for user, word in chosen}
    codes = index.encode_queries(list(queries.values()))
    runs: dict[tuple[int, float], dict[str, dict[str, float]]] = {(n, w): {} for n in sizes for w in weights}
    judged: dict[str, dict[str, int]] = {}
    for row, (qid, word) in enumerate(queries.items()):
        user = int(qid.split(":")[0])
        mine = np.flatnonzero(topic == user)
        judged[qid] = {doc_ids[d]: 1 for d in mine if word in words_of[d]}
        pool = [doc_ids[d] for d in mine if word not in words_of[d]]
        for size in sizes:
            read = sorted(rng.choice(pool, min(size, len(pool)), replace=False).tolist())
            profile = Profile.from_passages(index, read)
            for weight in weights:
                hits = index.batch_search(
                    {qid: word}, 10 + len(read), per_doc=True, profile=profile, weight=weight, codes=codes[row]
                )[qid]
                kept = [h for h in hits if h.doc_id not in set(read)][:10]
                runs[(size, weight)][qid] = {h.doc_id: h.score for h in kept}
    ndcg = {f"{n}:{w}": evaluate(runs[(n, w)], judged)["aggregate"]["nDCG@10"] for n in sizes for w in weights}
    result: dict[str, Any] = {
        "index": str(index.path),
        "documents": len(doc_ids),
        "topics": args.topics,
        "topic_sizes": np.bincount(topic, minlength=args.topics).tolist(),
        "candidate_pairs": len(pairs),
        "queries": len(queries),
        "mean_relevant": float(np.mean([len(j) for j in judged.values()])),
        "sizes": sizes,
        "weights": weights,
        "ndcg@10": ndcg,
        "pairs": [{"user": u, "word": w} for u, w in chosen],
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
    }
    lines = [
        f"## Personalisation: {Path(args.index).name}, users = {args.topics} MiniLM topics",
        "",
        f"{len(queries)} ambiguous one-word queries (of {len(pairs)} candidate (user, word) pairs; "
        f"{result['mean_relevant']:.1f} relevant documents each on average); nDCG@10, profile documents "
        "out of the ranking.",
        "",
        "| profile documents | " + " | ".join(f"w={w:g}" for w in weights) + " |",
        "| --- | " + " | ".join("---:" for _ in weights) + " |",
    ]
    for n in sizes:
        lines.append(f"| {n} | " + " | ".join(f"{ndcg[f'{n}:{w}']:.3f}" for w in weights) + " |")
    lines += ["", f"Command: `{result['command']}` at {result['commit']}", ""]
    table = "\n".join(lines)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.index).name
    write_json_atomic(out / f"personalisation-{name}.json", result)
    write_text_atomic(out / f"personalisation-{name}.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
