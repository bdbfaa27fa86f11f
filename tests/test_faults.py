"""Faults while an index or SAE is written: SIGKILL and injected errors at every write step, disk full,
concurrent writers. After each, the path holds a loadable index (the old one or the new one, with its
exact results) and the next successful write leaves no leftovers."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_DOCS, tiny_config
from fault_driver import WriteSteps

from ragsae.errors import IndexFolderError
from ragsae.index import Index, read_manifest, verify_index_folder
from ragsae.sae import load_sae

QUERIES = ["comma separated value files", "network sockets", "regular expressions"]
MAX_KILL_POINTS = 12


def results(index: Index) -> list[list[tuple[str, float]]]:
    return [[(h.passage_id, h.score) for h in index.search(q, k=4)] for q in QUERIES]


def content(path: Path) -> list[str]:
    """The checksums of every file an index's manifest names: equal for indexes of the same content."""
    manifest = read_manifest(path)
    sae = [v["files"] for v in manifest["sae"]["versions"] if v["version"] == manifest["sae"]["current"]]
    return sorted(
        str(x) for x in sae + [(s["files"], s["deleted"] and s["deleted"]["sha256"]) for s in manifest["segments"]]
    )


def which(path: Path, root: Path) -> str:
    """'a' or 'b': which of the two indexes is at `path`, every file verified against its manifest
    (same files, so the same results; `results` checks that once per test)."""
    verify_index_folder(path)
    return next(name for name in ("a", "b") if content(root / name) == content(path))


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def remove_leftovers(path: Path) -> None:
    for name in leftovers(path):
        shutil.rmtree(path.parent / name)


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, tiny_llm_dir):
    """Index A (all toy documents) at `target` and index B (five of them) at `source`, with their results."""
    from ragsae.lm import load_llm

    config = tiny_config(tiny_llm_dir)
    llm = load_llm(config.llm)
    root = tmp_path_factory.mktemp("faults")
    a = Index.build(TOY_DOCS, root / "a", config, llm=llm)
    b = Index.build(TOY_DOCS[:5], root / "b", config, llm=llm)
    return llm, root, results(a), results(b)


def fresh_target(root: Path, name: str) -> Path:
    """A copy of index A at a new path, to be overwritten by B."""
    target = root / name
    shutil.copytree(root / "a", target)
    return target


def run_driver(tiny_llm_dir, root: Path, target: Path, what: str, action: str, at: int) -> subprocess.CompletedProcess:
    driver = Path(__file__).with_name("fault_driver.py")
    args = [sys.executable, str(driver), str(tiny_llm_dir), str(root / "b"), str(target), what, action, str(at)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_sigkill_at_write_steps_of_a_save_leaves_the_old_or_the_new_index(two_indexes, tiny_llm_dir):
    llm, root, expected_a, expected_b = two_indexes
    target = fresh_target(root, "killed")
    counted = run_driver(tiny_llm_dir, root, fresh_target(root, "count-only"), "index", "count", 0)
    assert counted.returncode == 0, counted.stderr
    steps = int(counted.stdout.split()[-1])
    assert steps >= 20, f"only {steps} write steps seen"
    # Every step when there are few; otherwise an even spread that includes the first and the last.
    points = sorted({round(1 + i * (steps - 1) / (MAX_KILL_POINTS - 1)) for i in range(MAX_KILL_POINTS)})
    outcomes = []
    for at in points:
        killed = run_driver(tiny_llm_dir, root, target, "index", "kill", at)
        assert killed.returncode == -9, (at, killed.returncode, killed.stderr[-2000:])
        outcomes.append(which(target, root))
        if len(set(outcomes)) == 2 and outcomes[-1] == "b":
            assert results(Index.load(target, llm=llm)) == expected_b
        # Each run starts from the same state: a writer first clears dead writers' leftovers, which
        # would add write steps (that clean-up is checked below).
        remove_leftovers(target)
        if outcomes[-1] == "b":
            shutil.rmtree(target)
            shutil.copytree(root / "a", target)
    assert outcomes[0] == "a" and outcomes[-1] == "b", outcomes
    assert run_driver(tiny_llm_dir, root, target, "index", "kill", points[-1]).returncode == -9
    assert leftovers(target), "a kill after the swap leaves the old folder beside the new one"
    Index.load(root / "b", llm=llm).save(target, overwrite=True)  # the next successful write cleans up
    assert leftovers(target) == []
    assert results(Index.load(target, llm=llm)) == expected_b


def test_sigkill_while_an_sae_folder_is_replaced_leaves_a_loadable_sae(two_indexes, tiny_llm_dir):
    llm, root, _, _ = two_indexes
    target = root / "sae-killed"
    sae_only = shutil.ignore_patterns("latents.json")  # an SAE folder as `ragsae train` writes it
    shutil.copytree(root / "a" / "sae" / "v1", target, ignore=sae_only)
    old, new = load_sae(target).weights_sha256, load_sae(root / "b" / "sae" / "v1").weights_sha256
    shutil.copytree(root / "a" / "sae" / "v1", root / "sae-count", ignore=sae_only)
    steps = int(run_driver(tiny_llm_dir, root, root / "sae-count", "sae", "count", 0).stdout.split()[-1])
    for at in sorted({round(1 + i * (steps - 1) / 7) for i in range(8)}):  # 8 points, first and last included
        assert run_driver(tiny_llm_dir, root, target, "sae", "kill", at).returncode == -9
        assert load_sae(target).weights_sha256 in (old, new), at
        remove_leftovers(target)


def test_injected_errors_at_every_write_step_keep_the_old_index(two_indexes, monkeypatch):
    llm, root, expected_a, expected_b = two_indexes
    target = fresh_target(root, "raised")
    new = Index.load(root / "b", llm=llm)
    counter = WriteSteps()
    with monkeypatch.context() as patch:
        counter.install(patch.setattr)
        new.save(fresh_target(root, "count-in-process"), overwrite=True)
    for at in sorted({round(1 + i * (counter.steps - 1) / 39) for i in range(40)}):  # 40 steps, ends included
        steps = WriteSteps("raise", at)
        with monkeypatch.context() as patch:
            steps.install(patch.setattr)
            try:
                new.save(target, overwrite=True)
                saved = True
            except (IndexFolderError, OSError):
                saved = False
        found = which(target, root)
        # An error in the clean-up after the swap may come after the new index is in place.
        assert found == "b" if saved else found in ("a", "b"), f"error at step {at}"
        assert all(not name.startswith(f".{target.name}.tmp") for name in leftovers(target)), (at, leftovers(target))
    new.save(target, overwrite=True)
    assert leftovers(target) == [] and results(Index.load(target, llm=llm)) == expected_b


def test_disk_full_is_a_named_error_and_the_old_index_stays(two_indexes, monkeypatch):
    llm, root, expected_a, _ = two_indexes
    target = fresh_target(root, "full")
    new = Index.load(root / "b", llm=llm)
    steps = WriteSteps("raise", 2, errno.ENOSPC, only="open")  # the second file opened for writing
    with monkeypatch.context() as patch:
        steps.install(patch.setattr)
        with pytest.raises(IndexFolderError, match=r"could not write the index \(disk full"):
            new.save(target, overwrite=True)
    assert results(Index.load(target, llm=llm)) == expected_a
    assert leftovers(target) == []


def test_concurrent_writers_leave_one_complete_index(two_indexes):
    llm, root, expected_a, expected_b = two_indexes
    target = fresh_target(root, "concurrent")
    writers = [Index.load(root / name, llm=llm) for name in ("a", "b", "a", "b")]
    errors: list[BaseException] = []

    def write(index: Index) -> None:
        try:
            index.save(target, overwrite=True)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(index,)) for index in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert results(Index.load(target, llm=llm)) in (expected_a, expected_b)
    assert leftovers(target) == []


def test_a_backup_left_between_two_renames_is_restored(two_indexes):
    """Where no atomic exchange exists, the old folder is renamed aside first; a crash right then
    leaves no index at the path, and the next load puts the backup back."""
    import os

    llm, root, expected_a, _ = two_indexes
    target = fresh_target(root, "fallback")
    os.replace(target, target.with_name(f".{target.name}.old-999999999-abcd1234"))
    assert results(Index.load(target, llm=llm)) == expected_a
    assert leftovers(target) == []


def test_stale_temporary_folders_of_dead_writers_are_removed(two_indexes):
    llm, root, _, expected_b = two_indexes
    target = fresh_target(root, "stale")
    dead = target.with_name(f".{target.name}.tmp-999999999-deadbeef")
    dead.mkdir()
    (dead / "codes.npz").write_bytes(b"partial")
    Index.load(root / "b", llm=llm).save(target, overwrite=True)
    assert leftovers(target) == [] and results(Index.load(target, llm=llm)) == expected_b


CHANGES = ["add", "delete", "upsert", "compact", "retrain"]
KILLS_PER_CHANGE = 4


@pytest.fixture(scope="module")
def living(two_indexes):
    """An index with two segments and a deleted document, and per change the results before and after it."""
    from fault_driver import change

    llm, root, _, _ = two_indexes
    base = root / "living"
    shutil.copytree(root / "b", base)
    index = Index.load(base, llm=llm)
    index.add(TOY_DOCS[5:7])
    index.delete(["time"])
    expected = {}
    for what in CHANGES:
        after = root / f"after-{what}"
        shutil.copytree(base, after)
        change(Index.load(after, llm=llm), what)
        expected[what] = {
            index.generation: results(Index.load(base, llm=llm)),
            index.generation + 1: results(Index.load(after, llm=llm)),
        }
    return llm, root, base, expected


def unreferenced(path: Path) -> list[str]:
    from ragsae.index.folder import referenced_paths

    named = referenced_paths(read_manifest(path))
    found = {p.relative_to(path).as_posix() for p in path.rglob("*")}
    return sorted(name for name in found if name not in named)


@pytest.mark.parametrize("what", CHANGES)
def test_sigkill_during_a_change_leaves_the_index_before_or_after_it(living, tiny_llm_dir, what):
    """Killed at write steps spread over the change (first and last included), the index loads at the
    state before the change or after it, with that state's exact results, never one between."""
    llm, root, base, expected = living
    target = root / f"killed-{what}"
    shutil.copytree(base, target)
    counted = run_driver(tiny_llm_dir, root, target, what, "count", 0)
    assert counted.returncode == 0, counted.stderr[-2000:]
    steps = int(counted.stdout.split()[-1])
    rng = np.random.default_rng(len(what))
    points = sorted({1, steps, *rng.choice(np.arange(2, steps), KILLS_PER_CHANGE - 2, replace=False).tolist()})
    seen = []
    for at in points:
        shutil.rmtree(target)
        shutil.copytree(base, target)
        killed = run_driver(tiny_llm_dir, root, target, what, "kill", at)
        assert killed.returncode == -9, (at, killed.returncode, killed.stderr[-2000:])
        verify_index_folder(target)
        reopened = Index.load(target, llm=llm)
        assert reopened.generation in expected[what], (at, reopened.generation)
        assert results(reopened) == expected[what][reopened.generation], (what, at)
        seen.append(reopened.generation)
    assert seen[0] == min(expected[what]) and seen[-1] == max(expected[what]), seen
    # The next change clears what a killed writer left (files no manifest names).
    Index.load(target, llm=llm).add([{"_id": "after-kill", "text": "tempfile makes temporary files and folders."}])
    assert unreferenced(target) == []
