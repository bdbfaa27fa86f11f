"""A Llama-family model's blocks up to a layer, run as plain tensor operations.

Capture needs the residual stream after a few blocks, not logits. Transformers' forward spends as
long in module calls, mask building and keyword plumbing as in the matrix products on short inputs
(a query of ten tokens: 5.0 ms through layer 8 of SmolLM2-135M on two CPU cores, 3.8 ms here).
`LlamaTrunk` reads the same weight tensors (q/k/v and gate/up concatenated into one product each)
and gives the same activations, bit for bit on the models tested (tests/test_trunk.py); other
architectures keep the hooked transformers forward (`capture.py`).

Batches must be right-padded: under a causal mask, a real token never sees the padding after it,
so no padding mask is needed (padded positions hold garbage and are dropped by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Architectures whose decoder block is Llama's: pre-norm RMSNorm, RoPE attention with grouped KV
# heads and a gated SiLU MLP, residual adds. Qwen2's q/k/v biases are handled below, and Mistral's
# sliding window changes nothing on inputs no longer than it; anything else uses the hooked forward.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class _Block:
    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor
    down: torch.Tensor


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
    """Residual stream after block `layer` (0 = embeddings) of a Llama-family causal LM."""

    def __init__(self, model: Any, layer: int):
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
        self.intermediate = int(config.intermediate_size)
        self.blocks = [self._block(block) for block in inner.layers[:layer]]

    @staticmethod
    def _block(block: Any) -> _Block:
        attn, mlp = block.self_attn, block.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None
        if projections[0].bias is not None:
            bias = torch.cat([p.bias for p in projections])
        return _Block(
            norm1=block.input_layernorm.weight,
            eps1=float(block.input_layernorm.variance_epsilon),
            qkv=torch.cat([p.weight for p in projections]),
            qkv_bias=bias,
            out=attn.o_proj.weight,
            norm2=block.post_attention_layernorm.weight,
            eps2=float(block.post_attention_layernorm.variance_epsilon),
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
        )

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: statistics in float32, then back to the model's dtype.
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def accepts(self, length: int) -> bool:
        return self.max_length is None or length <= self.max_length

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """(batch, tokens, d_model) activations after each of `layers` (0 = embeddings, at most
        `self.layer`) for right-padded `input_ids` (batch, tokens)."""
        if not layers or any(not 0 <= layer <= self.layer for layer in layers):
            raise ValueError(f"layers {layers} outside 0..{self.layer}")
        batch, length = input_ids.shape
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

        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for number, block in enumerate(self.blocks[: max(layers)], 1):
            h = self._rms_norm(x, block.norm1, block.eps1)
            q, k, v = F.linear(h, block.qkv, block.qkv_bias).split([q_width, kv_width, kv_width], dim=-1)
            q = rope(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2))
            k = rope(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2))
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                q, k, v, is_causal=length > 1, scale=self.scale, enable_gqa=self.kv_heads != self.heads
            )
            x = x + F.linear(attended.transpose(1, 2).reshape(batch, length, q_width), block.out)
            h = self._rms_norm(x, block.norm2, block.eps2)
            gate, up = F.linear(h, block.gate_up).split([self.intermediate, self.intermediate], dim=-1)
            x = x + F.linear(F.silu(gate) * up, block.down)
            if number in layers:
                out[number] = x
        return out
