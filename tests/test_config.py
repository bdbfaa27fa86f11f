import pytest

from ragsae.config import BuildConfig, CaptureConfig, SaeConfig, ScoringConfig, from_dict, to_dict


def test_round_trip_ignores_unknown_keys():
    config = BuildConfig()
    data = to_dict(config)
    data["sae"]["future_field"] = 1
    data["new_stage"] = {}
    assert BuildConfig.from_dict(data) == config
    assert from_dict(SaeConfig, {"k": 16, "junk": True}).k == 16


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SaeConfig(architecture="switch"), "architecture must be one of"),
        (lambda: SaeConfig(ortho_coef=-0.1), "ortho_coef must be >= 0"),
        (lambda: SaeConfig(k=0), "need 0 < k <= num_latents"),
        (lambda: SaeConfig(num_latents=8, k=16), "need 0 < k <= num_latents"),
        (lambda: CaptureConfig(layer=-1), "layer must be >= 0"),
        (lambda: CaptureConfig(window=64, overlap=40), "overlap must be in"),
        (lambda: ScoringConfig(pooling="mean"), "pooling must be one of"),
        (lambda: ScoringConfig(mode="bm25"), "mode must be one of"),
    ],
)
def test_bad_values_are_named(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()
