"""The tensor fmix32 against MurmurHash3's finaliser on Python integers."""

import torch

from symnoise_megatron.noise.counter_rng import fmix32, fmix32_int


def murmur3_fmix32(h: int) -> int:
    """MurmurHash3's fmix32 as published, with explicit 32-bit wrap-around."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def test_tensor_fmix32_equals_the_published_finaliser_on_every_bit_pattern_class():
    generator = torch.Generator().manual_seed(5)
    values = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1]),
                        torch.randint(0, 2**32, (4096,), generator=generator, dtype=torch.int64)])
    original = values.clone()
    mixed = fmix32(values)
    assert torch.equal(values, original), "fmix32 must not modify its input"
    assert mixed.tolist() == [murmur3_fmix32(v) for v in values.tolist()]
    assert [fmix32_int(v) for v in values.tolist()] == mixed.tolist()
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 2**32
