"""A Llama-family model's blocks up to a layer, run as plain tensor operations.

Capture needs the residual stream after a few blocks, not logits. On short inputs transformers'
forward adds measurable overhead (module calls, mask building, keyword plumbing) to the matrix
products; here the blocks are the products and little else, with q/k/v and gate/up computed as one
product each (concatenated copies of the weights). In bfloat16 on CPU the weights are also kept
prepacked for oneDNN (`linear.py`). Both copies are made while they cost under `COPY_LIMIT_BYTES`.
`LlamaTrunk` gives the same activations as the hooked forward, bit for bit on CPU for the models
tested (tests/test_trunk.py; other kernels may round differently). Other architectures keep the
hooked forward (`capture/forward.py`). What it saves is measured in benchmarks/README.md.

The trunk is built from a config and named tensors: a transformers model's own, or read from a
safetensors file with the model's config.json (`LlamaTrunk.from_safetensors`), so that a search
need not build the model, nor import transformers' modeling code (`loading.LoadedLlm`). Without the
model, RoPE is computed here (`DefaultRope`), for the default RoPE only.

Batches must be right-padded: under a causal mask, a real token never sees the padding after it,
so no padding mask is needed (padded positions hold garbage and are dropped by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .linear import Linear, in_fixed_row_blocks

# Architectures whose decoder block is Llama's: pre-norm RMSNorm, RoPE attention with grouped KV
# heads and a gated SiLU MLP, residual adds. Qwen2's q/k/v biases are handled below, and Mistral's
# sliding window changes nothing on inputs no longer than it; anything else uses the hooked forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


COPY_LIMIT_BYTES = 512 * 2**20
"""Most memory spent on copies of the weights made for speed: concatenated q/k/v and gate/up and,
where `linear.prepack` applies, prepacked copies of all the trunk's weights (the concatenated copies
are then dropped). Deeper trunks of larger models use fewer copies, or the weights as they are."""

EMBEDDINGS = "model.embed_tokens.weight"
"""Tensors are named as in the state dict of transformers' `*ForCausalLM` (and its safetensors file)."""

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(x, position ids) -> (cos, sin) in x's dtype, as transformers' rotary embedding modules compute them."""


@dataclass(frozen=True)
class TrunkSpec:
    """What `LlamaTrunk` reads of a model's config (`trunk_spec`)."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_length: int | None
    """Longest input it runs exactly: a sliding attention window changes nothing below its width."""
    qkv_bias: bool
    out_bias: bool
    rope_theta: float | None
    """Base of the default RoPE; None for any other RoPE (only the model's own rotary module computes it)."""

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5  # the attention modules' `scaling`, computed the same way

    def tensor_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor the trunk up to block `layer` reads."""
        hidden, inner = self.hidden_size, self.intermediate_size
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {EMBEDDINGS: (self.vocab_size, hidden)}
        for number in range(layer):
            block = f"model.layers.{number}."
            attention = {"q_proj": q_width, "k_proj": kv_width, "v_proj": kv_width}
            shapes[block + "input_layernorm.weight"] = (hidden,)
            for name, width in attention.items():
                shapes[f"{block}self_attn.{name}.weight"] = (width, hidden)
                if self.qkv_bias:
                    shapes[f"{block}self_attn.{name}.bias"] = (width,)
            shapes[block + "self_attn.o_proj.weight"] = (hidden, q_width)
            if self.out_bias:
                shapes[block + "self_attn.o_proj.bias"] = (hidden,)
            shapes[block + "post_attention_layernorm.weight"] = (hidden,)
            shapes[block + "mlp.gate_proj.weight"] = (inner, hidden)
            shapes[block + "mlp.up_proj.weight"] = (inner, hidden)
            shapes[block + "mlp.down_proj.weight"] = (hidden, inner)
        return shapes


def trunk_spec(config: Mapping[str, Any]) -> TrunkSpec:
    """The spec of a model config (a config.json, or a transformers config's `to_dict()`); ValueError
    saying why `LlamaTrunk` cannot run the model. A value the config leaves out is taken at its
    transformers default only where that default is certain, or errs on the safe side."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {model_type!r}")
    if config.get("hidden_act") != "silu":
        raise ValueError(f"activation {config.get('hidden_act')!r}")
    if config.get("mlp_bias", False):
        raise ValueError("MLP biases")

    def number(key: str, kinds: tuple[type, ...] = (int,)) -> Any:
        value: Any = config.get(key)
        if type(value) not in kinds or value <= 0:  # type(): not bool
            raise ValueError(f"{key} {value!r}")
        return value

    hidden, heads, kv_heads = number("hidden_size"), number("num_attention_heads"), number("num_key_value_heads")
    head_dim = config.get("head_dim") or hidden // heads  # as these models' attention and RoPE take it
    if not isinstance(head_dim, int) or head_dim % 2 or heads % kv_heads:
        raise ValueError(f"head size {head_dim!r} with {heads} heads and {kv_heads} key-value heads")
    # Llama has no sliding window; Mistral's and Qwen2's configs default it to 4096, so it must be said.
    if model_type != "llama" and "sliding_window" not in config:
        raise ValueError("no sliding_window in the config")
    # Qwen2 without use_sliding_window defaults it off; taken as on, it only shortens the inputs run here.
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
        raise ValueError(f"sliding window {window!r}")
    attention_bias = bool(config.get("attention_bias", False)) and model_type == "llama"  # Llama: all four
    rope = config.get("rope_parameters")
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    default_rope = (
        isinstance(rope, Mapping)
        and rope.get("rope_type") == "default"
        and set(rope) <= {"rope_type", "rope_theta"}  # no partial rotation, scaling, per-layer-type RoPE
        and isinstance(theta, (int, float))
        and not isinstance(theta, bool)
    )
    return TrunkSpec(
        model_type=model_type,
        num_layers=number("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=number("intermediate_size"),
        vocab_size=number("vocab_size"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(number("rms_norm_eps", (int, float))),
        max_length=window or None,
        qkv_bias=model_type == "qwen2" or attention_bias,
        out_bias=attention_bias,
        rope_theta=theta if default_rope else None,
    )


class DefaultRope:
    """The default RoPE's (cos, sin), computed as transformers' `LlamaRotaryEmbedding` does (its
    `compute_default_rope_parameters` and `forward`, the same in Mistral and Qwen2), bit for bit:
    inverse frequencies in float32, angles, cos and sin in float32, then cast to the input's dtype."""

    def __init__(self, theta: float, head_dim: int):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.attention_scaling = 1.0  # the default RoPE's; multiplied in as transformers does

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


@dataclass
class _Projection:
    """Linear maps applied to the same input: one product of the concatenated weights, or one each."""

    maps: tuple[Linear, ...]
    widths: list[int]

    @classmethod
    def of(cls, weights: list[torch.Tensor], biases: list[Any], fuse: bool, pack: bool) -> _Projection:
        widths = [int(w.shape[0]) for w in weights]
        if not fuse:
            return cls(tuple(Linear(w, b, pack=pack) for w, b in zip(weights, biases)), widths)
        bias = torch.cat(biases) if biases[0] is not None else None
        return cls((Linear(torch.cat(weights), bias, pack=pack, keep_weight=False),), widths)

    def __call__(self, x: torch.Tensor, rows: int | None = None) -> list[torch.Tensor]:
        if len(self.maps) == 1:
            return list(_product(self.maps[0], x, rows).split(self.widths, dim=-1))
        return [_product(linear, x, rows) for linear in self.maps]


def _product(linear: Linear, x: torch.Tensor, rows: int | None) -> torch.Tensor:
    return linear(x) if rows is None else in_fixed_row_blocks(linear, x, rows)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_SINGLE = ("self_attn.o_proj", "mlp.down_proj")
"""A block's linear maps: q/k/v and gate/up are one product each where copies are allowed, o and down single."""


@dataclass
class _Block:
    norm1: torch.Tensor
    qkv: _Projection
    out: Linear
    norm2: torch.Tensor
    gate_up: _Projection
    down: Linear


def trunk_unsupported_reason(model: Any) -> str | None:
    """Why `LlamaTrunk` cannot run the transformers model `model` (None when it can)."""
    config = model.config
    try:
        spec = trunk_spec(config.to_dict())
    except ValueError as exc:
        return str(exc)
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return f"attention implementation {config._attn_implementation!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    # The trunk takes head size, scaling and norm epsilons from the config, which the modules are built from.
    for block in inner.layers:
        attention, norms = block.self_attn, (block.input_layernorm, block.post_attention_layernorm)
        if (attention.head_dim, attention.scaling) != (spec.head_dim, spec.scale):
            return f"attention head size {attention.head_dim} or scaling {attention.scaling} not the config's"
        if any(norm.variance_epsilon != spec.rms_norm_eps for norm in norms):
            return "RMSNorm epsilon not the config's"
    return None


class LlamaTrunk:
    """Residual stream after block `layer` (0 = embeddings) of a Llama-family causal LM.

    Built on a transformers model (its parameters themselves: `stale` tells when the model moved), or
    with `from_tensors` / `from_safetensors` on a config and the weights alone, without the model.
    `pack=False` keeps the weights as they are for oneDNN (for comparisons: `linear.py`)."""

    def __init__(self, model: Any, layer: int, pack: bool = True):
        reason = trunk_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaTrunk does not support {type(model).__name__}: {reason}")
        spec = trunk_spec(model.config.to_dict())
        # The model's rotary module: exact for every RoPE variant it implements, not only the default.
        self._setup(spec, model.state_dict(keep_vars=True), model.model.rotary_emb, layer, pack)

    @classmethod
    def from_tensors(
        cls, spec: TrunkSpec, tensors: Mapping[str, torch.Tensor], layer: int, pack: bool = True
    ) -> LlamaTrunk:
        """The trunk of a model given by its spec and tensors (`TrunkSpec.tensor_shapes` names them);
        only the default RoPE, which ragsae computes itself (`DefaultRope`)."""
        if spec.rope_theta is None:
            raise ValueError("LlamaTrunk computes only the default RoPE without the model")
        trunk = cls.__new__(cls)
        trunk._setup(spec, tensors, DefaultRope(spec.rope_theta, spec.head_dim), layer, pack)
        return trunk

    @classmethod
    def from_safetensors(
        cls, path: Path, spec: TrunkSpec, layer: int, device: torch.device, pack: bool = True
    ) -> LlamaTrunk:
        """The trunk read from a model's safetensors file: only the tensors it needs, copied out of the
        file (whatever happens to the file later, the trunk keeps what was read)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            tensors = {name: weights.get_tensor(name).to(device, copy=True) for name in spec.tensor_shapes(layer)}
        return cls.from_tensors(spec, tensors, layer, pack)

    def _setup(
        self, spec: TrunkSpec, tensors: Mapping[str, torch.Tensor], rotary: Rotary, layer: int, pack: bool
    ) -> None:
        if not 0 <= layer <= spec.num_layers:
            raise ValueError(f"layer {layer} outside 0..{spec.num_layers}")
        shapes = spec.tensor_shapes(layer)
        wrong = [name for name, shape in shapes.items() if name not in tensors or tuple(tensors[name].shape) != shape]
        if wrong:
            raise ValueError(f"tensors missing or not of the config's shape: {', '.join(wrong[:3])}")
        self.spec = spec
        self.layer = layer
        self.max_length = spec.max_length
        self.embed = tensors[EMBEDDINGS]
        self.rotary = rotary
        self.head_dim, self.heads, self.kv_heads, self.scale = spec.head_dim, spec.heads, spec.kv_heads, spec.scale

        def nbytes(modules: tuple[str, ...]) -> int:
            """Bytes of these linear maps' weights and biases in the trunk's blocks."""
            prefixes = tuple(f"model.layers.{n}.{module}." for n in range(layer) for module in modules)
            return sum(
                tensors[name].numel() * tensors[name].element_size() for name in shapes if name.startswith(prefixes)
            )

        fused_bytes = nbytes(_QKV + _GATE_UP)
        self.fused = fused_bytes <= COPY_LIMIT_BYTES
        pack = pack and fused_bytes + nbytes(_SINGLE) <= COPY_LIMIT_BYTES
        self.blocks = [self._block(spec, tensors, n, self.fused, pack) for n in range(layer)]
        self._placement = (self.embed.device, self.embed.dtype)

    @staticmethod
    def _block(spec: TrunkSpec, tensors: Mapping[str, torch.Tensor], number: int, fuse: bool, pack: bool) -> _Block:
        def weight(name: str) -> torch.Tensor:
            return tensors[f"model.layers.{number}.{name}.weight"]

        def bias(name: str, present: bool) -> torch.Tensor | None:
            return tensors[f"model.layers.{number}.{name}.bias"] if present else None

        return _Block(
            norm1=weight("input_layernorm"),
            qkv=_Projection.of([weight(m) for m in _QKV], [bias(m, spec.qkv_bias) for m in _QKV], fuse, pack),
            out=Linear(weight("self_attn.o_proj"), bias("self_attn.o_proj", spec.out_bias), pack=pack),
            norm2=weight("post_attention_layernorm"),
            gate_up=_Projection.of([weight(m) for m in _GATE_UP], [None, None], fuse, pack),
            down=Linear(weight("mlp.down_proj"), pack=pack),
        )

    @property
    def packed(self) -> bool:
        """True when products run on prepacked weights (`linear.py`)."""
        maps = [m for b in self.blocks for m in (*b.qkv.maps, b.out, *b.gate_up.maps, b.down)]
        return any(m.packed is not None for m in maps)

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the weights when the trunk was built."""
        return self._placement

    @property
    def stale(self) -> bool:
        """True once the model has moved to another device or dtype than the copies made here."""
        return (self.embed.device, self.embed.dtype) != self._placement

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: statistics in float32, then back to the model's dtype.
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def accepts(self, length: int) -> bool:
        return self.max_length is None or length <= self.max_length

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
        """Causal attention of (batch, heads, tokens, head_dim) inputs; per row over its own length with
        `lengths` (the kernel's sums then do not depend on the padded width)."""
        gqa = self.kv_heads != self.heads
        if lengths is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.scale, enable_gqa=gqa)
        out = torch.zeros_like(q)
        start = 0
        # Rows of one length together (the kernel is per row); capture sorts texts by length, so they are
        # runs of neighbouring rows, attended as views rather than gathered copies.
        for end in range(1, len(lengths) + 1):
            if end < len(lengths) and lengths[end] == lengths[start]:
                continue
            n, rows = lengths[start], slice(start, end)
            out[rows, :, :n] = F.scaled_dot_product_attention(
                q[rows, :, :n], k[rows, :, :n], v[rows, :, :n], is_causal=n > 1, scale=self.scale, enable_gqa=gqa
            )
            start = end
        return out

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        layers: list[int],
        product_rows: int | None = None,
        lengths: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """(batch, tokens, d_model) activations after each of `layers` (0 = embeddings, at most
        `self.layer`) for right-padded `input_ids` (batch, tokens).

        Batch-invariant with `product_rows` and `lengths` (each row's tokens before its padding): every
        weight product runs on blocks of `product_rows` token rows (`linear.in_fixed_row_blocks`) and each
        row attends over its own length only, so that a text's activations depend on neither the texts
        beside it nor the batch's padded width (padding positions come out as garbage, never read)."""
        if not layers or any(not 0 <= layer <= self.layer for layer in layers):
            raise ValueError(f"layers {layers} outside 0..{self.layer}")
        batch, length = input_ids.shape
        if self.stale:
            raise RuntimeError("the model moved to another device or dtype after this trunk was built")
        if not self.accepts(length):
            raise ValueError(f"{length} tokens exceed the sliding attention window ({self.max_length})")
        x = F.embedding(input_ids, self.embed)
        out = {0: x} if 0 in layers else {}
        if not self.blocks:
            return out
        positions = torch.arange(length, device=input_ids.device)[None]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        half = self.head_dim // 2

        def rope(t: torch.Tensor) -> torch.Tensor:
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        q_width, eps = self.heads * self.head_dim, self.spec.rms_norm_eps
        for number, block in enumerate(self.blocks[: max(layers)], 1):
            h = self._rms_norm(x, block.norm1, eps)
            q, k, v = block.qkv(h, product_rows)
            q = rope(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2))
            k = rope(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2))
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = self._attend(q, k, v, lengths)
            x = x + _product(block.out, attended.transpose(1, 2).reshape(batch, length, q_width), product_rows)
            h = self._rms_norm(x, block.norm2, eps)
            gate, up = block.gate_up(h, product_rows)
            x = x + _product(block.down, F.silu(gate) * up, product_rows)
            if number in layers:
                out[number] = x
        return out
