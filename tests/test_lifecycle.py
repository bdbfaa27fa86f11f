"""The living index: add, delete, upsert, compact and retrain, in memory and on disk, checked against a
one-go build; concurrent writers; drift reports."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from ragsae import CorpusError, Index, IndexFolderError
from ragsae.bench.beir import load_beir
from ragsae.layout import LOCK_FILE, MANIFEST_FILE
from ragsae.storage import exclusive_lock


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from conftest import msmarco_slice

    folder = msmarco_slice(tmp_path_factory.mktemp("lifecycle") / "slice", 12, 60, 30)
    return load_beir(folder)


@pytest.fixture(scope="module")
def reference_sae(collection, tiny_llm, tiny_llm_dir):
    """An SAE trained by a build over the whole collection (it carries its reference statistics)."""
    documents, _, _ = collection
    return Index.build(documents, config=tiny_config(tiny_llm_dir), llm=tiny_llm).sae


def results(index: Index, queries: dict[str, str], k: int = 100, mode: str | None = None) -> dict:
    """{qid: [(passage id, score)]}, scores rounded to float32 noise."""
    found = index.batch_search(queries, k=k, mode=mode)
    return {qid: [(h.passage_id, round(h.score, 4)) for h in hits] for qid, hits in found.items()}


def same_ranking(a: dict, b: dict) -> None:
    """Equal scores rank by rank; ids equal wherever the score is not tied with a neighbour."""
    assert a.keys() == b.keys()
    for qid in a:
        assert [s for _, s in a[qid]] == pytest.approx([s for _, s in b[qid]], abs=2e-4), qid
        by_score_a, by_score_b = {}, {}
        for (pa, sa), (pb, sb) in zip(a[qid], b[qid]):
            by_score_a.setdefault(sa, set()).add(pa)
            by_score_b.setdefault(sb, set()).add(pb)
        assert sum(len(v) for v in by_score_a.values()) == len(a[qid])
        assert by_score_a == by_score_b, qid


def test_five_add_batches_equal_a_one_go_build(collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path):
    documents, queries, _ = collection
    config = tiny_config(tiny_llm_dir)
    whole = Index.build(documents, config=config, sae=reference_sae, llm=tiny_llm)
    batches = np.array_split(np.arange(len(documents)), 5)
    grown = Index.build([documents[i] for i in batches[0]], tmp_path / "grown", config, reference_sae, tiny_llm)
    for batch in batches[1:]:
        grown.add([documents[i] for i in batch])
    assert len(grown.segments) == 5 and len(grown) == len(whole)
    for mode in ("sparse", "fused", "faiss"):
        expected = results(whole, queries, mode=mode)
        if mode == "sparse":
            same_ranking(results(grown, queries, mode=mode), expected)
            same_ranking(results(Index.load(tmp_path / "grown", llm=tiny_llm), queries, mode=mode), expected)
        else:  # dense vectors are 8-bit quantised per segment: the same passages, scores to rounding
            got = results(grown, queries, k=10, mode=mode)
            overlap = np.mean([len({p for p, _ in got[q]} & {p for p, _ in expected[q][:10]}) / 10 for q in got])
            assert overlap >= 0.8, (mode, overlap)
    grown.compact()
    assert len(grown.segments) == 1
    same_ranking(results(grown, queries), results(whole, queries))


def test_deleted_documents_never_come_back_and_readded_ids_return_new_text(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path
):
    documents, queries, _ = collection
    index = Index.build(documents, tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    victims = {h.doc_id for hits in index.batch_search(queries, k=3).values() for h in hits}
    assert index.delete(sorted(victims)) >= len(victims)
    for reopened in (index, Index.load(tmp_path / "index", llm=tiny_llm)):
        found = {h.doc_id for hits in reopened.batch_search(queries, k=10_000).values() for h in hits}
        assert not found & victims
        assert reopened.read_manifest(tmp_path / "index")["counts"]["documents"] == len(documents) - len(victims)
    target = sorted(victims)[0]
    old_text = next(d.full_text for d in documents if d.doc_id == target)
    index.add([{"_id": target, "text": "zebra crossing lollipop marmalade zebra crossing"}])
    hits = [h for h in index.search("zebra crossing lollipop marmalade", k=10_000) if h.doc_id == target]
    assert [h.text for h in hits] == ["zebra crossing lollipop marmalade zebra crossing"] != [old_text]
    index.upsert([{"_id": target, "text": "quantum chromodynamics gluon confinement"}])
    texts = [h.text for h in index.search("gluon confinement quantum", k=10_000) if h.doc_id == target]
    assert texts == ["quantum chromodynamics gluon confinement"]
    index.compact()
    reopened = Index.load(tmp_path / "index", llm=tiny_llm)
    assert [h.text for h in reopened.search("gluon", k=10_000) if h.doc_id == target] == texts
    assert not {h.doc_id for h in reopened.search("anything at all", k=10_000)} & (victims - {target})


def test_bad_changes_are_refused_and_change_nothing(collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path):
    documents, _, _ = collection
    index = Index.build(documents[:20], tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    before = (tmp_path / "index" / MANIFEST_FILE).read_bytes()
    with pytest.raises(CorpusError, match="already in the index.*upsert"):
        index.add([documents[0]])
    with pytest.raises(CorpusError, match="no live document"):
        index.delete(["no-such-document"])
    assert index.delete(["no-such-document"], missing_ok=True) == 0
    with pytest.raises(CorpusError, match="appears twice"):
        index.add([{"_id": "twin", "text": "a"}, {"_id": "twin", "text": "b"}])
    assert (tmp_path / "index" / MANIFEST_FILE).read_bytes() == before
    assert len(index) == len(Index.load(tmp_path / "index", llm=tiny_llm))


def hold_lock(path: str, ready, release) -> None:
    with exclusive_lock(Path(path) / LOCK_FILE):
        ready.set()
        release.wait(60)


def test_a_second_writer_gets_a_clear_error_and_readers_see_a_committed_state(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path
):
    documents, _, _ = collection
    index = Index.build(documents[:20], tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=hold_lock, args=(str(tmp_path / "index"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(IndexFolderError, match=rf"another process \(pid {holder.pid}\) is changing"):
            index.add(documents[20:22])
        assert len(Index.load(tmp_path / "index", llm=tiny_llm)) == len(index)  # readers are not blocked
    finally:
        release.set()
        holder.join(60)
    index.add(documents[20:22])
    stale = Index.load(tmp_path / "index", llm=tiny_llm)
    index.delete([documents[20].doc_id])
    with pytest.raises(IndexFolderError, match="changed by another process since it was loaded"):
        stale.add(documents[22:23])


def test_drift_reports_are_kept_and_flag_text_unlike_the_index(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path
):
    documents, _, _ = collection
    index = Index.build(documents[:40], tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    report = index.add(documents[40:])
    assert report["passages"] > 0 and report["fvu"] > 0 and report["divergence_ratio"] is not None
    code = Path(json.__file__).read_text(encoding="utf-8")[:6000]
    odd = index.drift([{"_id": f"code{i}", "text": code[i * 600 : (i + 1) * 600]} for i in range(10)])
    assert odd["divergence"] > report["divergence"]
    assert odd["operation"] == "check" and len(index.history) == 1  # a check is not recorded
    reopened = Index.load(tmp_path / "index", llm=tiny_llm)
    assert reopened.history == index.history
    assert reopened.info()["drift_reports"] == 1


def test_retrain_makes_a_new_sae_version_with_lineage(collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path):
    documents, queries, _ = collection
    index = Index.build(documents, tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    index.delete([documents[0].doc_id])
    record = index.retrain(from_current=True, epochs=1)
    assert record["version"] == 2 and record["parent"] == 1 and record["started_from"] == "v1"
    assert {"kept", "split", "new", "lost"} <= record["comparison"].keys()
    reopened = Index.load(tmp_path / "index", llm=tiny_llm)
    assert reopened.sae_version == 2 and len(reopened.segments) == 1
    assert [v["version"] for v in reopened.info()["sae_versions"]] == [1, 2]
    assert (tmp_path / "index" / "sae" / "v1").is_dir() and (tmp_path / "index" / "sae" / "v2").is_dir()
    assert results(reopened, queries, k=10) == results(index, queries, k=10)
    assert documents[0].doc_id not in reopened.documents
    assert os.listdir(tmp_path / "index" / "segments") == [reopened.segments[0].name.split("/")[1]]


def test_the_cli_changes_an_index_and_reports_drift(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path, capsys
):
    from ragsae.cli import main

    documents, _, _ = collection
    Index.build(documents[:30], tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"_id": d.doc_id, "text": d.full_text}) + "\n" for d in documents[30:40]))
    assert main(["add", str(tmp_path / "index"), str(extra)]) == 0
    out = capsys.readouterr().out
    assert "live in 2 segments" in out and "drift (add," in out
    assert main(["add", str(tmp_path / "index"), str(extra)]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["delete", str(tmp_path / "index"), documents[0].doc_id, documents[31].doc_id]) == 0
    assert "deleted" in capsys.readouterr().out
    assert main(["delete", str(tmp_path / "index"), "nope"]) == 2
    assert main(["compact", str(tmp_path / "index")]) == 0
    assert "merged into 1" in capsys.readouterr().out
    assert main(["drift", str(tmp_path / "index"), "--json", "--plot", str(tmp_path / "drift.png")]) == 0
    history = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert len(history) == 1 and history[0]["operation"] == "add"
    assert (tmp_path / "drift.png").stat().st_size > 1000
    assert main(["info", str(tmp_path / "index")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] and info["counts"]["segments"] == 1 and info["history"]["reports"] == 1
    assert main(["verify", str(tmp_path / "index")]) == 0


def test_readers_load_a_committed_state_while_a_writer_changes_the_index(
    collection, reference_sae, tiny_llm, tiny_llm_dir, tmp_path
):
    """A reader racing a writer (whose commits remove the files the previous manifest named) always
    loads one committed generation whole."""
    import threading

    documents, _, _ = collection
    index = Index.build(documents[:20], tmp_path / "index", tiny_config(tiny_llm_dir), reference_sae, tiny_llm)
    sizes = {index.generation: len(index)}
    loaded: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                reopened = Index.load(tmp_path / "index", llm=tiny_llm)
                loaded.append((reopened.generation, len(reopened)))
            except BaseException as error:  # noqa: BLE001 - collected and asserted below
                errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for start in range(20, 40, 4):
            index.add(documents[start : start + 4])
            sizes[index.generation] = len(index)
            index.compact()  # removes every older segment folder
            sizes[index.generation] = len(index)
    finally:
        done.set()
        reader.join(60)
    assert not errors, errors[:3]
    assert loaded and all(sizes[generation] == size for generation, size in loaded), loaded
