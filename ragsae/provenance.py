"""Where a result or an index came from: library versions, the code's git commit, the machine, the command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._version import __version__


def library_versions() -> dict[str, str]:
    """Versions of ragsae and the libraries whose behaviour its results depend on."""
    import faiss
    import numpy as np
    import scipy
    import torch
    import transformers

    return {
        "ragsae": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def command_line() -> str:
    """How this process was started, as one would type it again."""
    program = sys.argv[0]
    if Path(program).name == "__main__.py":  # python -m PACKAGE
        head = ["python", "-m", Path(program).parent.name]
    else:
        head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def git_commit() -> str | None:
    """HEAD of the checkout the library runs from, with "+dirty" when its code (the library, the
    benchmark scripts, pyproject.toml) differs from HEAD; results files written meanwhile do not count."""
    folder = Path(__file__).parent
    code = [":(top)ragsae", ":(top)benchmarks/*.py", ":(top)research/*.py", ":(top)pyproject.toml"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=folder)
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
            capture_output=True,
            text=True,
            check=True,
            cwd=folder,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if changes.stdout.strip() else "")


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Platform, processor, Python, cores, torch threads and GPU, for results files."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
