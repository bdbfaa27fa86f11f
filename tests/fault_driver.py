"""Saves an index (or an SAE) while counting write steps, and at step N kills itself with SIGKILL or
raises an OSError: the subject of tests/test_faults.py. Run as a script (a kill ends the process) or
imported (`WriteSteps` for injected errors in the test process).

python tests/fault_driver.py LLM_DIR SOURCE_INDEX TARGET WHAT {count,kill,raise} N

WHAT is index, sae, add, delete, upsert, compact or retrain:
`index` saves SOURCE over TARGET, `sae` saves SOURCE's SAE as TARGET, the others change TARGET in place.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Any


class WriteSteps:
    """Wraps every call that writes, renames or deletes on disk during a save; counts them and acts at
    step `at` ('kill': SIGKILL this process; 'raise': OSError with `code`)."""

    def __init__(self, action: str = "count", at: int = 0, code: int = errno.EIO, only: str = ""):
        self.action, self.at, self.code, self.only, self.steps = action, at, code, only, 0
        self.names: list[str] = []

    def step(self, name: str) -> None:
        if self.only not in name:
            return
        self.steps += 1
        self.names.append(name)
        if self.steps == self.at:
            if self.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.action == "raise":
                raise OSError(self.code, os.strerror(self.code), name)

    def wrap(self, name: str, function: Callable[..., Any], writes: Callable[..., bool] | None = None) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if writes is None or writes(*args, **kwargs):
                self.step(name)
            return function(*args, **kwargs)

        return wrapped

    def targets(self) -> list[tuple[Any, str, Callable[..., bool] | None]]:
        """(owner, attribute, which calls count) of everything patched."""
        import faiss

        import ragsae.sae.base as sae_base
        import ragsae.storage as storage

        def opens_for_writing(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> bool:
            return any(flag in mode for flag in "wax+")

        return [
            (builtins, "open", opens_for_writing),
            (os, "replace", None),
            (os, "rename", None),
            (os, "mkdir", None),
            (os, "fsync", None),
            (os, "unlink", None),
            (shutil, "rmtree", None),
            (storage, "exchange_paths", None),
            (sae_base, "save_file", None),
            (faiss, "write_index", None),
        ]

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> None:
        for owner, attribute, writes in self.targets():
            setattr_(
                owner,
                attribute,
                self.wrap(f"{getattr(owner, '__name__', owner)}.{attribute}", getattr(owner, attribute), writes),
            )


ADDED = [
    {"_id": "added-1", "title": "Heaps", "text": "heapq keeps a priority queue in a list with heappush and heappop."},
    {"_id": "added-2", "title": "Bisect", "text": "bisect finds insertion points in sorted lists by binary search."},
]
"""What the `add` change adds (ids new to the toy corpus)."""
DELETED = ["json"]
"""What the `delete` change deletes."""


def change(index: Any, what: str) -> None:
    """One lifecycle change of `index` (which has its folder): add, delete, upsert, compact or retrain."""
    if what == "add":
        index.add(ADDED)
    elif what == "delete":
        index.delete(DELETED)
    elif what == "upsert":
        index.upsert([{**ADDED[0], "_id": "math"}])
    elif what == "compact":
        index.compact()
    elif what == "retrain":
        index.retrain(epochs=1)
    else:
        raise ValueError(what)


def main(llm_dir: str, source: str, target: str, what: str, action: str, at: int) -> None:
    from ragsae.config import LlmConfig
    from ragsae.index import Index
    from ragsae.lm import load_llm

    llm = load_llm(LlmConfig(model=llm_dir, device="cpu", dtype="float32"))
    index = Index.load(target if what not in ("index", "sae") else source, llm=llm)
    steps = WriteSteps(action, at)
    steps.install()
    if what == "index":
        index.save(target, overwrite=True)
    elif what == "sae":
        index.sae.save(target)
    else:
        change(index, what)
    print(steps.steps)


if __name__ == "__main__":
    main(*sys.argv[1:6], int(sys.argv[6]))
