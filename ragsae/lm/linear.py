"""Linear maps whose weights are kept in oneDNN's blocked layout on CPU in bfloat16.

On CPU, `F.linear` in bfloat16 runs oneDNN, which first reorders the weight into its blocked
layout, on every call. For the short inputs of a query that reorder costs about as much as the
product, so the weights are reordered once ("prepacked", as PyTorch's compiler does when it freezes
a model; the gain is measured in benchmarks/README.md). The packed product uses the same kernel, so
results are the same bit for bit; each weight is checked once against `F.linear` on probe inputs and
left unpacked where they differ, where the op is missing, or off CPU / bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 16
"""Rows oneDNN is told to expect; outputs do not depend on it (measured: the same for 1 to 4,096 rows)."""
PROBE_ROWS = (1, 33)
"""Input sizes on which a packed weight must give `F.linear`'s output exactly."""


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prepack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`weight` (out, in) reordered for oneDNN, or None where that is unavailable or would change results."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    weight = weight.detach().contiguous()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        generator = torch.Generator().manual_seed(0)
        for rows in PROBE_ROWS:
            probe = torch.randn(rows, weight.shape[1], generator=generator).to(weight.dtype)
            if not torch.equal(_packed_product(probe, packed, bias), F.linear(probe, weight, bias)):
                return None
    except (AttributeError, RuntimeError):  # a PyTorch build without these oneDNN ops
        return None
    return packed


class Linear:
    """y = x W^T + b for a frozen weight (out, in): through a prepacked weight where `prepack` gives one.

    `pack=False` never packs. With `keep_weight=False` a packed Linear drops its reference to `weight`
    (for weights made only for it, such as concatenated copies), so that memory holds the packed copy alone.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True, keep_weight: bool = True
    ):
        self.bias = bias
        self.packed = prepack(weight, bias) if pack else None
        self.weight = weight if keep_weight or self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _packed_product(x, self.packed, self.bias)
        assert self.weight is not None  # dropped only where packed
        return F.linear(x, self.weight, self.bias)


def in_fixed_row_blocks(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """`product(x)` computed on blocks of exactly `rows` rows of x (..., in), the last one zero-padded.

    oneDNN chooses its bfloat16 kernel, and with it the order in which a row's products are summed, by
    the number of rows: a row's result then depends on how many rows share the call. With every call
    of one size it depends on the row alone, so a passage's activations do not depend on which others
    were captured with it (an index grown by adds then equals one built in one go).
    """
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    blocks = -(-n // rows)
    if n % rows:
        padded = flat.new_empty(blocks * rows, flat.shape[1])
        padded[:n] = flat
        padded[n:] = 0
        flat = padded
    if blocks == 1:  # capture's batches fit one block: its output is used as it is, not copied
        out = product(flat)
    else:
        out = torch.cat([product(flat[start : start + rows]) for start in range(0, flat.shape[0], rows)])
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])
