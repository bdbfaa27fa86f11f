import json

import numpy as np
import pytest
from conftest import TOY_DOCS

from ragsae.capture import capture
from ragsae.config import BuildConfig, CaptureConfig, to_dict
from ragsae.encode import passage_activations
from ragsae.errors import IndexFolderError, SaeLoadError
from ragsae.index import Index


@pytest.fixture
def built(tiny_build_config, tiny_llm, tmp_path):
    return Index.build(TOY_DOCS, tmp_path / "idx", tiny_build_config, llm=tiny_llm)


def test_build_writes_a_complete_folder(built, tmp_path):
    folder = tmp_path / "idx"
    assert {p.name for p in folder.iterdir()} == {"manifest.json", "sae", "segments"}
    segment = folder / "segments" / "000001"
    assert {p.name for p in segment.iterdir()} == {
        "codes.npz",
        "dropped.npz",
        "lengths.npy",
        "docids.txt",
        "passages.jsonl",
        "faiss.index",
    }
    assert {p.name for p in (folder / "sae" / "v1").iterdir()} == {"config.json", "model.safetensors", "latents.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["passages"] == len(TOY_DOCS) and manifest["generation"] == 1
    (version,) = manifest["sae"]["versions"]
    assert manifest["layer"] == 2 and version["num_latents"] == 128 and version["started_from"] == "scratch"
    assert {"fvu", "mean_l0", "dead_fraction"} <= set(version["train"])
    assert (segment / "docids.txt").read_text().split() == [d["_id"] for d in TOY_DOCS]
    assert not list(tmp_path.glob(".idx*")), "temporary folders must be gone"


def test_search_returns_hits_with_latents(built):
    hits = built.search("comma separated value files", k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(h.score >= hits[-1].score for h in hits)
    assert hits[0].latents and all(w > 0 for _, w in hits[0].latents)
    # Queries and passages share one encoding path: read with the passage prefix and no stopword removal,
    # a passage's text as a query gets exactly that passage's codes.
    capture = to_dict(built.config.capture)
    plain = CaptureConfig(**{**capture, "query_prefix": capture["passage_prefix"], "query_stopwords": "none"})
    built.encoder.capture = plain
    for row, doc in enumerate(TOY_DOCS[:4]):
        query = built.encode_queries([doc["title"] + "\n" + doc["text"]])
        # Stored values are 8-bit log-scale steps (2.8% apart) clamped at 2**-8: equal up to one step.
        np.testing.assert_allclose(query.toarray(), built.codes[row].toarray(), rtol=0.06, atol=4e-3)


def test_load_round_trip(built, tiny_llm, tmp_path):
    loaded = Index.load(tmp_path / "idx", llm=tiny_llm)
    query = "network sockets"
    for mode in ("sparse", "faiss", "fused"):
        a = built.search(query, k=4, mode=mode)
        b = loaded.search(query, k=4, mode=mode)
        assert [h.passage_id for h in a] == [h.passage_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)


def test_reuse_sae_and_refuse_mismatch(built, tiny_build_config, tiny_llm, tmp_path):
    for reused in (tmp_path / "idx", tmp_path / "idx" / "sae" / "v1"):  # an index (its current SAE) or an SAE
        again = Index.build(TOY_DOCS[:3], None, tiny_build_config, sae=reused, llm=tiny_llm)
        assert len(again) == 3 and again.sae.weights_sha256 == built.sae.weights_sha256
    other_layer = BuildConfig(
        tiny_build_config.llm,
        CaptureConfig(layer=3, window=32, overlap=4),
        tiny_build_config.sae,
        tiny_build_config.scoring,
    )
    with pytest.raises(SaeLoadError, match="trained on layer 2, the index uses layer 3"):
        Index.build(TOY_DOCS, None, other_layer, sae=tmp_path / "idx", llm=tiny_llm)


def rewrite_manifest(folder, edit, checksum=True):
    """Edit an index's manifest as a tool (recomputing its checksum) or by hand (not)."""
    from ragsae.storage import json_checksum

    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    if checksum:
        manifest["checksum"] = json_checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_refuses_other_llm(built, tmp_path, tiny_llm):
    rewrite_manifest(tmp_path / "idx", lambda m: m["llm"].update(model_hash="0" * 64))
    with pytest.raises(IndexFolderError, match="built with LLM"):
        Index.load(tmp_path / "idx", llm=tiny_llm)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["config"]["capture"].update(layer=3),
        lambda m: m["config"]["scoring"].update(k1=-5.0),
        lambda m: m["segments"][0].update(files={}),
        lambda m: m["counts"].update(passages="many"),
    ],
    ids=["layer", "scoring", "no-files", "non-numeric"],
)
def test_any_edit_of_the_manifest_is_refused(built, tmp_path, tiny_llm, edit):
    rewrite_manifest(tmp_path / "idx", edit, checksum=False)
    with pytest.raises(IndexFolderError, match="manifest.json: checksum mismatch"):
        Index.load(tmp_path / "idx", llm=tiny_llm)


def test_a_consistent_but_invalid_manifest_is_refused_by_name(built, tmp_path, tiny_llm):
    folder = tmp_path / "idx"
    original = (folder / "manifest.json").read_text()
    for edit, message in (
        (lambda m: m["segments"][0].update(files={}), r"'segments\[0\]\.files' must list"),
        (lambda m: m["segments"][0].update(name="../../etc"), "not a segment folder name"),
        (lambda m: m["sae"].update(current=7), "names no stored SAE version"),
        (lambda m: m["counts"].update(passages="many"), "'counts.passages' has the wrong type"),
        (lambda m: m["config"]["scoring"].update(k1=float("nan")), "k1 must be a finite number"),
        (lambda m: m["config"]["capture"].update(layer=3), "'layer' disagrees"),
    ):
        (folder / "manifest.json").write_text(original)
        rewrite_manifest(folder, edit)
        with pytest.raises(IndexFolderError, match=message):
            Index.load(folder, llm=tiny_llm)


def test_the_sae_config_is_covered_by_a_checksum(built, tmp_path, tiny_llm):
    config = tmp_path / "idx" / "sae" / "v1" / "config.json"
    header = json.loads(config.read_text())
    header["config"]["k"] = 4
    config.write_text(json.dumps(header))
    with pytest.raises(IndexFolderError, match=r"sae/v1/config\.json: checksum mismatch"):
        Index.load(tmp_path / "idx", llm=tiny_llm)


def test_detects_corruption_and_version(built, tmp_path, tiny_llm):
    folder = tmp_path / "idx"
    with open(folder / "segments" / "000001" / "passages.jsonl", "a") as handle:
        handle.write("\n")
    with pytest.raises(IndexFolderError, match=r"passages\.jsonl: checksum mismatch"):
        Index.load(folder, llm=tiny_llm)
    rewrite_manifest(folder, lambda m: m.update(format_version=42))
    with pytest.raises(IndexFolderError, match="format_version 42"):
        Index.load(folder, llm=tiny_llm)
    with pytest.raises(IndexFolderError, match="missing"):
        Index.load(tmp_path / "nowhere", llm=tiny_llm)


def test_existing_path_needs_overwrite(built, tiny_build_config, tiny_llm, tmp_path):
    with pytest.raises(IndexFolderError, match="already exists"):
        Index.build(TOY_DOCS, tmp_path / "idx", tiny_build_config, llm=tiny_llm)
    Index.build(TOY_DOCS[:2], tmp_path / "idx", tiny_build_config, llm=tiny_llm, overwrite=True)
    assert len(Index.load(tmp_path / "idx", llm=tiny_llm)) == 2


def test_unknown_layer_and_empty_query(tiny_build_config, tiny_llm, built):
    bad = BuildConfig(tiny_build_config.llm, CaptureConfig(layer=12), tiny_build_config.sae, tiny_build_config.scoring)
    with pytest.raises(ValueError, match="layer 12 does not exist"):
        Index.build(TOY_DOCS, None, bad, llm=tiny_llm)
    with pytest.raises(ValueError, match="query '0' is empty"):
        built.search("   ")


def test_builds_into_an_empty_folder(tiny_build_config, tiny_llm, tmp_path):
    (tmp_path / "empty").mkdir()
    Index.build(TOY_DOCS[:2], tmp_path / "empty", tiny_build_config, llm=tiny_llm)
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_pruned_index_saves_and_reloads_pruned_codes(tiny_build_config, tiny_llm, tmp_path):
    from ragsae.config import ScoringConfig

    config = BuildConfig(
        tiny_build_config.llm, tiny_build_config.capture, tiny_build_config.sae, ScoringConfig(max_latents=5)
    )
    built = Index.build(TOY_DOCS, tmp_path / "pruned", config, llm=tiny_llm)
    loaded = Index.load(tmp_path / "pruned", llm=tiny_llm)
    assert np.diff(loaded.codes.indptr).max() == 5
    assert (loaded.codes != built.codes).nnz == 0
    np.testing.assert_array_equal(loaded.df, built.df)  # counts of the unpruned codes
    assert loaded.df.sum() > loaded.codes.nnz
    assert [h.passage_id for h in loaded.search("zip archives", 3)] == [
        h.passage_id for h in built.search("zip archives", 3)
    ]


def test_passage_prefix_is_read_but_not_coded(built):
    encoder, text = built.encoder, TOY_DOCS[0]["title"] + "\n" + TOY_DOCS[0]["text"]
    assert encoder.capture.passage_prefix == "Document: "
    with_prefix = passage_activations(encoder.llm, [text], encoder.capture)
    layer = encoder.capture.layer
    without = capture(encoder.llm, [text], [layer], encoder.capture.window)[layer]
    assert len(with_prefix.values) == len(without.values)  # the prefix adds no token rows
    assert not np.allclose(with_prefix.values, without.values)  # but it changes what the text's tokens carry
    np.testing.assert_allclose(
        encoder.encode_documents([text]).codes.toarray(), built.codes[0].toarray(), rtol=0.06, atol=4e-3
    )


def test_bad_layer_and_too_little_text_fail_before_the_slow_work(tiny_build_config, monkeypatch):
    import ragsae.encode as encode_module
    import ragsae.index.build as build_module
    from ragsae.errors import ModelError, TrainingError

    def never(*args, **kwargs):
        raise AssertionError("reached the slow part")

    bad_layer = BuildConfig(
        tiny_build_config.llm, CaptureConfig(layer=12), tiny_build_config.sae, tiny_build_config.scoring
    )
    with monkeypatch.context() as patch:
        patch.setattr(build_module, "load_llm", never)  # a local model folder declares its layers
        with pytest.raises(ModelError, match=r"layer 12 does not exist: .* has layers 0\.\.4"):
            Index.build(TOY_DOCS, None, bad_layer)
    monkeypatch.setattr(encode_module, "capture_cached", never)
    with pytest.raises(TrainingError, match="fewer than one SAE training batch of 32 training tokens"):
        Index.build(TOY_DOCS[:1], None, tiny_build_config)


def test_index_files_get_the_umask_permissions(built, tmp_path):
    import stat

    from ragsae.storage import current_umask

    mask = current_umask()
    for path in (tmp_path / "idx").rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~mask  # safetensors alone would write 0600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None])
def test_k_must_be_a_whole_number_of_hits(built, k):
    from ragsae.errors import QueryError

    with pytest.raises(QueryError, match="k must be a whole number >= 1"):
        built.search("csv files", k=k)


def test_a_huge_k_returns_every_passage_once(built):
    hits = built.search("csv files", k=10**12)
    assert len(hits) == len(TOY_DOCS) and len({h.passage_id for h in hits}) == len(TOY_DOCS)


@pytest.mark.parametrize("query", [None, b"bytes", 42])
def test_queries_that_are_not_text_are_named_errors(built, query):
    from ragsae.errors import QueryError

    with pytest.raises(QueryError, match="must be a string"):
        built.search(query)


def test_a_query_longer_than_the_window_is_cut_with_a_warning(built, caplog):
    long_query = " ".join(["sockets"] * 100)  # the tiny config reads 32 tokens
    with caplog.at_level("WARNING"):
        built.search(long_query, k=2)
    assert "cut to the first 32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        built.search("sockets", k=2)
    assert "cut to the first" not in caplog.text


def test_per_doc_keeps_each_documents_best_passage(tiny_build_config, tiny_llm):
    long = {"_id": "long", "text": " ".join(f"The csv module reads rows number {i}." for i in range(40))}
    index = Index.build([long, *TOY_DOCS], None, tiny_build_config, llm=tiny_llm)
    passages = index.search("csv module reads rows", k=4)
    documents = index.search("csv module reads rows", k=4, per_doc=True)
    assert len({h.doc_id for h in passages}) < 4, "the long document fills the passage hits"
    assert len(documents) == 4 and len({h.doc_id for h in documents}) == 4
    best = {}
    for hit in index.search("csv module reads rows", k=len(index)):
        best.setdefault(hit.doc_id, hit)
    assert [(h.passage_id, h.score) for h in documents] == [(h.passage_id, h.score) for h in list(best.values())[:4]]
    assert [h.rank for h in documents] == [1, 2, 3, 4]


def test_nan_or_negative_statistics_are_refused(built, tmp_path, tiny_llm):
    from ragsae.storage import file_sha256, json_checksum

    folder = tmp_path / "idx"
    segment = folder / "segments" / "000001"
    lengths = np.load(segment / "lengths.npy")
    lengths[0] = np.nan
    np.save(segment / "lengths.npy", lengths)
    digest = file_sha256(segment / "lengths.npy")
    rewrite_manifest(folder, lambda m: m["segments"][0]["files"].update({"lengths.npy": digest}))
    with pytest.raises(IndexFolderError, match="lengths must be finite and positive"):
        Index.load(folder, llm=tiny_llm)
    lengths[0] = 1.0
    np.save(segment / "lengths.npy", lengths)
    digest = file_sha256(segment / "lengths.npy")
    rewrite_manifest(folder, lambda m: m["segments"][0]["files"].update({"lengths.npy": digest}))
    # Reference statistics that cannot be counts (more passages with a latent than passages).
    config = folder / "sae" / "v1" / "config.json"
    header = json.loads(config.read_text())
    header["metadata"]["reference"]["df"][0] = header["metadata"]["reference"]["passages"] + 1
    header["checksum"] = json_checksum(header)
    config.write_text(json.dumps(header))
    digest = file_sha256(config)
    rewrite_manifest(folder, lambda m: m["sae"]["versions"][0]["files"].update({"config.json": digest}))
    with pytest.raises(IndexFolderError, match=r"config\.json: metadata 'reference': 'df' must hold whole numbers"):
        Index.load(folder, llm=tiny_llm)
