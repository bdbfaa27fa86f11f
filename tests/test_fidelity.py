"""SAE fidelity: held-out passages kept from training, FVU and L0 on them, and the LM's loss with the SAE
spliced into the layer (on the tiny Llama; the real model's figures are checked in test_end_to_end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragsae.config import CaptureConfig, SaeConfig
from ragsae.encode import fit_sae, passage_activations
from ragsae.sae import create_sae, evaluate_sae
from ragsae.sae.fidelity import heldout_rows, loss_recovered, spliced_losses

TOPICS = ["rivers", "tax law", "bread", "comets", "chess", "violins", "glaciers", "vaccines", "trains", "poetry"]
TEXTS = [f"Note {i}: a short passage about {TOPICS[i % 10]} and {TOPICS[(i * 3 + 1) % 10]}." for i in range(200)]
CAPTURE = CaptureConfig(layer=2, window=32, overlap=4, batch_size=8, passage_prefix="Passage:")


def exact_sae(d_model: int, mean: torch.Tensor, scale: float):
    """A TopK SAE that reconstructs every input exactly: latents +x_i and -x_i, k = d_model."""
    sae = create_sae(SaeConfig(num_latents=2 * d_model, k=d_model, heldout_passages=0), d_model)
    eye = torch.eye(d_model)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.input_mean.copy_(mean)
        sae.input_scale.fill_(scale)
    return sae.eval()


def test_the_clean_loss_is_the_models_own_loss_on_the_passage_tokens(tiny_llm):
    texts = TEXTS[:5]
    sae = exact_sae(tiny_llm.d_model, torch.zeros(tiny_llm.d_model), 1.0)
    losses = spliced_losses(tiny_llm, sae, texts, CAPTURE, batch_size=2)  # padded batches
    from ragsae.capture import tokenize

    ids, skip, _ = tokenize(tiny_llm, texts, CAPTURE.window, CAPTURE.passage_prefix)
    total = count = 0.0
    for x in ids:  # one text at a time: no padding; HF shifts the labels itself
        labels = torch.tensor([x])
        labels[0, :skip] = -100
        with torch.no_grad():
            loss = tiny_llm.model(input_ids=torch.tensor([x]), labels=labels).loss
        total += float(loss) * (len(x) - skip)
        count += len(x) - skip
    assert losses["tokens"] == count
    assert losses["clean"] == pytest.approx(total / count, rel=1e-5)


def test_an_exact_sae_spliced_in_costs_nothing_and_zeroing_the_layer_costs_something(tiny_llm):
    rng = np.random.default_rng(0)
    mean = torch.from_numpy(rng.normal(size=tiny_llm.d_model).astype(np.float32))
    sae = exact_sae(tiny_llm.d_model, mean, 3.0)  # normalisation undone on the way back
    losses = spliced_losses(tiny_llm, sae, TEXTS[:6], CAPTURE, batch_size=4)
    assert losses["sae"] == pytest.approx(losses["clean"], abs=1e-4)
    assert losses["zero"] != pytest.approx(losses["clean"], abs=1e-3)
    assert loss_recovered({"clean": 2.0, "sae": 2.5, "zero": 4.0}) == pytest.approx(0.75)
    assert loss_recovered({"clean": 2.0, "sae": 2.5, "zero": 2.0}) is None


def test_heldout_rows_are_at_most_one_in_fifty_and_fixed_by_the_seed():
    assert len(heldout_rows(49, 32, 0)) == 0 and len(heldout_rows(200, 32, 0)) == 4
    assert len(heldout_rows(10_000, 32, 0)) == 32 and len(heldout_rows(10_000, 0, 0)) == 0
    assert heldout_rows(500, 8, 1).tolist() == heldout_rows(500, 8, 1).tolist() != heldout_rows(500, 8, 2).tolist()


def test_fit_sae_trains_without_the_heldout_passages_and_measures_fidelity_on_them(tiny_llm):
    acts = passage_activations(tiny_llm, TEXTS, CAPTURE)
    config = SaeConfig(num_latents=128, k=8, epochs=1, batch_size=64, auxk_k=16, heldout_passages=4)
    sae, report = fit_sae(tiny_llm, TEXTS, acts, CAPTURE, config)
    held = heldout_rows(len(TEXTS), 4, config.seed)
    held_tokens = sum(int(acts.offsets[r + 1] - acts.offsets[r]) for r in held)
    assert report.tokens == (len(acts.values) - held_tokens) * config.epochs  # trained on the rest only
    assert sae.metadata["train_passages"] == len(TEXTS) - 4
    fidelity = sae.metadata["fidelity"]
    assert fidelity["passages"] == 4 and fidelity["tokens"] == held_tokens
    rows = np.concatenate([np.arange(acts.offsets[r], acts.offsets[r + 1]) for r in held])
    quality = evaluate_sae(sae, np.asarray(acts.values[rows], dtype=np.float32))
    assert fidelity["fvu"] == pytest.approx(quality["fvu"]) and fidelity["mean_l0"] == pytest.approx(8, abs=0.5)
    losses = spliced_losses(tiny_llm, sae, [TEXTS[r] for r in held], CAPTURE)
    assert fidelity["loss_clean"] == pytest.approx(losses["clean"]) and fidelity["loss_sae"] == pytest.approx(
        losses["sae"]
    )
    assert fidelity["loss_recovered"] == loss_recovered(losses)
    assert 0 <= report.dense_fraction <= 1 and 0 <= report.dead_fraction <= 1

    everything, _ = fit_sae(tiny_llm, TEXTS, acts, CAPTURE, SaeConfig(**{**config.__dict__, "heldout_passages": 0}))
    assert "fidelity" not in everything.metadata and everything.metadata["train_passages"] == len(TEXTS)


def test_dense_and_dead_fractions_count_latent_frequencies():
    sae = create_sae(SaeConfig(num_latents=16, k=2), 4)
    data = torch.randn(500, 4)
    stats = evaluate_sae(sae, data)
    codes = sae.encode(data)
    counts = torch.bincount(codes.indices[codes.values > 0], minlength=16)
    assert stats["dead_fraction"] == pytest.approx(float((counts == 0).float().mean()))
    assert stats["dense_fraction"] == pytest.approx(float((counts > 50).float().mean()))
