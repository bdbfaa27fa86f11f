import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import warm_load_in_fresh_process

from ragsae.capture import ActivationCache, activations_id
from ragsae.config import BuildConfig, CaptureConfig, LlmConfig
from ragsae.lm import loading as llm_module
from ragsae.lm import weights_cache
from ragsae.lm.loading import DEFAULT_MODEL_ID, LoadedLlm, load_llm, resolve_dtype


def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(llm_module, "native_bf16_cpu", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(llm_module, "native_bf16_cpu", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16


def test_activation_cache_tells_dtypes_apart(tmp_path):
    fp32 = LoadedLlm(None, None, "m", "abc", torch.device("cpu"), torch.float32)
    bf16 = LoadedLlm(None, None, "m", "abc", torch.device("cpu"), torch.bfloat16)
    assert fp32.activation_key == "abc|float32" and bf16.activation_key == "abc|bfloat16"
    cache = ActivationCache(tmp_path)
    assert cache.entry(activations_id(fp32, 8, 256, "", "t")) != cache.entry(activations_id(bf16, 8, 256, "", "t"))


# The de-quantised GGUF cache (ragsae/lm/weights_cache.py). Every test points RAGSAE_CACHE_DIR at a
# temporary folder, so none writes to the home folder.

CACHE_TEXTS = [
    "How do I read a CSV file row by row?",
    "The json module encodes and decodes JavaScript Object Notation data.",
    "Zip archives, sockets and 日本語 🙂",
]


def cached_activations(llm: LoadedLlm) -> dict:
    from ragsae.capture import capture

    return capture(llm, CACHE_TEXTS, [1, 2], window=32, batch_size=2, prefix="Document: ")


def assert_same_llm(a: LoadedLlm, b: LoadedLlm) -> None:
    """Same identity, same weights, same tokens, and activations equal bit for bit."""
    assert (a.model_id, a.model_hash, a.dtype) == (b.model_id, b.model_hash, b.dtype)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)
    assert [a.tokenizer(t)["input_ids"] for t in CACHE_TEXTS] == [b.tokenizer(t)["input_ids"] for t in CACHE_TEXTS]
    acts_a, acts_b = cached_activations(a), cached_activations(b)
    for layer in acts_a:
        assert np.array_equal(acts_a[layer].offsets, acts_b[layer].offsets)
        assert np.array_equal(acts_a[layer].values, acts_b[layer].values)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "ragsae-cache"
    monkeypatch.setenv("RAGSAE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def fake_gguf(tmp_path, tiny_llm_dir, monkeypatch):
    """A folder with a stand-in `tiny.gguf` whose "GGUF load" is the tiny Llama's: load_llm's cache
    logic runs as for a real GGUF file, without the minute a real one takes. Returns (config, calls),
    calls listing each load of the GGUF file."""
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(b"GGUF stand-in for the tiny Llama")
    real = llm_module.from_pretrained
    calls: list[str] = []

    def from_pretrained(source, dtype, gguf_file):
        if gguf_file is None:
            return real(source, dtype, None)
        assert Path(source, gguf_file).is_file()
        calls.append(gguf_file)
        return real(str(tiny_llm_dir), dtype, None)

    monkeypatch.setattr(llm_module, "from_pretrained", from_pretrained)
    return LlmConfig(model=str(folder), gguf_file="tiny.gguf", device="cpu", dtype="float32"), calls


def the_entry(cache_dir: Path) -> Path:
    (entry,) = (cache_dir / weights_cache.LLM_SUBDIR).iterdir()
    return entry


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAGSAE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights_cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("RAGSAE_CACHE_DIR")
    assert weights_cache.cache_root() == tmp_path / "xdg" / "ragsae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert weights_cache.cache_root() == Path.home() / ".cache" / "ragsae"


def test_cache_entry_round_trip_is_bit_identical(cache_dir, tiny_llm_dir):
    config = LlmConfig(model=str(tiny_llm_dir), device="cpu", dtype="float32")
    llm = load_llm(config)
    digest = "ab" * 32
    assert weights_cache.find_entry(digest, torch.float32) is None
    entry = weights_cache.write_entry(llm.model, llm.tokenizer, digest, torch.float32)
    assert entry == weights_cache.entry_path(digest, torch.float32) and entry.parent.parent == cache_dir
    assert weights_cache.find_entry(digest, torch.float32) == entry
    assert weights_cache.find_entry(digest, torch.bfloat16) is None  # the dtype is part of the key
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left behind
    assert weights_cache.write_entry(llm.model, llm.tokenizer, digest, torch.float32) == entry  # a good one stays
    stamp = json.loads((entry / weights_cache.STAMP_FILE).read_text())
    assert stamp["files"][weights_cache.WEIGHTS_FILE] == (entry / weights_cache.WEIGHTS_FILE).stat().st_size
    loaded = llm_module.load_cached(digest, torch.float32)
    assert loaded is not None
    tokenizer, model = loaded
    assert_same_llm(llm, LoadedLlm(model.eval(), tokenizer, llm.model_id, llm.model_hash, llm.device, llm.dtype))


def test_gguf_load_is_cached_and_keeps_its_identity(cache_dir, fake_gguf, monkeypatch):
    config, calls = fake_gguf
    hashed: list[Path] = []
    real_sha256 = llm_module.file_sha256
    monkeypatch.setattr(llm_module, "file_sha256", lambda path: hashed.append(Path(path)) or real_sha256(path))
    cold = load_llm(config)
    assert calls == ["tiny.gguf"] and len(hashed) == 1  # the GGUF file is read for its hash once
    warm = load_llm(config)
    assert calls == ["tiny.gguf"] and len(hashed) == 2  # the second load reads the cache, not the GGUF file
    assert (cold.model_id, cold.model_hash) == llm_module.model_fingerprint(config)
    assert cold.model_id.endswith("/tiny.gguf")
    assert_same_llm(cold, warm)
    assert weights_cache.find_entry(real_sha256(Path(config.model, "tiny.gguf")), torch.float32) == the_entry(cache_dir)


def test_load_without_cache_neither_reads_nor_writes_it(cache_dir, fake_gguf):
    config, calls = fake_gguf
    load_llm(config, cache=False)
    load_llm(config, cache=False)
    assert calls == ["tiny.gguf", "tiny.gguf"] and not cache_dir.exists()


def truncate_weights(entry: Path) -> None:
    weights = entry / weights_cache.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def drop_stamp(entry: Path) -> None:
    (entry / weights_cache.STAMP_FILE).unlink()


def garble_stamp(entry: Path) -> None:
    (entry / weights_cache.STAMP_FILE).write_text('{"format_version": 1, "gguf_sha')


def other_transformers(entry: Path) -> None:
    stamp = json.loads((entry / weights_cache.STAMP_FILE).read_text())
    (entry / weights_cache.STAMP_FILE).write_text(json.dumps({**stamp, "transformers": "0.0.1"}))


def garble_weights_header(entry: Path) -> None:
    """Same size, so the stamp still matches: only reading the weights finds it out."""
    with open(entry / weights_cache.WEIGHTS_FILE, "r+b") as handle:
        handle.write(b"\xff" * 16)


def drop_tokenizer(entry: Path) -> None:
    (entry / "tokenizer.json").unlink()


@pytest.mark.parametrize(
    "damage", [truncate_weights, drop_stamp, garble_stamp, other_transformers, garble_weights_header, drop_tokenizer]
)
def test_a_bad_cache_entry_is_not_used_but_rebuilt(cache_dir, fake_gguf, damage, caplog):
    config, calls = fake_gguf
    cold = load_llm(config)
    entry = the_entry(cache_dir)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="ragsae.lm"):
        rebuilt = load_llm(config)
    assert calls == ["tiny.gguf", "tiny.gguf"]  # the GGUF file was loaded again
    assert str(entry) in caplog.text
    assert the_entry(cache_dir) == entry and [p.name for p in entry.parent.iterdir()] == [entry.name]
    digest = json.loads((entry / weights_cache.STAMP_FILE).read_text())["gguf_sha256"]
    assert weights_cache.find_entry(digest, torch.float32) == entry
    warm = load_llm(config)
    assert calls == ["tiny.gguf", "tiny.gguf"]  # and the rebuilt entry serves the next load
    assert_same_llm(cold, rebuilt)
    assert_same_llm(cold, warm)


def test_an_unwritable_cache_falls_back_to_the_gguf_load(tmp_path, fake_gguf, monkeypatch, caplog):
    config, calls = fake_gguf
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # unwritable even for root
    monkeypatch.setenv("RAGSAE_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="ragsae.lm"):
        first = load_llm(config)
        second = load_llm(config)
    assert calls == ["tiny.gguf", "tiny.gguf"]
    assert "cannot cache the de-quantised LLM" in caplog.text
    assert_same_llm(first, second)


@pytest.mark.slow
def test_bundled_gguf_cache_gives_bit_identical_activations(cache_dir):
    config = LlmConfig(device="cpu")
    cold = load_llm(config)  # de-quantises the GGUF file and writes the cache
    entry = the_entry(cache_dir)
    assert entry.name.startswith(cold.model_hash)
    warm = load_llm(config)
    assert (cold.model_id, cold.model_hash) == (DEFAULT_MODEL_ID, llm_module.model_fingerprint(config)[1])
    assert_same_llm(cold, warm)
    assert cold.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ) == warm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_gguf_block_count_reads_only_the_header(tmp_path):
    import gguf

    from ragsae.lm.loading import gguf_block_count

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # a string array before the count
    writer.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    writer.add_block_count(7)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_block_count(tmp_path / "m.gguf") == 7
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)  # truncated
    assert gguf_block_count(tmp_path / "bad.gguf") is None
    (tmp_path / "not.gguf").write_bytes(b"not a gguf file")
    assert gguf_block_count(tmp_path / "not.gguf") is None


def test_a_layer_the_bundled_model_lacks_fails_before_it_loads(monkeypatch):
    import gguf

    import ragsae.index.build as build_module
    from ragsae.errors import ModelError
    from ragsae.index import Index

    reader = gguf.GGUFReader(str(llm_module.default_gguf_folder() / llm_module.DEFAULT_GGUF_FILE))
    field = reader.fields["llama.block_count"]
    layers = int(field.parts[field.data[0]][0])
    assert llm_module.declared_layers(LlmConfig()) == layers

    def never(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(build_module, "load_llm", never)
    with pytest.raises(ModelError, match=rf"layer {layers + 1} does not exist: .* has layers 0\.\.{layers}"):
        Index.build(["some text"], None, BuildConfig(capture=CaptureConfig(layer=layers + 1)))


# A warm load leaves the model unbuilt: the trunk reads the cache entry, the model is built on first use.

PROBE_IDS = torch.tensor([[5, 17, 300, 2048, 9, 77, 1]])


def test_a_warm_load_builds_the_model_only_when_first_used(cache_dir, fake_gguf):
    config, calls = fake_gguf
    cold = load_llm(config)
    warm = load_llm(config)
    assert cold.model_built and not warm.model_built
    assert "not built" in repr(warm) and "not built" not in repr(cold)
    assert (warm.num_layers, warm.d_model) == (cold.num_layers, cold.d_model) == (4, 64)
    for layer in (2, 4):  # a deeper trunk is read again from the entry
        fast, reference = warm.trunk(layer)(PROBE_IDS, [1, layer]), cold.trunk(layer)(PROBE_IDS, [1, layer])
        assert all(torch.equal(fast[k], reference[k]) for k in (1, layer))
    assert warm.trunk(3) is warm.trunk(4) and not warm.model_built
    assert warm.model is warm.model and warm.model_built and not warm.model.training
    assert calls == ["tiny.gguf"]  # built from the cache entry, not the GGUF file
    assert_same_llm(cold, warm)
    prompt = cold.tokenizer("The csv module", return_tensors="pt")
    generated = [llm.model.generate(**prompt, max_new_tokens=6, do_sample=False) for llm in (cold, warm)]
    assert torch.equal(*generated)


def test_capture_on_a_warm_load_leaves_the_model_unbuilt(cache_dir, fake_gguf):
    config, _ = fake_gguf
    cold = load_llm(config)
    warm = load_llm(config)
    fast, reference = cached_activations(warm), cached_activations(cold)
    assert all(np.array_equal(fast[layer].values, reference[layer].values) for layer in fast)
    assert not warm.model_built


def test_threads_that_first_use_the_model_at_once_build_it_once(cache_dir, fake_gguf, monkeypatch):
    import threading
    import time

    config, _ = fake_gguf
    load_llm(config)
    warm = load_llm(config)
    real, built = llm_module.load_model, []

    def slow_load(*args):
        time.sleep(0.2)  # the other threads arrive meanwhile
        built.append(args)
        return real(*args)

    monkeypatch.setattr(llm_module, "load_model", slow_load)
    models: list = []
    threads = [threading.Thread(target=lambda: models.append(warm.model)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and len(models) == 4 and all(m is models[0] for m in models)


def stamp_of_another_transformers(entry: Path) -> None:
    """What another ragsae install sharing the cache leaves: an entry it rewrote, valid for it alone."""
    other_transformers(entry)
    weights = entry / weights_cache.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes())  # a new file: its modification time changes


@pytest.mark.parametrize("damage", [garble_weights_header, stamp_of_another_transformers])
def test_an_entry_changed_after_a_warm_load_is_not_read(cache_dir, fake_gguf, damage, caplog):
    config, calls = fake_gguf
    cold = load_llm(config)
    warm = load_llm(config)
    entry = the_entry(cache_dir)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="ragsae.lm"):
        trunk = warm.trunk(2)
    assert str(entry) in caplog.text
    assert warm.model_built and calls == ["tiny.gguf", "tiny.gguf"]  # the model was built from the GGUF file
    assert torch.equal(trunk(PROBE_IDS, [2])[2], cold.trunk(2)(PROBE_IDS, [2])[2])
    assert_same_llm(cold, warm)
    assert not load_llm(config).model_built and calls == ["tiny.gguf", "tiny.gguf"]  # the entry was written again


def test_a_model_the_trunk_cannot_read_from_files_loads_whole(cache_dir, fake_gguf, monkeypatch):
    config, _ = fake_gguf
    load_llm(config)
    entry_config = the_entry(cache_dir) / "config.json"
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    entry_config.write_text(json.dumps({**json.loads(entry_config.read_text()), "rope_parameters": scaled}))
    monkeypatch.setattr(weights_cache, "entry_problem", lambda *args: None)  # the stamp's sizes no longer match
    llm = load_llm(config)
    assert llm.model_built and llm.model.config.rope_parameters["rope_type"] == "linear"
    assert llm.trunk(2) is not None  # on the model, whose rotary module computes this RoPE


def test_a_warm_load_imports_no_modeling_code(cache_dir, fake_gguf):
    """A fresh process that loads from a warm cache and runs the trunk never imports transformers'
    modeling code (nor builds the model)."""
    config, _ = fake_gguf
    load_llm(config)  # writes the entry
    loaded = f"model={config.model!r}, gguf_file='tiny.gguf', device='cpu', dtype='float32'"
    report = warm_load_in_fresh_process(loaded, "llm.trunk(3)(torch.tensor([[1, 2, 3]]), [3])", timeout=300)
    assert report == {"built": False, "modeling": []}


@pytest.mark.parametrize(
    "tokenizer_config, model_type, direct",
    [
        ({"tokenizer_class": "TokenizersBackend"}, "llama", True),
        ({"tokenizer_class": "TokenizersBackend"}, "qwen2", False),  # another model type: AutoTokenizer decides
        ({"tokenizer_class": "LlamaTokenizer"}, "llama", False),
        ({"tokenizer_class": "TokenizersBackend", "auto_map": {"AutoTokenizer": "x.Y"}}, "llama", False),
    ],
)
def test_a_tokenizer_is_loaded_directly_only_where_autotokenizer_picks_that_class(
    tmp_path, tokenizer_config, model_type, direct
):
    from ragsae.lm.loading import direct_tokenizer_class

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert (direct_tokenizer_class(tmp_path) is not None) == direct
    (tmp_path / "config.json").write_text("{not json")
    assert direct_tokenizer_class(tmp_path) is None
