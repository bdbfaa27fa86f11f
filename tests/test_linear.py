import pytest
import torch
import torch.nn.functional as F

import ragsae.lm.linear as linear_module
from ragsae.lm.linear import Linear, prepack

needs_packing = pytest.mark.skipif(
    prepack(torch.randn(8, 8).bfloat16()) is None, reason="this PyTorch build cannot prepack bfloat16 weights"
)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 7, 64), (300, 64)])
def test_prepacked_bfloat16_product_is_f_linear_bit_for_bit(shape, bias):
    weight = torch.randn(96, 64).bfloat16()
    b = torch.randn(96).bfloat16() if bias else None
    x = torch.randn(*shape).bfloat16()
    product = Linear(weight, b)
    assert product.packed is not None
    assert torch.equal(product(x), F.linear(x, weight, b))


@needs_packing
def test_a_transposed_view_packs_as_its_matrix_product():
    """The SAE's encoder product: x @ W_enc through Linear(W_enc.t())."""
    w_enc = torch.randn(64, 512).bfloat16()
    x = torch.randn(9, 64).bfloat16()
    product = Linear(w_enc.t(), keep_weight=False)
    assert product.packed is not None and product.weight is None
    assert torch.equal(product(x), x @ w_enc)


def test_float32_and_unpacked_weights_use_f_linear():
    weight = torch.randn(16, 8)
    x = torch.randn(3, 8)
    for product in (Linear(weight), Linear(weight.bfloat16(), pack=False, keep_weight=False)):
        assert product.packed is None and product.weight is not None
    assert torch.equal(Linear(weight)(x), F.linear(x, weight))


def test_a_packed_product_that_differs_is_not_used(monkeypatch):
    monkeypatch.setattr(linear_module, "_packed_product", lambda x, packed, bias: F.linear(x, packed) + 1)
    assert prepack(torch.randn(16, 8).bfloat16()) is None


def test_missing_onednn_ops_fall_back(monkeypatch):
    def missing(*args):
        raise RuntimeError("no such op")

    monkeypatch.setattr(linear_module, "_packed_product", missing)
    weight = torch.randn(16, 8).bfloat16()
    product = Linear(weight)
    x = torch.randn(2, 8).bfloat16()
    assert product.packed is None and torch.equal(product(x), F.linear(x, weight))
