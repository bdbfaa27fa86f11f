import json

import pytest

from ragsae.cli import main, make_parser


@pytest.mark.parametrize("command", ["build", "search", "ask", "info", "train", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ragsae " + command in capsys.readouterr().out


def test_bad_corpus_is_a_clear_error(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "x"}\nnot json\n')
    code = main(["build", str(corpus), "-o", str(tmp_path / "idx")])
    assert code == 2
    assert f"{corpus}:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_build_search_info_on_tiny_model(tiny_llm_dir, tmp_path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for name, text in {"a.txt": "alpha beta gamma", "b.md": "delta epsilon", "c.txt": "zeta eta theta"}.items():
        (corpus / name).write_text(text)
    args = ["build", str(corpus), "-o", str(tmp_path / "idx")]
    args += tiny_args(tiny_llm_dir, "--max-latents", "all", "--feedback-passages", "2")
    # Three passages are fewer tokens than one SAE batch: the error must say so.
    assert main(args) == 2
    assert "training tokens" in capsys.readouterr().err
    (corpus / "long.txt").write_text(" ".join(f"token{i}" for i in range(2000)))
    assert main(args) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "alpha", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["rank"] == 1
    assert main(["info", str(tmp_path / "idx")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["documents"] == 4
    scoring = json.loads((tmp_path / "idx" / "manifest.json").read_text())["config"]["scoring"]
    assert scoring["max_latents"] is None and scoring["feedback_passages"] == 2


def tiny_args(tiny_llm_dir, *extra):
    return [
        "--model",
        str(tiny_llm_dir),
        "--layer",
        "1",
        "--num-latents",
        "64",
        "--sae-k",
        "4",
        "--epochs",
        "1",
        *extra,
    ]


@pytest.fixture
def small_corpus(tmp_path):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha beta gamma")
    (corpus / "long.txt").write_text(" ".join(f"token{i}" for i in range(2000)))
    return corpus


def test_train_then_build_with_its_sae_feeds_the_activations_it_trained_on(tiny_llm_dir, small_corpus, tmp_path):
    import torch

    from ragsae.sae import load_sae

    sae_dir, own, reused = tmp_path / "sae", tmp_path / "own", tmp_path / "reused"
    assert main(["train", str(small_corpus), "-o", str(sae_dir), *tiny_args(tiny_llm_dir)]) == 0
    assert main(["build", str(small_corpus), "-o", str(own), *tiny_args(tiny_llm_dir)]) == 0
    assert main(["build", str(small_corpus), "-o", str(reused), "--sae", str(sae_dir), *tiny_args(tiny_llm_dir)]) == 0
    trained, built = load_sae(sae_dir), load_sae(own / "sae" / "v1")
    # Same passages, prefix and capture: the SAE `train` writes is the one `build` trains (to the last
    # bit or so: multithreaded CPU reductions need not add in one order).
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(tensor, built.state_dict()[name], rtol=0, atol=1e-6)
    assert trained.metadata["train"]["fvu"] == pytest.approx(built.metadata["train"]["fvu"], rel=1e-6)
    for key in ("train_fingerprint", "passage_prefix", "window", "layer", "llm_hash"):
        assert trained.metadata[key] == built.metadata[key], key
    assert trained.metadata["passage_prefix"] == "Document: "
    assert trained.metadata["reference"]["passages"] == built.metadata["reference"]["passages"]  # frozen with it
    manifest = json.loads((reused / "manifest.json").read_text())
    (version,) = manifest["sae"]["versions"]
    assert version["weights_sha256"] == trained.weights_sha256  # build --sae indexes with that very SAE


def test_build_refuses_an_sae_trained_on_other_activations(tiny_llm_dir, small_corpus, tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    assert main(["train", str(small_corpus), "-o", str(sae_dir), *tiny_args(tiny_llm_dir, "--window", "64")]) == 0
    capsys.readouterr()
    args = ["build", str(small_corpus), "-o", str(tmp_path / "idx"), "--sae", str(sae_dir), *tiny_args(tiny_llm_dir)]
    assert main(args) == 2
    assert "trained on window 64, the index uses window 256" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nowhere"), "query"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: missing" in err and "Traceback" not in err
    assert main(["--debug", "search", str(tmp_path / "nowhere"), "query"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_k_is_hits_everywhere_and_sae_k_only_builds(capsys):
    parser = make_parser()
    assert parser.parse_args(["search", "idx", "q", "-k", "7"]).k == 7
    assert parser.parse_args(["ask", "idx", "q", "-k", "2"]).k == 2
    assert parser.parse_args(["demo", "-k", "5"]).k == 5
    assert getattr(parser.parse_args(["build", "c", "-o", "o", "--sae-k", "8"]), "SaeConfig.k") == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "c", "-o", "o", "-k", "8"])
    capsys.readouterr()


def test_option_help_and_choices_come_from_the_config_fields(capsys):
    import re

    from ragsae.config import SaeConfig, ScoringConfig, field_docs

    with pytest.raises(SystemExit):
        make_parser().parse_args(["build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls, name in ((ScoringConfig, "pooling"), (SaeConfig, "k"), (SaeConfig, "num_latents")):
        assert field_docs(cls)[name] in help_text, name
    assert re.search(r"--pooling \{max,sum,log,count\}", help_text)
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args(["build", "c", "-o", "o", "--pooling", "mean"])
    assert exit_info.value.code == 2


def test_verify_and_info_say_whether_an_index_verifies(tiny_llm_dir, small_corpus, tmp_path, capsys):
    index = tmp_path / "idx"
    assert main(["build", str(small_corpus), "-o", str(index), *tiny_args(tiny_llm_dir)]) == 0
    capsys.readouterr()
    assert main(["verify", str(index)]) == 0
    assert "OK (" in capsys.readouterr().out
    assert main(["info", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    with open(index / "segments" / "000001" / "passages.jsonl", "a", encoding="utf-8") as handle:
        handle.write("\n")
    assert main(["verify", str(index)]) == 2
    assert "passages.jsonl: checksum mismatch" in capsys.readouterr().err
    assert main(["info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is False and "checksum mismatch" in info["verify_error"]


def test_overwrite_never_replaces_what_is_not_an_index(tiny_llm_dir, small_corpus, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    args = ["build", str(small_corpus), *tiny_args(tiny_llm_dir), "--overwrite", "-o"]
    assert main([*args, str(other)]) == 2
    assert "is not a ragsae index folder; refusing to replace it" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "precious"
    assert main([*args, str(small_corpus)]) == 2  # the corpus folder itself
    assert "holds the corpus" in capsys.readouterr().err
    assert (small_corpus / "a.txt").is_file()
