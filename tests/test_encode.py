import numpy as np
import torch

from ragsae.config import SaeConfig
from ragsae.encode import encode_tokens, selection_dtype
from ragsae.lm.loading import LoadedLlm
from ragsae.sae import create_sae


def test_latents_are_selected_at_the_llms_precision():
    def llm(dtype):
        return LoadedLlm(None, None, "m", "h", torch.device("cpu"), dtype)

    assert selection_dtype(llm(torch.bfloat16)) == torch.bfloat16
    assert selection_dtype(llm(torch.float16)) == torch.float16
    assert selection_dtype(llm(torch.float32)) == torch.float32


def test_encode_tokens_batches_like_one_call():
    sae = create_sae(SaeConfig(num_latents=256, k=8), 16)
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float16)
    for dtype in (torch.float32, torch.bfloat16):
        values, indices = encode_tokens(sae, x, batch_size=7, select_dtype=dtype)
        with torch.no_grad():
            codes = sae.encode(torch.from_numpy(x.astype(np.float32)), dtype)
        order, expected = np.argsort(indices, 1), np.argsort(codes.indices.numpy(), 1)
        np.testing.assert_array_equal(np.take_along_axis(indices, order, 1), codes.indices.sort(1).values.numpy())
        np.testing.assert_allclose(
            np.take_along_axis(values, order, 1), np.take_along_axis(codes.values.numpy(), expected, 1), rtol=1e-6
        )
