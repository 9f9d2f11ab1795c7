"""NoiseConfig checks itself, and states how many rows and micro-batches each pairing runs."""

import pytest

from symnoise_megatron.noise.config import NoiseConfig


@pytest.mark.parametrize("kind, pairing", [("neftune", "concat"), ("symmetric", "interleaved")])
def test_an_unknown_kind_or_pairing_is_refused_naming_the_flags_and_the_choices(kind, pairing):
    with pytest.raises(ValueError) as refused:
        NoiseConfig(kind, pairing=pairing)
    assert str(refused.value) == ("--noise-kind must be one of ('none', 'uniform', 'gaussian', 'bernoulli', 'symmetric') "
                                  "and --noise-pairing one of ('concat', 'microbatch')")


@pytest.mark.parametrize("noise, rows, microbatches", [
    (NoiseConfig("symmetric", pairing="concat"), 4, 3),
    (NoiseConfig("symmetric", pairing="microbatch"), 2, 6),
    (NoiseConfig("symmetric", alpha=0.0), 2, 3),  # no noise: one copy
    (NoiseConfig("uniform", pairing="microbatch"), 2, 3),
    (NoiseConfig("none"), 2, 3),
])
def test_the_pairing_doubles_either_the_rows_or_the_microbatches_of_a_symmetric_step(noise, rows, microbatches):
    assert noise.rows_per_microbatch(2) == rows and noise.microbatches_per_step(3) == microbatches
    assert noise.copies == (2 if noise.is_symmetric else 1)
