"""A Llama-family model's blocks up to a layer, run as plain tensor operations.

Capture needs the residual stream after a few blocks, not logits. On short inputs transformers'
forward adds measurable overhead (module calls, mask building, keyword plumbing) to the matrix
products; here the blocks are the products and little else, with q/k/v and gate/up computed as one
product each (concatenated copies of the weights). In bfloat16 on CPU the weights are also kept
prepacked for oneDNN (`linear.py`). Both copies are made while they cost under `COPY_LIMIT_BYTES`.
`LlamaTrunk` gives the same activations as the hooked forward, bit for bit on CPU for the models
tested (tests/test_trunk.py; other kernels may round differently). Other architectures keep the
hooked forward (`capture/forward.py`). What it saves is measured in benchmarks/README.md.

Batches must be right-padded: under a causal mask, a real token never sees the padding after it,
so no padding mask is needed (padded positions hold garbage and are dropped by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class _Projection:
    """Linear maps applied to the same input: one product of the concatenated weights, or one each."""

    maps: tuple[Linear, ...]
    widths: list[int]

    @classmethod
    def of(cls, linears: list[Any], fuse: bool, pack: bool) -> _Projection:
        weights = [linear.weight for linear in linears]
        biases = [linear.bias for linear in linears]
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


@dataclass
class _Block:
    norm1: torch.Tensor
    eps1: float
    qkv: _Projection
    out: Linear
    norm2: torch.Tensor
    eps2: float
    gate_up: _Projection
    down: Linear


def trunk_unsupported_reason(model: Any) -> str | None:
    """Why `LlamaTrunk` cannot run `model` (None when it can)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return f"attention implementation {config._attn_implementation!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    return None


class LlamaTrunk:
    """Residual stream after block `layer` (0 = embeddings) of a Llama-family causal LM.

    `pack=False` keeps the weights as they are for oneDNN (for comparisons: `linear.py`)."""

    def __init__(self, model: Any, layer: int, pack: bool = True):
        reason = trunk_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LlamaTrunk does not support {type(model).__name__}: {reason}")
        inner, config = model.model, model.config
        self.layer = layer
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_length = int(window) if window else None
        """Longest input it runs exactly: a sliding attention window changes nothing below its width."""
        self.embed = inner.get_input_embeddings().weight
        self.rotary = inner.rotary_emb
        first = inner.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.scale = float(first.scaling)
        blocks = inner.layers[:layer]

        def size(linears: list[Any]) -> int:
            return sum(p.numel() * p.element_size() for linear in linears for p in linear.parameters())

        fused_bytes = sum(size([*self._qkv(block), *self._gate_up(block)]) for block in blocks)
        all_bytes = fused_bytes + sum(size(self._single(block)) for block in blocks)
        self.fused = fused_bytes <= COPY_LIMIT_BYTES
        pack = pack and all_bytes <= COPY_LIMIT_BYTES
        self.blocks = [self._block(block, self.fused, pack) for block in blocks]
        self._placement = (self.embed.device, self.embed.dtype)

    @staticmethod
    def _qkv(block: Any) -> list[Any]:
        return [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]

    @staticmethod
    def _gate_up(block: Any) -> list[Any]:
        return [block.mlp.gate_proj, block.mlp.up_proj]

    @staticmethod
    def _single(block: Any) -> list[Any]:
        return [block.self_attn.o_proj, block.mlp.down_proj]

    @classmethod
    def _block(cls, block: Any, fuse: bool, pack: bool) -> _Block:
        return _Block(
            norm1=block.input_layernorm.weight,
            eps1=float(block.input_layernorm.variance_epsilon),
            qkv=_Projection.of(cls._qkv(block), fuse, pack),
            out=Linear(block.self_attn.o_proj.weight, pack=pack),
            norm2=block.post_attention_layernorm.weight,
            eps2=float(block.post_attention_layernorm.variance_epsilon),
            gate_up=_Projection.of(cls._gate_up(block), fuse, pack),
            down=Linear(block.mlp.down_proj.weight, pack=pack),
        )

    @property
    def packed(self) -> bool:
        """True when products run on prepacked weights (`linear.py`)."""
        maps = [m for b in self.blocks for m in (*b.qkv.maps, b.out, *b.gate_up.maps, b.down)]
        return any(m.packed is not None for m in maps)

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

        q_width = self.heads * self.head_dim
        for number, block in enumerate(self.blocks[: max(layers)], 1):
            h = self._rms_norm(x, block.norm1, block.eps1)
            q, k, v = block.qkv(h, product_rows)
            q = rope(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2))
            k = rope(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2))
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = self._attend(q, k, v, lengths)
            x = x + _product(block.out, attended.transpose(1, 2).reshape(batch, length, q_width), product_rows)
            h = self._rms_norm(x, block.norm2, block.eps2)
            gate, up = block.gate_up(h, product_rows)
            x = x + _product(block.down, F.silu(gate) * up, product_rows)
            if number in layers:
                out[number] = x
        return out
