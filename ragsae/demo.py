"""The embedded default corpus: docstrings of Python's standard library, present on every machine."""

from __future__ import annotations

import importlib
import inspect
import logging

from .text import Document

logger = logging.getLogger(__name__)

STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "mimetypes",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "secrets",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
)
DEFAULT_QUESTION = "How do I read a CSV file?"


def stdlib_documents(modules: tuple[str, ...] = STDLIB_MODULES, max_chars: int = 1500) -> list[Document]:
    """One document per module docstring and per documented public function or class.

    Ids are dotted names (`csv.reader`); texts are cut to `max_chars`. The content depends on
    the running Python's version, so the corpus is real text that needs no download.
    """
    documents: list[Document] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - a stripped-down Python
            logger.warning("stdlib module %s is missing; skipped", name)
            continue
        doc = inspect.getdoc(module)
        if doc:
            documents.append(Document(name, f"Python module {name}.\n{doc}"[:max_chars]))
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for attr in sorted(set(public)):
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            home = (getattr(obj, "__module__", None) or name).split(".")[0].lstrip("_")
            if home != name.split(".")[0]:
                continue  # re-exported from elsewhere
            text = inspect.getdoc(obj)
            if text and len(text) > 40:
                documents.append(Document(f"{name}.{attr}", f"{name}.{attr}: {text}"[:max_chars]))
    return documents
