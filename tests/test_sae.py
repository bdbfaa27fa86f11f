import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from ragsae.config import SaeConfig
from ragsae.errors import SaeLoadError
from ragsae.sae import create_sae, evaluate_sae, fvu, kl_sparsity, load_sae, train_sae


def synthetic_activations(n=4096, d=32, atoms=64, active=3, seed=0) -> np.ndarray:
    """Sparse combinations of random unit atoms: an SAE should explain most of the variance."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    for row in range(n):
        codes[row, rng.choice(atoms, active, replace=False)] = rng.uniform(1, 3, active)
    return (codes @ dictionary + 5.0).astype(np.float32)  # offset: normalisation must remove it


def small_config(**kw) -> SaeConfig:
    base = dict(num_latents=128, k=4, epochs=4, batch_size=128, lr=3e-3, auxk_k=16, dead_after_tokens=512)
    base.update(kw)
    return SaeConfig(**base)


def test_decode_matches_dense_reference():
    sae = create_sae(small_config(), 32)
    x = torch.randn(10, 32)
    codes = sae.encode(x)
    assert codes.values.shape == codes.indices.shape == (10, 4)
    dense = torch.zeros(10, 128).scatter(1, codes.indices, codes.values)
    assert_close(sae.decode(codes.values, codes.indices), dense @ sae.W_dec + sae.b_dec)


def test_encode_keeps_the_k_largest_latents():
    sae = create_sae(small_config(), 32)
    x = torch.randn(6, 32)
    acts = sae.pre_acts(sae.normalise(x))
    codes = sae.encode(x)
    assert_close(codes.values.sort(1).values, acts.topk(4, dim=1).values.sort(1).values)


def test_low_precision_selection_keeps_exact_values():
    sae = create_sae(small_config(num_latents=512, k=8), 32)
    x = torch.randn(200, 32)
    exact = sae.encode(x)
    fast = sae.encode(x, torch.bfloat16)
    pre = sae.pre_acts(sae.normalise(x))
    # the values are the float32 pre-activations of the latents chosen, whichever were chosen
    assert_close(fast.values, pre.gather(1, fast.indices))
    same = (fast.indices.sort(1).values == exact.indices.sort(1).values).all(1).float().mean()
    assert same > 0.8  # only near-ties are chosen differently
    kept = fast.values.sum(1) / exact.values.sum(1)
    assert bool((kept > 0.98).all())


def test_low_precision_selection_is_the_plain_product_topk():
    """Prepacked or not, latents are chosen from (x - b_dec) @ W_enc computed in bfloat16."""
    sae = create_sae(small_config(num_latents=512, k=8), 32)
    x = torch.randn(50, 32)
    xn = sae.normalise(x)
    low = ((xn - sae.b_dec).bfloat16() @ sae.W_enc.detach().bfloat16()).float() + sae.b_enc
    expected = low.topk(8, dim=1).indices.sort(1).values
    assert torch.equal(sae.encode(x, torch.bfloat16).indices.sort(1).values, expected)


def test_low_precision_selection_in_slices_equals_all_rows_at_once(monkeypatch):
    import ragsae.sae.base as sae_base

    sae = create_sae(small_config(num_latents=512, k=8), 32)
    x = torch.randn(50, 32)
    monkeypatch.setattr(sae_base, "SELECT_ROWS", 10**6)
    whole = sae.encode(x, torch.bfloat16)
    monkeypatch.setattr(sae_base, "SELECT_ROWS", 7)  # slices of 7 rows, the last one of 1
    sliced = sae.encode(x, torch.bfloat16)
    assert torch.equal(sliced.indices, whole.indices) and torch.equal(sliced.values, whole.values)


def test_low_precision_weights_follow_updates():
    sae = create_sae(small_config(), 32)
    x = torch.randn(6, 32)
    before = sae.encode(x, torch.bfloat16)
    with torch.no_grad():
        sae.W_enc.mul_(-1)
    after = sae.encode(x, torch.bfloat16)
    assert_close(after.values, sae.pre_acts(sae.normalise(x)).gather(1, after.indices))
    assert not torch.equal(before.indices.sort(1).values, after.indices.sort(1).values)


def test_fvu_and_kl_reference_values():
    x = torch.randn(50, 8)
    assert float(fvu(x, x)) == pytest.approx(0.0)
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0, rel=1e-5)
    rho = 0.05
    acts = torch.full((4, 3), float(np.arctanh(rho)))  # tanh(acts) averages exactly to rho
    assert float(kl_sparsity(acts, rho)) == pytest.approx(0.0, abs=1e-5)
    assert float(kl_sparsity(acts * 4, rho)) > 0.01


def test_auxk_loss_only_with_dead_latents():
    sae = create_sae(small_config(), 32)
    x = torch.randn(16, 32)
    assert sae(x).aux_loss.item() == 0.0
    dead = torch.zeros(128, dtype=torch.bool)
    dead[64:] = True
    out = sae(x, dead_mask=dead)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert sae.W_dec.grad[64:].abs().sum() > 0 and sae.W_dec.grad[:64].abs().sum() == 0


@pytest.mark.parametrize("architecture", ["relu", "kl"])
def test_penalised_architectures_have_sparsity_loss(architecture):
    sae = create_sae(small_config(architecture=architecture), 32)
    out = sae(torch.randn(16, 32))
    assert out.aux_loss.item() > 0
    assert out.recon.shape == (16, 32)


@pytest.mark.parametrize("architecture", ["topk", "relu", "kl", "gated"])
def test_training_explains_sparse_data(architecture):
    data = synthetic_activations()
    config = small_config(architecture=architecture, epochs=10, lr=1e-2)
    untrained = create_sae(config, 32)
    untrained.set_normalisation(torch.from_numpy(data))
    before = evaluate_sae(untrained, data)["fvu"]
    sae, report = train_sae(data, config)
    # ReLU/KL codes are capped to k latents when stored, which costs them some variance.
    assert report.fvu < (0.15 if architecture in ("topk", "gated") else 0.8 * before), (before, report)
    assert 0 < report.mean_l0 <= 4
    assert 0 <= report.dead_fraction < 1
    assert report.steps == 10 * (4096 // 128)
    norms = sae.W_dec.norm(dim=1)
    assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)


def test_training_is_deterministic():
    data = synthetic_activations(n=1024)
    a, _ = train_sae(data, small_config(epochs=1))
    b, _ = train_sae(data, small_config(epochs=1))
    assert_close(a.W_enc, b.W_enc)


def test_save_load_round_trip(tmp_path):
    data = synthetic_activations(n=512)
    sae, _ = train_sae(data, small_config(epochs=1))
    sae.metadata["layer"] = 3
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.config == sae.config and loaded.metadata["layer"] == 3
    x = torch.from_numpy(data[:20])
    assert_close(loaded.encode(x).values, sae.encode(x).values)
    assert evaluate_sae(loaded, data)["fvu"] == pytest.approx(evaluate_sae(sae, data)["fvu"])


def test_load_rejects_corruption_and_versions(tmp_path):
    sae = create_sae(small_config(), 32)
    folder = tmp_path / "sae"
    sae.save(folder)
    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(SaeLoadError, match="checksum mismatch"):
        load_sae(folder)
    sae.save(folder)
    header = json.loads((folder / "config.json").read_text())
    header["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(header))
    with pytest.raises(SaeLoadError, match="format_version 99"):
        load_sae(folder)
    with pytest.raises(SaeLoadError, match="missing"):
        load_sae(tmp_path / "nothing")


def test_low_precision_encoder_is_made_once_under_concurrent_use():
    from concurrent.futures import ThreadPoolExecutor

    sae = create_sae(small_config(num_latents=512, k=8), 32)
    x = torch.randn(64, 32)
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: sae.encode(x, torch.bfloat16), range(16)))
    reference = sae.encode(x, torch.bfloat16)
    for values, indices in codes:
        assert torch.equal(indices.sort(1).values, reference.indices.sort(1).values)
        assert torch.equal(values.sort(1).values, reference.values.sort(1).values)


def test_architectures_are_classes_chosen_by_the_registry(tmp_path):
    from ragsae.errors import ConfigError
    from ragsae.sae import ARCHITECTURES, GatedSae, KlSae, ReluSae, TopKSae

    assert ARCHITECTURES == {"topk": TopKSae, "relu": ReluSae, "kl": KlSae, "gated": GatedSae}
    for name, cls in ARCHITECTURES.items():
        sae = create_sae(small_config(architecture=name), 32)
        assert type(sae) is cls
        sae.save(tmp_path / name)
        assert type(load_sae(tmp_path / name)) is cls
    with pytest.raises(ConfigError, match="implements 'relu'"):
        ReluSae(small_config(architecture="topk"), 32)


def test_gated_sae_selects_by_its_gate_and_sets_values_by_its_magnitude_path():
    sae = create_sae(small_config(architecture="gated", num_latents=512, k=8), 32)
    with torch.no_grad():
        sae.r_mag.uniform_(-1, 1)
        sae.b_mag.uniform_(-0.5, 0.5)
    x = torch.randn(50, 32)
    xn = sae.normalise(x)
    codes = sae.encode(x)
    gate = sae.pre_acts(xn)
    assert torch.equal(codes.indices.sort(1).values, gate.topk(8, dim=1).indices.sort(1).values)
    linear = (xn - sae.b_dec) @ sae.W_enc
    magnitude = torch.relu(linear * sae.r_mag.exp() + sae.b_mag)
    assert_close(codes.values, magnitude.gather(1, codes.indices))
    assert not torch.allclose(codes.values, gate.gather(1, codes.indices))  # magnitudes differ from the gate
    fast = sae.encode(x, torch.bfloat16)  # low-precision selection, magnitudes of what it chose
    assert_close(fast.values, magnitude.gather(1, fast.indices))


def test_gated_gate_learns_only_from_its_own_reconstruction():
    sae = create_sae(small_config(architecture="gated"), 32)
    out = sae(torch.randn(64, 32))
    out.fvu.backward()
    assert sae.b_enc.grad is None or sae.b_enc.grad.abs().sum() == 0  # the gate's bias only moves selection
    assert sae.b_mag.grad.abs().sum() > 0 and sae.r_mag.grad.abs().sum() > 0
    sae.zero_grad()
    out = sae(torch.randn(64, 32))
    out.aux_loss.backward()
    assert sae.b_enc.grad.abs().sum() > 0
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0  # the decoder is held fixed there


def test_coactive_cosine_is_the_mean_squared_cosine_of_each_tokens_latent_pairs():
    sae = create_sae(small_config(), 32)
    indices = torch.randint(0, 128, (5, 4))
    rows = sae.W_dec.detach()
    expected = []
    for token in indices:
        for i in range(4):
            for j in range(4):
                if i != j:
                    expected.append(float(rows[token[i]] @ rows[token[j]]) ** 2)
    assert sae.coactive_cosine(indices).item() == pytest.approx(np.mean(expected), rel=1e-5)


def test_orthogonality_penalty_pushes_cofiring_decoder_rows_apart():
    data = synthetic_activations(n=2048)
    plain, plain_report = train_sae(data, small_config(epochs=6))
    ortho, report = train_sae(data, small_config(epochs=6, ortho_coef=1.0))
    x = torch.from_numpy(data)
    with torch.no_grad():
        before = plain.coactive_cosine(plain.encode(x).indices).item()
        after = ortho.coactive_cosine(ortho.encode(x).indices).item()
    assert after < 0.9 * before, (before, after)
    assert report.fvu < plain_report.fvu + 0.02  # at little cost in reconstruction
