"""The generated-text SAE study (research/generated_sae.py): its pieces, and a whole run on a tiny LLM."""

import argparse

import numpy as np
from conftest import load_benchmark_script, msmarco_slice

from ragsae.capture import TokenActivations
from ragsae.config import SaeConfig

generated_sae = load_benchmark_script("generated_sae", "research")


def test_prompts_cover_every_topic_and_form_in_a_seeded_order():
    items = generated_sae.prompts(0)
    topics = sum(len(t) for t in generated_sae.TOPICS.values())
    assert len(items) == len(set(items)) == topics * len(generated_sae.FORMS)
    assert items == generated_sae.prompts(0) and items != generated_sae.prompts(1)


def test_left_padding_cutting_and_cleaning():
    ids, mask = generated_sae.left_padded([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert generated_sae.cut_at_special([9, 10, 2, 11], {0, 1, 2}) == [9, 10]
    assert generated_sae.clean_text("  assistant\nGravity pulls.<|im_end|> ") == "Gravity pulls."
    assert generated_sae.clean_text("<|im_start|>") == ""


def test_joined_keeps_each_passage_with_its_rows():
    def part(names: list[str], first: float) -> tuple[list[str], TokenActivations]:
        lengths = np.arange(1, len(names) + 1)
        values = np.concatenate([np.full((n, 2), first + i, dtype=np.float16) for i, n in enumerate(lengths)])
        return names, TokenActivations(values, np.concatenate([[0], np.cumsum(lengths)]))

    texts, acts = generated_sae.joined([part(["a", "b", "c"], 0.0), part(["x", "y"], 10.0)], seed=0)
    expected = {"a": (0.0, 1), "b": (1.0, 2), "c": (2.0, 3), "x": (10.0, 1), "y": (11.0, 2)}
    assert sorted(texts) == sorted(expected) and texts != ["a", "b", "c", "x", "y"]
    for i, text in enumerate(texts):
        rows = acts.values[acts.offsets[i] : acts.offsets[i + 1]]
        assert len(rows) == expected[text][1] and (rows == expected[text][0]).all()


def test_adapt_config_gives_the_steps_asked_for():
    base = SaeConfig()
    config = generated_sae.adapt_config(base, rows=400_000, steps=300)
    assert (config.epochs, config.max_tokens // config.batch_size) == (1, 300)
    short = generated_sae.adapt_config(base, rows=100 * 1024 + 5, steps=300)
    assert short.epochs == 3 and short.max_tokens == 100 * 1024 + 5  # 3 epochs of 100 steps


def test_study_runs_caches_and_keeps_the_collection_out_of_the_generic_sae(tiny_build_config, tiny_llm, tmp_path):
    first, second = msmarco_slice(tmp_path / "a", 3, 30, 12), msmarco_slice(tmp_path / "b", 2, 10, 40)
    args = argparse.Namespace(
        dataset=str(first),
        other=str(second),
        split="test",
        gen_tokens=300,
        adapt_steps=3,
        gen_only=True,
        seed=0,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
    )
    result, table = generated_sae.run(args, tiny_build_config, tiny_llm)
    rows = result["rows"]
    assert [row["setting"].split(" ")[0] for row in rows] == ["own", "b's", "generated-text", "generic", "generic"]
    assert "(3 steps)" in rows[4]["setting"] and rows[4]["columns"]["steps"] == rows[3]["columns"]["steps"] + 3
    assert [row["columns"]["target tokens"] for row in rows[1:4]] == [0, 0, 0]
    generic_tokens = rows[3]["columns"]["train tokens"]
    assert generic_tokens > max(rows[1]["columns"]["train tokens"], rows[2]["columns"]["train tokens"])
    assert all(0.0 <= row["metrics"]["nDCG@10"] <= 1.0 and row["columns"]["FVU"] > 0 for row in rows)
    generation = result["generation"]
    assert generation["new_tokens"] >= 300 and generation["tokens_per_s"] > 0 and not generation["cached"]
    assert (tmp_path / "out" / "a-explore-generated-sae.json").is_file() and "tokens/s" in table
    trained = sorted((tmp_path / "cache" / "sae").iterdir())
    assert len(trained) == 4  # own, other, generated-text, generic: the adapted SAE is not cached

    again, _ = generated_sae.run(args, tiny_build_config, tiny_llm)
    assert again["generation"]["cached"] and sorted((tmp_path / "cache" / "sae").iterdir()) == trained
    assert [row["metrics"] for row in again["rows"][:4]] == [row["metrics"] for row in rows[:4]]
