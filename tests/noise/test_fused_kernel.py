"""The Triton kernel against the torch reference, under Triton's interpreter on CPU (or on CUDA).

Uniform, bernoulli and symmetric must be bit-identical; gaussian within a few float32 ulps
(libm's log/cos). The interpreter is chosen before the kernel is first defined."""

import os

import pytest
import torch

from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import embedding_noise
from symnoise_megatron.noise.fused import add_noise_fused, fused_noise_usable
from tests.distributed import run_distributed

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """The interpreter for this module only: elsewhere CPU training keeps the torch reference."""
    if DEVICE == "cuda":
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    del os.environ["TRITON_INTERPRET"]


def batch(packed: bool, rows=3, seq=12):
    generator = torch.Generator().manual_seed(7)
    if packed:  # two samples per row, then padding
        positions = torch.cat([torch.arange(5), torch.arange(4), torch.arange(4, 7)]).expand(rows, seq).clone()
        lengths = torch.tensor([5] * 5 + [4] * 7).expand(rows, seq).clone()
        uids = torch.tensor([2**33 + 5] * 5 + [17] * 7).expand(rows, seq).clone() + torch.arange(rows)[:, None]
    else:
        positions = torch.arange(seq).expand(rows, seq).clone()
        lengths = torch.tensor([seq, 7, 0])[:rows]
        uids = torch.randint(0, 2**40, (rows,), generator=generator)
    return uids, positions, lengths


@pytest.mark.parametrize("kind", ["uniform", "bernoulli", "symmetric", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter (numpy) has no bfloat16"))])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_kernel_gives_the_reference_bits(kind, dtype, packed):
    config = NoiseConfig(kind, alpha=7.3, seed=3)  # not a binary fraction: the float64 scale must round alike
    uids, positions, lengths = batch(packed)
    hidden = 80  # not a power of two: the last block is masked
    x = torch.randn(3, 12, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    sign = torch.tensor([1, -1, 1])
    assert fused_noise_usable(x)
    fused = add_noise_fused(x, config, uids, positions, lengths, sign, block=32).cpu()
    reference = (x.cpu() + embedding_noise(config, uids, positions, lengths, hidden, sign=sign, dtype=dtype))
    if kind == "gaussian":
        torch.testing.assert_close(fused.float(), reference.float(), rtol=0, atol=4e-6 if dtype == torch.float32 else 8e-3)  # libm ulps, then one rounding
    else:
        assert torch.equal(fused, reference)
    padding = positions >= lengths[:, None] if lengths.dim() == 1 else positions >= lengths
    assert torch.equal(fused[padding], x.cpu()[padding])  # padding is never noised


def test_kernel_handles_the_sequence_parallel_layout():
    # Under sequence parallelism the embedding output is [s, b, h]; the kernel sees a strided [b, s, h] view.
    config = NoiseConfig("symmetric", alpha=5.0, seed=0)
    uids, positions, lengths = batch(False)
    x = torch.randn(12, 3, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    fused = add_noise_fused(x.transpose(0, 1), config, uids, positions, lengths, -1, block=64).cpu()
    reference = x.cpu().transpose(0, 1) + embedding_noise(config, uids, positions, lengths, 64, sign=-1)
    assert torch.equal(fused, reference)


def test_interpreter_refuses_bfloat16_rather_than_computing_garbage():
    if DEVICE != "cpu":
        pytest.skip("CUDA runs bfloat16")
    assert not fused_noise_usable(torch.zeros(2, 3, 8, dtype=torch.bfloat16))
    assert fused_noise_usable(torch.zeros(2, 3, 8))


def embed_both_ways(sequence_parallel):
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from symnoise_megatron.model.builder import make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise.embedding import NoiseBatch, NoisyVocabParallelEmbedding, set_noise_batch
    from symnoise_megatron.runtime.parallel import initialize_distributed

    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    initialize_distributed(parallel)
    config = make_transformer_config(ModelConfig(hidden_size=48, num_attention_heads=4, vocab_size=64), parallel)
    torch.manual_seed(5)
    plain = VocabParallelEmbedding(64, 48, init_method=torch.nn.init.normal_,
                                   reduce_scatter_embeddings=sequence_parallel, config=config)
    noisy = NoisyVocabParallelEmbedding.replacing(plain, NoiseConfig("symmetric", alpha=5.0, seed=1), config)
    noisy.train()
    uids, positions, lengths = batch(True, rows=2, seq=12)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    set_noise_batch(noisy, NoiseBatch(uids, positions, lengths, torch.tensor([1, -1])))
    outputs = []
    for fused in (True, False):
        noisy.use_fused_noise = fused
        outputs.append(noisy(tokens))
    return outputs


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_the_embedding_adds_the_same_noise_with_the_kernel(sequence_parallel):
    for fused, reference in run_distributed(embed_both_ways, 2, sequence_parallel):
        assert torch.equal(fused, reference)
