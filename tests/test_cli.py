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
    args = [
        "build",
        str(corpus),
        "-o",
        str(tmp_path / "idx"),
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
        "--max-latents",
        "all",
        "--feedback-passages",
        "2",
    ]
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
