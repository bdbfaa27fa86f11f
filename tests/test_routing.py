"""Routing among several indexes over one LLM (`Collections`), retrieve-or-not in `RAG`, and user profiles,
on the tiny random Llama: what is checked is the mechanics (one capture, each index's own hits, the
threshold, exact equalities), not routing quality, which needs the real model (`benchmarks/routing.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_DOCS, load_benchmark_script, shared_collection, tiny_config

from ragsae import Collections, ConfigError, Index, Profile, QueryError
from ragsae.cli import main
from ragsae.generate import NOT_COVERED, RAG
from ragsae.retrieval.scoring import row_norms
from ragsae.routing import RoutedHit, compute_signature, signature, spherical_kmeans, unit_passages
from ragsae.routing.collections import BACKGROUND_WORDS, choose, pseudo_queries
from ragsae.routing.profile import EXPAND_FRACTION, EXPAND_LATENTS

KITCHEN_DOCS = [
    {"_id": "bread", "text": "Knead the dough for ten minutes, let it rise, then bake the loaf until golden."},
    {"_id": "soup", "text": "Simmer onions, carrots and celery in stock for a clear vegetable soup."},
    {"_id": "rice", "text": "Rinse the rice, add twice its volume of water and cook it covered on low heat."},
    {"_id": "sauce", "text": "Whisk butter into the reduced wine to thicken the sauce before serving."},
    {"_id": "cake", "text": "Cream sugar and butter, fold in flour and eggs, and bake the sponge cake."},
    {"_id": "salad", "text": "Toss the lettuce with olive oil, lemon juice, salt and a little mustard."},
    {"_id": "pasta", "text": "Boil the pasta in salted water and drain it a minute before it is soft."},
    {"_id": "jam", "text": "Cook fruit with sugar until it sets on a cold plate, then jar the jam."},
]
QUERIES = ["How do I read a CSV file?", "How long should bread dough rise?", "open a network socket"]


@pytest.fixture(scope="module")
def indexes(tiny_llm, tiny_llm_dir, tmp_path_factory):
    """Two saved tiny indexes with their own SAEs over one LLM: stdlib-like and kitchen documents."""
    folder = tmp_path_factory.mktemp("routing")
    config = tiny_config(tiny_llm_dir)
    docs = Index.build(TOY_DOCS, folder / "docs", config, llm=tiny_llm)
    kitchen = Index.build(KITCHEN_DOCS, folder / "kitchen", config, llm=tiny_llm)
    return docs, kitchen


@pytest.fixture(scope="module")
def collections(indexes):
    return Collections(list(indexes))


def same_hits(a, b):
    assert [(h.passage_id, h.doc_id, h.rank, h.text, h.latents) for h in a] == [
        (h.passage_id, h.doc_id, h.rank, h.text, h.latents) for h in b
    ]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-6, abs=1e-9)


def test_collections_share_one_llm_and_encode_each_batch_from_one_capture(collections, indexes):
    docs, kitchen = indexes
    assert collections.names == ["docs", "kitchen"] and collections["kitchen"] is kitchen
    assert all(index.llm is collections.llm for _, index in collections)
    before = collections.captures
    codes = collections.encode_queries(QUERIES)
    assert collections.captures == before + 1
    for name, index in collections:  # the same codes as each index's own encoding (its own capture)
        own = index.encode_queries(QUERIES)
        assert codes[name].shape == own.shape and (codes[name] != own).nnz == 0, name
    routing = collections.route(QUERIES)
    assert collections.captures == before + 2
    for name, index in collections:
        own = index.encode_queries(QUERIES)
        weights = index.retriever.scaled(own)
        every = index.retriever.rows(np.arange(len(index.passages)))
        best = np.asarray((weights @ every.T).todense()).argmax(axis=1)  # the best passage, by brute force
        support = index.retriever.support(weights, best)
        expected = np.sqrt(signature(index).match(own) * support)  # signature match and best-passage support
        assert [row[name] for row in routing] == pytest.approx(expected.tolist(), abs=1e-12)
        assert all(0 <= row[name] <= 1 + 1e-9 for row in routing)
    # Routing and searching every index, several queries: still one capture.
    found = collections.batch_search(QUERIES, k=3, route="all")
    assert collections.captures == before + 3
    assert [found[str(i)].routing for i in range(len(QUERIES))] == routing


def test_load_reads_the_llm_once(indexes):
    loaded = Collections.load([indexes[0].path, indexes[1].path], names=["a", "b"])
    assert loaded["a"].llm is loaded["b"].llm
    assert loaded.route(QUERIES[:1])[0] == pytest.approx(Collections(list(indexes), ["a", "b"]).route(QUERIES[:1])[0])


def test_route_all_returns_each_index_own_hits(collections):
    query = QUERIES[0]
    routed = collections.search(query, k=3, route="all")
    assert routed.retrieved and set(routed.chosen) == set(collections.names)
    assert routed.chosen == sorted(collections.names, key=lambda n: -routed.relative[n])
    for name, index in collections:
        same_hits(routed.by_index[name], index.search(query, k=3))
        assert all(isinstance(h, RoutedHit) and h.index == name for h in routed.by_index[name])
    union = {(h.index, h.passage_id, h.score) for hits in routed.by_index.values() for h in hits}
    assert len(routed.hits) == 3 and {(h.index, h.passage_id, h.score) for h in routed.hits} <= union
    # Merged by rank: the rank-1 hits first, the best-routed index's before the other's.
    assert [(h.index, h.rank) for h in routed.hits[:2]] == [(routed.chosen[0], 1), (routed.chosen[1], 1)]


def test_route_best_and_top_n_follow_the_scores_relative_to_each_background(collections):
    for query in QUERIES:
        best = collections.search(query, k=2, route="best")
        winner = max(collections.names, key=lambda n: best.relative[n])
        assert best.chosen == [winner] and {h.index for h in best.hits} == {winner}
        same_hits(best.hits, collections[winner].search(query, k=2))
        assert collections.search(query, k=2, route="top-n", n=1).chosen == [winner]
        assert collections.search(query, k=2, route="top-n", n=2).chosen == sorted(
            collections.names, key=lambda n: -best.relative[n]
        )
    # The threshold drops the indexes under it, whatever the route.
    assert choose({"a": 0.3, "b": 0.1, "c": 0.2}, "all", 2, 0.15) == ["a", "c"]
    assert choose({"a": 0.3, "b": 0.1}, "top-n", 5, 0.0) == ["a", "b"]
    assert choose({"a": 0.3, "b": 0.1}, "best", 1, 0.5) == []
    # Ranked by the order given (relative scores), filtered by the plain scores.
    assert choose({"a": 0.3, "b": 0.2, "c": 0.1}, "all", 2, 0.15, {"a": 1.0, "b": 2.0, "c": 9.0}) == ["b", "a"]
    with pytest.raises(QueryError, match="route must be one of"):
        collections.search(QUERIES[0], route="nearest")
    with pytest.raises(QueryError, match="threshold"):
        collections.search(QUERIES[0], threshold=float("nan"))


def test_backgrounds_are_each_index_mean_score_for_the_other_indexes_pseudo_queries(collections, indexes):
    docs, kitchen = indexes
    before = collections.captures
    backgrounds = collections.backgrounds()
    assert collections.captures == before  # the pseudo-queries' capture is not a query's
    for name, other in (("docs", kitchen), ("kitchen", docs)):
        pseudo = pseudo_queries(other)
        assert pseudo and all(0 < len(text.split()) <= BACKGROUND_WORDS for text in pseudo)
        expected = np.mean([row[name] for row in collections.route(pseudo)])
        assert backgrounds[name] == pytest.approx(expected, rel=1e-9)
    assert collections.backgrounds() is backgrounds  # kept while no index changes
    routed = collections.search(QUERIES[0], k=2, route="all")
    assert routed.relative == pytest.approx({n: routed.routing[n] / backgrounds[n] for n in collections.names})
    assert routed.to_dict()["relative"] == routed.relative
    # One index: nothing to compare with, ranked by its plain score.
    single = Collections([docs])
    assert single.backgrounds() is None and single.search(QUERIES[0], k=1).relative == {}


def test_backgrounds_are_measured_again_after_an_index_changes(tiny_llm, tiny_llm_dir, tmp_path):
    config = tiny_config(tiny_llm_dir)
    docs = Index.build(TOY_DOCS, tmp_path / "docs", config, llm=tiny_llm)
    kitchen = Index.build(KITCHEN_DOCS, tmp_path / "kitchen", config, llm=tiny_llm)
    both = Collections([docs, kitchen])
    first = both.backgrounds()
    docs.add([{"_id": "late", "text": "The kitchen timer rings when the bread is baked and the oven is hot."}])
    second = both.backgrounds()
    assert second is not first and second["kitchen"] != first["kitchen"]  # docs' pseudo-queries changed


def test_threshold_above_every_score_retrieves_nothing_and_rag_says_so(collections, indexes):
    question = "Which module reads ZIP archives?"
    scores = collections.route([question])[0]
    over = max(scores.values()) + 0.01
    routed = collections.search(question, k=2, route="all", threshold=over)
    assert not routed.retrieved and routed.hits == [] and routed.by_index == {}
    assert routed.routing == pytest.approx(scores)
    answer = RAG(collections, k=2, max_new_tokens=4, threshold=over).ask(question)
    assert not answer.retrieved and not answer.answered
    assert answer.text == NOT_COVERED and answer.hits == [] and answer.citations == [] and answer.prompt == ""
    assert answer.routing == pytest.approx(scores)
    assert "Sources:" not in answer.format() and "Routing:" in answer.format()
    streamed = list(RAG(collections, k=2, threshold=over).stream(question))
    assert streamed[0] == NOT_COVERED and not streamed[-1].retrieved
    # One index: retrieve-or-not by its own signature.
    alone = RAG(indexes[0], k=2, max_new_tokens=4, threshold=1.5).ask(question)
    assert not alone.retrieved and alone.routing is not None and set(alone.routing) == {"docs"}
    # Under the threshold, the question is answered from the best-routed index, passages tagged.
    answered = RAG(collections, k=2, max_new_tokens=4).ask(question)
    assert answered.retrieved and answered.routing == pytest.approx(scores)
    best = max(scores, key=scores.get)
    assert [h.index for h in answered.hits] == [best, best] and answered.prompt.count("[end of") == 2
    plain = RAG(indexes[0], k=2, max_new_tokens=4).ask(question)
    assert plain.retrieved and plain.routing is None


def test_collections_refuse_indexes_that_capture_queries_differently(indexes, tiny_llm, tiny_llm_dir):
    import dataclasses

    config = tiny_config(tiny_llm_dir)
    other = dataclasses.replace(config, capture=dataclasses.replace(config.capture, query_prefix="Query: "))
    odd = Index.build(KITCHEN_DOCS, None, other, sae=indexes[1].sae, llm=tiny_llm)
    with pytest.raises(ConfigError, match="query_prefix"):
        Collections([indexes[0], odd], names=["docs", "odd"])
    with pytest.raises(ConfigError, match="distinct"):
        Collections(list(indexes), names=["same", "same"])
    with pytest.raises(ConfigError, match="at least one"):
        Collections([])


def test_profile_weight_zero_is_exactly_the_plain_search(indexes):
    docs, kitchen = indexes
    profile = Profile.from_passages(docs, ["csv", "json"])
    assert profile.items == 2 and profile.mass == 2 and len(profile.latents) > 0
    for query in QUERIES:
        assert docs.search(query, k=5, profile=profile, weight=0) == docs.search(query, k=5)
    assert docs.batch_search(QUERIES, k=4, profile=profile, weight=0) == docs.batch_search(QUERIES, k=4)
    codes = docs.encode_queries(QUERIES)
    assert profile.reweight(docs, codes, 0) is codes
    boosted = profile.reweight(docs, codes, 2.0).toarray()
    plain, p = codes.toarray(), profile.dense()
    own = plain > 0  # the query's own latents: scaled by 1 + 2 p_j / max(p), or raised to the added value
    factor = boosted[own] / plain[own]
    assert factor.min() >= 1 - 1e-6 and (factor > 1 + 1e-6).any()
    strongest = profile.latents[np.argsort(-profile.values, kind="stable")[:EXPAND_LATENTS]]
    for row in range(len(QUERIES)):
        gained = np.flatnonzero(~own[row] & (boosted[row] > 0))  # latents the query lacked
        assert set(gained) <= set(strongest.tolist()) and len(gained) > 0
        expected = 2.0 * EXPAND_FRACTION * p[gained] / p.max() * plain[row].max()
        np.testing.assert_allclose(boosted[row, gained], expected, rtol=1e-5)
    assert docs.search(QUERIES[0], k=5, profile=profile, weight=2.0)  # runs, re-weighted
    with pytest.raises(QueryError, match="weight"):
        docs.search(QUERIES[0], profile=profile, weight=-1)
    with pytest.raises(QueryError, match="another"):
        kitchen.search(QUERIES[0], profile=profile)
    with pytest.raises(QueryError, match="no live passage or document"):
        Profile.from_passages(docs, ["no-such-id"])


def test_profile_update_weights_by_count_or_decay(indexes):
    docs, _ = indexes
    together = Profile.from_passages(docs, ["csv", "json", "math"])
    stepwise = Profile.from_passages(docs, ["csv"]).update(docs, ["json", "math"])
    assert stepwise.items == 3 and stepwise.mass == pytest.approx(3)
    np.testing.assert_allclose(stepwise.dense(), together.dense(), rtol=1e-12, atol=1e-15)
    first, second = Profile.from_passages(docs, ["csv", "json"]), Profile.from_passages(docs, ["math"])
    decayed = Profile.from_passages(docs, ["csv", "json"], decay=0.5).update(docs, ["math"])
    expected = (0.5 * 2 * first.dense() + second.dense()) / (0.5 * 2 + 1)
    np.testing.assert_allclose(decayed.dense(), expected, rtol=1e-12, atol=1e-15)
    assert decayed.mass == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="decay"):
        Profile.from_passages(docs, ["csv"], decay=0)


def test_profile_round_trip_and_refusal_of_damaged_or_mismatched_files(indexes, tmp_path):
    docs, kitchen = indexes
    profile = Profile.from_passages(docs, ["csv", "zip"], decay=0.9).update(docs, ["re"])
    path = profile.save(tmp_path / "user.json")
    assert [p.name for p in tmp_path.iterdir()] == ["user.json"]  # written atomically, nothing left over
    loaded = Profile.load(path, docs)
    np.testing.assert_array_equal(loaded.latents, profile.latents)
    np.testing.assert_array_equal(loaded.values, profile.values)
    assert (loaded.mass, loaded.decay, loaded.items, loaded.sae_fingerprint) == (
        profile.mass,
        profile.decay,
        profile.items,
        profile.sae_fingerprint,
    )
    assert docs.search(QUERIES[0], k=4, profile=loaded, weight=1.5) == docs.search(
        QUERIES[0], k=4, profile=profile, weight=1.5
    )
    # The SAE's fingerprint is the same once the index is loaded again.
    reopened = Index.load(docs.path, llm=docs.llm)
    assert Profile.load(path, reopened).sae_fingerprint == profile.sae_fingerprint
    with pytest.raises(QueryError, match="another"):
        Profile.load(path, kitchen)

    data = json.loads(path.read_text())

    def write(name: str, content: str) -> Path:
        target = tmp_path / name
        target.write_text(content)
        return target

    def resealed(**changes) -> str:
        from ragsae.storage import json_checksum

        changed = {**data, **changes}
        changed["checksum"] = json_checksum(changed)
        return json.dumps(changed)

    edited = dict(data, values=[v * 2 for v in data["values"]])
    with pytest.raises(ConfigError, match="checksum"):
        Profile.load(write("edited.json", json.dumps(edited)))
    with pytest.raises(ConfigError, match="malformed JSON"):
        Profile.load(write("cut.json", path.read_text()[:40]))
    with pytest.raises(ConfigError, match="format_version"):
        Profile.load(write("future.json", resealed(format_version=99)))
    with pytest.raises(ConfigError, match="'values' has"):
        Profile.load(write("short.json", resealed(values=data["values"][:-1])))
    with pytest.raises(ConfigError, match="'values' must be finite"):
        Profile.load(write("nan.json", resealed(values=[float("nan")] + data["values"][1:])))
    with pytest.raises(ConfigError, match="'latents' must lie"):
        Profile.load(write("wide.json", resealed(latents=data["latents"][:-1] + [data["num_latents"]])))
    with pytest.raises(ConfigError, match="sae.fingerprint"):
        Profile.load(write("nosae.json", resealed(sae={"version": 1})))
    with pytest.raises(ConfigError, match="missing"):
        Profile.load(tmp_path / "absent.json")


def test_signature_is_cached_per_generation_and_renewed_after_add(indexes, tiny_llm, tiny_llm_dir):
    index = Index.build(TOY_DOCS[:5], None, tiny_config(tiny_llm_dir), sae=indexes[0].sae, llm=tiny_llm)
    first = signature(index)
    assert signature(index) is first and first.generation == index.generation and first.passages == 5
    index.add(TOY_DOCS[5:])
    added = signature(index)
    assert added is not first and added.generation == index.generation and added.passages == len(index) == 8
    np.testing.assert_allclose(added.centroids, compute_signature(index).centroids)
    assert added.centroids.shape == (8, index.sae.num_latents) != first.centroids.shape
    # One centroid: the mean of the live passages' unit-length weights.
    units = unit_passages(index.retriever.view)
    assert units.shape[0] == 8 and np.allclose(row_norms(units), 1)
    np.testing.assert_allclose(compute_signature(index, clusters=1).centroids[0], np.asarray(units.mean(axis=0))[0])
    index.delete(["csv"])
    assert signature(index).passages == 7 and signature(index).generation == index.generation


def test_spherical_kmeans_separates_groups_and_is_deterministic():
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    rows = []
    for axis in (0, 5, 9):  # three groups of unit vectors around three latents
        block = np.abs(rng.normal(0, 0.1, (20, 12)))
        block[:, axis] += 1
        rows.append(block / np.linalg.norm(block, axis=1, keepdims=True))
    units = sp.csr_matrix(np.vstack(rows))
    centroids = spherical_kmeans(units, 3)
    assert sorted(int(np.argmax(c)) for c in centroids) == [0, 5, 9]
    np.testing.assert_array_equal(centroids, spherical_kmeans(units, 3))
    assert spherical_kmeans(units[:2], 5).shape == (2, 12)  # no more centroids than rows
    assert spherical_kmeans(units[:0], 5).shape == (0, 12)


def test_cli_routes_among_several_indexes_and_keeps_the_one_index_form(indexes, tmp_path, capsys):
    docs, kitchen = indexes
    args = ["search", "--index", str(docs.path), "--index", str(kitchen.path), QUERIES[1], "-k", "2"]
    assert main([*args, "--route", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["routing"]) == {"docs", "kitchen"} and out["retrieved"]
    assert len(out["hits"]) == 2 and {h["index"] for h in out["hits"]} == {"docs", "kitchen"}
    assert main([*args, "--threshold", "2"]) == 0
    assert "nothing retrieved" in capsys.readouterr().out
    profile = Profile.from_passages(docs, ["csv"]).save(tmp_path / "p.json")
    assert main(["search", str(docs.path), QUERIES[0], "-k", "2", "--json", "--profile", str(profile)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["search", str(kitchen.path), QUERIES[0], "--profile", str(profile)]) == 2
    assert "another" in capsys.readouterr().err
    assert main(["search", str(docs.path), "q", "--index", str(kitchen.path)]) == 2
    assert "only the query" in capsys.readouterr().err


def test_cli_asks_among_several_indexes_and_keeps_the_one_index_form(indexes, capsys):
    docs, kitchen = indexes
    question = "Which module reads ZIP archives?"
    args = ["ask", "--index", str(docs.path), "--index", str(kitchen.path), question, "-k", "2"]
    args += ["--max-new-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("routing: docs ") and ", kitchen " in lines[0] and lines[1] == f"Q: {question}"
    assert "Routing:" not in out  # the routing line is printed once, first
    sources = [line.lstrip("* ") for line in lines if line.lstrip("* ").startswith("[")]
    assert len(sources) == 2 and all(line[4:].startswith(("docs:", "kitchen:")) for line in sources)
    assert main([*args, "--route", "all", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert set(answer["routing"]) == {"docs", "kitchen"} and answer["retrieved"] and len(answer["hits"]) == 2
    expected = RAG(Collections(list(indexes)), k=2, max_new_tokens=4, route="all").ask(question)
    assert answer["answer"] == expected.text
    assert [(h["index"], h["passage_id"]) for h in answer["hits"]] == [(h.index, h.passage_id) for h in expected.hits]
    assert main([*args, "--threshold", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("routing: ") and NOT_COVERED in out and "Sources" not in out
    assert main(["ask", str(docs.path), question, "-k", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out  # one index: as before, no routing
    assert out.startswith(f"Q: {question}\nA: ") and "Sources:" in out
    assert not any(line.lower().startswith("routing") for line in out.splitlines())
    assert main(["ask", str(docs.path), question, "--index", str(kitchen.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragsae ask: error:") and "give only the question" in err
    assert main(["ask", question]) == 2
    assert "give an index folder and a question, or --index" in capsys.readouterr().err


def beir_slice(name: str, folder: Path, n_queries: int, judged_docs: int, fillers: int) -> Path:
    """A BEIR folder with the first judged queries of a shared collection, their judged documents (up
    to `judged_docs`) and unjudged fillers."""
    source = shared_collection(name)
    rows = [r.split("\t") for r in (source / "qrels" / "test.tsv").read_text().splitlines()[1:] if r.strip()]
    qids = list(dict.fromkeys(r[0] for r in rows))[:n_queries]
    judged = list(dict.fromkeys(r[1] for r in rows if r[0] in qids))[:judged_docs]
    corpus = [json.loads(line) for line in open(source / "corpus.jsonl", encoding="utf-8")]
    chosen = [d for d in corpus if d["_id"] in judged] + [d for d in corpus if d["_id"] not in judged][:fillers]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chosen))
    queries = [json.loads(line) for line in open(source / "queries.jsonl", encoding="utf-8")]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in qids))
    kept = "".join("\t".join(r) + "\n" for r in rows if r[0] in qids)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + kept)
    return folder


def test_routing_benchmark_runs_on_a_few_queries(tiny_llm, tiny_llm_dir, tmp_path):
    routing = load_benchmark_script("routing")
    config = tiny_config(tiny_llm_dir)
    paths = {}
    for name, queries, judged in (("msmarco-5k", 4, 20), ("cranfield", 3, 40)):
        data = beir_slice(name, tmp_path / f"{name}-data", queries, judged, 10)
        Index.build(data, tmp_path / name, config, llm=tiny_llm)
        paths[name] = data
    Index.build(TOY_DOCS, tmp_path / "stdlib", config, llm=tiny_llm)
    out = tmp_path / "results"
    code = routing.main(
        [
            *("--msmarco-index", str(tmp_path / "msmarco-5k"), "--cranfield-index", str(tmp_path / "cranfield")),
            *("--stdlib-index", str(tmp_path / "stdlib"), "--msmarco-data", str(paths["msmarco-5k"])),
            *("--cranfield-data", str(paths["cranfield"]), "--limit", "3", "--weights", "0,1"),
            *("--min-judged", "2", "--methods", ",".join(routing.METHODS), "--output-dir", str(out)),
            *("--cache-dir", str(tmp_path / "cache")),
        ]
    )
    assert code == 0
    result = json.loads((out / "routing.json").read_text())
    assert result["queries"] == {"msmarco-5k": 3, "cranfield": 3, "stdlib": 3}
    assert set(result["methods"]) == set(routing.METHODS)
    assert result["methods"]["sae"]["cost"]["captures"] == 1  # one capture per batch of queries, three indexes
    for row in result["methods"].values():
        assert sum(map(sum, row["confusion"]["counts"])) == 9 and 0 <= row["accuracy"] <= 1
    assert len(result["per_query"]) == 9 and result["git_commit"] != ""
    cranfield = result["personalisation"]["cranfield"]
    assert cranfield["queries"] >= 1 and set(cranfield["ndcg@10"]) == {"0.0", "1.0"}
    assert "## Personalisation" in (out / "routing.md").read_text()
