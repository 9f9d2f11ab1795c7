"""The pure noise function: scale, laws, pairing, padding, purity, packing."""

import math

import pytest
import torch

from symnoise_megatron.noise import NoiseConfig, embedding_noise, noise_scale

HIDDEN = 64


def full_rows(batch, seq, uid_start=0):
    positions = torch.arange(seq).expand(batch, seq).clone()
    return torch.arange(uid_start, uid_start + batch), positions


def test_uniform_scale_matches_transformers_neftune():
    neftune = pytest.importorskip("transformers.integrations.neftune")
    batch, seq, alpha = 4, 128, 5.0
    embedding = torch.nn.Embedding(10, HIDDEN)
    embedding.neftune_noise_alpha = alpha
    embedding.train()
    clean = torch.zeros(batch, seq, HIDDEN)
    reference = neftune.neftune_post_forward_hook(embedding, None, clean)
    reference_bound = reference.abs().max().item()

    uids, positions = full_rows(batch, seq)
    ours = embedding_noise(NoiseConfig("uniform", alpha), uids, positions, torch.full((batch,), seq), HIDDEN)
    bound = alpha / math.sqrt(seq * HIDDEN)
    # Both draw U(-m, m) with the same m: over 32k draws each max lands within 0.1% of m.
    assert ours.abs().max().item() <= bound
    assert reference_bound <= bound * (1 + 1e-6)
    assert ours.abs().max().item() == pytest.approx(reference_bound, rel=2e-3)
    assert ours.abs().max().item() == pytest.approx(bound, rel=2e-3)


def test_scale_uses_each_sequences_real_length():
    seq, alpha = 256, 10.0
    lengths = torch.tensor([256, 64, 16])
    uids, positions = full_rows(3, seq)
    noise = embedding_noise(NoiseConfig("bernoulli", alpha), uids, positions, lengths, HIDDEN)
    for row, length in enumerate(lengths.tolist()):
        expected = alpha / math.sqrt(length * HIDDEN)
        real = noise[row, :length].abs()
        assert torch.allclose(real, torch.full_like(real, expected))
        assert torch.all(noise[row, length:] == 0)


@pytest.mark.parametrize("kind", ["bernoulli", "symmetric"])
def test_sign_noise_is_exactly_plus_minus_scale_and_balanced(kind):
    uids, positions = full_rows(8, 64)
    noise = embedding_noise(NoiseConfig(kind, 5.0), uids, positions, torch.full((8,), 64), HIDDEN)
    scale = 5.0 / math.sqrt(64 * HIDDEN)
    values = torch.unique(noise)
    assert torch.equal(values, torch.tensor([-scale, scale], dtype=torch.float32))
    plus_fraction = (noise > 0).float().mean().item()
    assert abs(plus_fraction - 0.5) < 0.01  # 32k fair coins: sd 0.003


def test_uniform_law():
    uids, positions = full_rows(8, 128)
    noise = embedding_noise(NoiseConfig("uniform", 1.0), uids, positions, torch.full((8,), 128), HIDDEN)
    eps = noise / (1.0 / math.sqrt(128 * HIDDEN))
    assert eps.abs().max() < 1.0
    assert abs(eps.mean().item()) < 0.01  # 65k draws, sd of mean 0.0023
    assert eps.var().item() == pytest.approx(1 / 3, rel=0.02)


def test_gaussian_law():
    uids, positions = full_rows(8, 128)
    noise = embedding_noise(NoiseConfig("gaussian", 1.0), uids, positions, torch.full((8,), 128), HIDDEN)
    eps = (noise / (1.0 / math.sqrt(128 * HIDDEN))).flatten()
    assert abs(eps.mean().item()) < 0.02
    assert eps.var().item() == pytest.approx(1.0, rel=0.02)
    assert (eps.abs() < 1).float().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert (eps.abs() > 3).any()  # heavier tails than the bounded kinds


def test_symmetric_partner_is_exact_negation():
    uids, positions = full_rows(3, 32)
    config = NoiseConfig("symmetric", 5.0)
    lengths = torch.tensor([32, 20, 7])
    plus = embedding_noise(config, uids, positions, lengths, HIDDEN, sign=1)
    minus = embedding_noise(config, uids, positions, lengths, HIDDEN, sign=-1)
    assert torch.equal(minus, -plus)
    per_row = embedding_noise(config, uids, positions, lengths, HIDDEN, sign=torch.tensor([1, -1, 1]))
    assert torch.equal(per_row[1], minus[1]) and torch.equal(per_row[0], plus[0])


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "bernoulli", "symmetric"])
def test_padding_gets_exactly_zero(kind):
    uids, positions = full_rows(2, 40)
    noise = embedding_noise(NoiseConfig(kind, 15.0), uids, positions, torch.tensor([40, 13]), HIDDEN)
    assert torch.count_nonzero(noise[1, 13:]) == 0
    assert torch.count_nonzero(noise[1, :13]) > 0


def test_none_and_zero_alpha_give_zero():
    uids, positions = full_rows(2, 8)
    for config in (NoiseConfig("none", 5.0), NoiseConfig("uniform", 0.0)):
        assert torch.count_nonzero(embedding_noise(config, uids, positions, torch.tensor([8, 8]), HIDDEN)) == 0


def test_noise_is_a_pure_function_of_coordinates():
    config = NoiseConfig("gaussian", 5.0, seed=7)
    uids, positions = full_rows(4, 32, uid_start=100)
    lengths = torch.full((4,), 32)
    full = embedding_noise(config, uids, positions, lengths, HIDDEN)
    # Other row order, a sequence slice, a hidden slice: the same values at the same coordinates.
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(embedding_noise(config, uids[order], positions[order], lengths, HIDDEN), full[order])
    window = embedding_noise(config, uids, positions[:, 10:20], lengths, HIDDEN)
    assert torch.equal(window, full[:, 10:20])
    shard = embedding_noise(config, uids, positions, lengths, HIDDEN, hidden_slice=slice(16, 48))
    assert torch.equal(shard, full[..., 16:48])
    # Any coordinate change gives new noise.
    assert not torch.equal(embedding_noise(config, uids + 4, positions, lengths, HIDDEN), full)
    reseeded = embedding_noise(NoiseConfig("gaussian", 5.0, seed=8), uids, positions, lengths, HIDDEN)
    assert not torch.allclose(reseeded, full)
    rows_alike = torch.stack([torch.corrcoef(torch.stack([full[0].flatten(), full[i].flatten()]))[0, 1] for i in (1, 2, 3)])
    assert rows_alike.abs().max() < 0.05


def test_large_uids_and_positions_stay_distinct():
    config = NoiseConfig("uniform", 1.0)
    positions = torch.tensor([[0, 1]])
    lengths = torch.tensor([2])
    a = embedding_noise(config, torch.tensor([2**40 + 3]), positions, lengths, HIDDEN)
    b = embedding_noise(config, torch.tensor([3]), positions, lengths, HIDDEN)
    assert not torch.equal(a, b)


def test_packed_row_equals_its_samples_unpacked():
    config = NoiseConfig("symmetric", 5.0)
    # Two samples of lengths 5 and 3 packed into one row of 10, then 2 padding tokens.
    uids = torch.tensor([[11] * 5 + [12] * 3 + [12] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    lengths = torch.tensor([[5] * 5 + [3] * 5])
    packed = embedding_noise(config, uids, positions, lengths, HIDDEN)
    first = embedding_noise(config, torch.tensor([11]), torch.arange(5)[None], torch.tensor([5]), HIDDEN)
    second = embedding_noise(config, torch.tensor([12]), torch.arange(3)[None], torch.tensor([3]), HIDDEN)
    assert torch.equal(packed[0, :5], first[0])
    assert torch.equal(packed[0, 5:8], second[0])
    assert torch.count_nonzero(packed[0, 8:]) == 0


def test_noise_scale_formula():
    scale = noise_scale(5.0, torch.tensor([512, 100, 0]), 4096)
    expected = torch.tensor([5.0 / math.sqrt(512 * 4096), 5.0 / math.sqrt(100 * 4096), 0.0])
    assert torch.allclose(scale, expected)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        NoiseConfig("symnoise")
    with pytest.raises(ValueError, match="pairing"):
        NoiseConfig("symmetric", pairing="interleave")
    with pytest.raises(ValueError, match="alpha"):
        NoiseConfig("uniform", alpha=-1)
    assert NoiseConfig("symmetric").copies == 2 and NoiseConfig("bernoulli").copies == 1
