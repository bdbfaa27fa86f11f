"""Distributed builds on a real local Ray with two worker actors (`ragsae build --ray`): the index equals
the single-process build with the same SAE; the SAE, when not given, is trained on a sample first."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config

from ragsae import Index, RayBuild
from ragsae.bench import load_beir
from ragsae.cli import main
from ragsae.errors import ConfigError
from ragsae.index.distributed import document_shards, sae_from_parts, sae_parts
from ragsae.latents import LatentStatistics, passage_tokens
from ragsae.text import Passage

ray = pytest.importorskip("ray", reason="distributed builds need Ray: pip install 'ragsae[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with two CPUs for the module; builds join it instead of starting their own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from conftest import msmarco_slice

    return msmarco_slice(tmp_path_factory.mktemp("distributed") / "slice", 6, 30, 20)


@pytest.fixture(scope="module")
def single(collection, tiny_llm, tiny_llm_dir):
    """The single-process build: its SAE is the one the distributed builds reuse."""
    documents, _, _ = load_beir(collection)
    return Index.build(documents, config=tiny_config(tiny_llm_dir), llm=tiny_llm)


def search_results(index: Index, queries: dict[str, str]) -> dict[str, list[tuple[str, float]]]:
    found = index.batch_search(queries, k=20)
    return {qid: [(h.passage_id, round(h.score, 4)) for h in hits] for qid, hits in found.items()}


def test_a_distributed_build_is_the_single_process_build(local_ray, single, collection, tiny_llm, tiny_llm_dir):
    documents, queries, _ = load_beir(collection)
    shards = RayBuild(workers=2, shard_passages=7)
    spread = Index.build(documents, config=tiny_config(tiny_llm_dir), sae=single.sae, llm=tiny_llm, ray=shards)
    assert len(document_shards(spread.passages, 7)) > 4  # several shards per worker
    assert [p.passage_id for p in spread.passages] == [p.passage_id for p in single.passages]
    assert spread.codes.shape == single.codes.shape
    assert np.array_equal(spread.codes.indices, single.codes.indices)
    np.testing.assert_allclose(spread.codes.data, single.codes.data, rtol=1e-6)
    assert search_results(spread, queries) == search_results(single, queries)
    assert spread.catalog is not None and single.catalog is not None
    assert json.dumps(spread.catalog.to_json(), sort_keys=True) == json.dumps(single.catalog.to_json(), sort_keys=True)


def test_without_an_sae_the_driver_trains_one_on_a_sample_first(
    local_ray, collection, tiny_llm, tiny_llm_dir, tmp_path
):
    documents, queries, _ = load_beir(collection)
    config = tiny_config(tiny_llm_dir)
    sample = RayBuild(workers=2, sae_sample_tokens=1_500, shard_passages=16)
    index = Index.build(documents, tmp_path / "index", config, llm=tiny_llm, ray=sample)
    trained = index.sae.metadata
    assert trained["train_passages"] < len(index.passages)  # a sample, not the corpus
    reloaded = Index.load(tmp_path / "index", llm=tiny_llm)
    hits = reloaded.search(next(iter(queries.values())), k=5)
    assert len(hits) == 5 and hits[0].labels
    assert reloaded.info()["sae"]["train"]["tokens"] >= 1_500


def test_cli_builds_on_ray_and_refuses_ray_flags_without_it(
    local_ray, single, collection, tiny_llm_dir, tmp_path, capsys
):
    sae_folder = tmp_path / "sae"
    single.sae.save(sae_folder)
    args = ["build", str(collection), "--sae", str(sae_folder)]
    args += ["--model", str(tiny_llm_dir), "--device", "cpu", "--dtype", "float32", "--layer", "2", "--window", "32"]
    args += ["--overlap", "4", "--batch-size", "4"]
    ray_args = ["--ray", "--ray-workers", "2", "--ray-shard-passages", "10"]
    assert main([*args, "-o", str(tmp_path / "index"), *ray_args]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["passages"] == len(single.passages)
    assert main([*args, "-o", str(tmp_path / "other"), "--ray-workers", "3"]) == 2
    assert "--ray-workers: only with --ray" in capsys.readouterr().err


def test_a_distributed_build_takes_no_activation_cache(collection, tiny_llm_dir, tmp_path):
    with pytest.raises(ConfigError, match="cache_dir"):
        Index.build(collection, config=tiny_config(tiny_llm_dir), cache_dir=tmp_path / "cache", ray=RayBuild())
    with pytest.raises(ConfigError, match="workers"):
        RayBuild(workers=0)


def test_shards_are_whole_documents():
    passages = [
        Passage(f"{d}#{i}", d, "x", 0, 1) for d, n in (("a", 3), ("b", 1), ("c", 5), ("d", 2)) for i in range(n)
    ]
    shards = document_shards(passages, 2)
    assert shards == [(0, 3), (3, 9), (9, 11)]  # b is too short to end a shard, so c joins it
    assert document_shards(passages, 100) == [(0, 11)]


def test_statistics_merged_from_shards_equal_one_pass(single, tiny_llm, tiny_llm_dir):
    """`LatentStatistics.merge` over shards of whole documents gives what `add` over all rows gives."""
    from ragsae.encode import encode_tokens, passage_activations

    config = tiny_config(tiny_llm_dir)
    passages = single.passages
    texts, doc_ids = [p.text for p in passages], [p.doc_id for p in passages]
    acts = passage_activations(tiny_llm, texts, config.capture)
    values, indices = encode_tokens(single.sae, acts.values)
    whole = LatentStatistics(single.sae.num_latents, passage_tokens(tiny_llm, texts, config.capture), doc_ids, 3)
    whole.add(0, values, indices)
    merged = LatentStatistics(single.sae.num_latents, whole.tokens, doc_ids, 3)
    for first, end in document_shards(passages, 9):
        a, b = acts.offsets[first], acts.offsets[end]
        part_tokens = passage_tokens(tiny_llm, texts[first:end], config.capture)
        part = LatentStatistics(single.sae.num_latents, part_tokens, doc_ids[first:end], 3)
        part.add(0, values[a:b], indices[a:b])
        merged.merge(part, first)
    for name in ("token_fires", "passage_fires", "activation_sum", "histogram", "rows_seen"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    assert (merged.pairs != whole.pairs).nnz == 0
    for mine, theirs in zip(merged.top, whole.top):
        np.testing.assert_array_equal(mine, theirs)


def test_the_sae_travels_to_the_workers_as_plain_arrays(single):
    copy = sae_from_parts(sae_parts(single.sae))
    assert copy.metadata == single.sae.metadata
    for name, tensor in single.sae.state_dict().items():
        assert np.array_equal(copy.state_dict()[name].numpy(), tensor.numpy())


def test_workers_whose_model_differs_from_the_drivers_are_refused(
    local_ray, single, collection, tiny_llm, tiny_llm_dir
):
    import dataclasses

    from ragsae.errors import ModelError

    config = tiny_config(tiny_llm_dir)
    other = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, dtype="bfloat16")
    )  # the driver's is float32
    with pytest.raises(ModelError, match="bfloat16"):
        Index.build(collection, config=other, sae=single.sae, llm=tiny_llm, ray=RayBuild(workers=1))
    # The refused build's workers are gone: a build after it gets both CPUs.
    assert Index.build(collection, config=config, sae=single.sae, llm=tiny_llm, ray=RayBuild(workers=2)).codes.nnz > 0
