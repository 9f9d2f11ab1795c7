"""The FP8 resolution simulation: E4M3's grid, and where the noise survives quantization."""

import pytest
import torch

from symnoise_megatron.noise.fp8_resolution import check_first_layer, e4m3_step, gaussian_embeddings, quantize_e4m3, simulate


def test_e4m3_grid_is_torchs_float8():
    y = torch.tensor([[448.0, 1.0, 0.3, -7.0]])  # amax 448: scale 1
    assert torch.equal(e4m3_step(y), torch.tensor([[32.0, 0.125, 2.0 ** -5, 0.5]]))
    assert torch.equal(quantize_e4m3(y), torch.tensor([[448.0, 1.0, 0.3125, -7.0]]))
    # every value on the grid is a multiple of its step
    values = torch.linspace(-448, 448, 1001)[None]
    quantized = quantize_e4m3(values)
    assert torch.equal(torch.remainder(quantized, e4m3_step(quantized)), torch.zeros_like(quantized))


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_noise_survives_short_samples_and_fades_with_length(recipe):
    rows = gaussian_embeddings(256, 4096, 0.02)
    short, long = simulate(rows, 5.0, 256, recipe), simulate(rows, 5.0, 200_000, recipe)
    assert short.noise_survives and short.copies_differ > 0.99 and short.noise_kept > 0.99
    assert not long.noise_survives and long.noise_to_step < 0.25
    assert short.noise_to_step == pytest.approx(long.noise_to_step * (200_000 / 256) ** 0.5, rel=0.05)


def test_start_up_check_names_the_bf16_remedy_only_when_needed():
    weight = gaussian_embeddings(1000, 1024, 0.02, seed=1)
    assert check_first_layer(weight, 5.0, 512, "tensorwise") is None
    warning = check_first_layer(weight, 5.0, 1_000_000, "tensorwise")
    assert warning and "--first-last-layers-bf16" in warning and "L=1000000" in warning
