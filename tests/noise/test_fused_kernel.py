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


KINDS = ("uniform", "bernoulli", "symmetric", "gaussian")
# The sign of a micro-batch: ``microbatch`` pairing's -1 copy (one sign for the whole micro-batch),
# ``concat``'s per-row signs.
SIGNS = {"microbatch": -1, "concat": torch.tensor([1, -1])}
# padded rows, packed rows, and packed rows laid end to end ([1, b * s], Transformer Engine's thd path)
ROWS = ("padded", "packed", "packed_end_to_end")


def fused_and_reference_embeddings():
    """On each layout (TP 2, TP 2 + SP) and dtype, for every row layout and sign: the noisy
    output and the embedding weight's gradient of the fused path and of the torch reference,
    under the same upstream gradient. The kinds take turns (every kind meets every layout, dtype,
    row layout and sign across the groups): each interpreted launch costs a tenth of a second."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from symnoise_megatron.model.builder import make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise.embedding import NoiseBatch, NoisyVocabParallelEmbedding, set_noise_batch
    from symnoise_megatron.runtime.parallel import initialize_distributed

    results, turn = {}, 0
    for sequence_parallel in (False, True):
        parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        initialize_distributed(parallel)
        for dtype in (torch.float32, torch.float16):
            config = make_transformer_config(ModelConfig(hidden_size=48, num_attention_heads=4, vocab_size=64), parallel,
                                             params_dtype=dtype)
            torch.manual_seed(5)
            plain = VocabParallelEmbedding(64, 48, init_method=torch.nn.init.normal_,
                                           reduce_scatter_embeddings=sequence_parallel, config=config)
            for rows in ROWS:
                uids, positions, lengths = batch(rows != "padded", rows=2, seq=12)
                tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
                if rows == "packed_end_to_end":
                    tokens = tokens.reshape(1, 24)
                for sign_name, sign in SIGNS.items():
                    kind = KINDS[turn % len(KINDS)]
                    turn += 1
                    noisy = NoisyVocabParallelEmbedding.replacing(plain, NoiseConfig(kind, alpha=5.0, seed=1), config)
                    noisy.train()
                    set_noise_batch(noisy, NoiseBatch(uids, positions, lengths, sign))
                    runs = []
                    for fused in (True, False):
                        noisy.use_fused_noise = fused
                        noisy.weight.grad = None
                        output = noisy(tokens)
                        upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
                        (output.float() * upstream.float()).sum().backward()
                        runs.append((output.detach().clone(), noisy.weight.grad.clone()))
                    key = ("tp2_sp" if sequence_parallel else "tp2", str(dtype).split(".")[1], kind, rows, sign_name)
                    results[key] = runs
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.distributed
def test_the_kernel_noises_and_trains_the_embedding_as_the_reference_does():
    """Issue 24: the fused path must add the reference's noise and pass the embedding its gradient
    (a raw launch left the output without a grad_fn: on CUDA the word embeddings never trained)."""
    for rank_results in run_distributed(fused_and_reference_embeddings, 2):
        assert len(rank_results) == 2 * 2 * len(ROWS) * len(SIGNS)
        assert {key[2] for key in rank_results} == set(KINDS)
        for key, ((fused_out, fused_grad), (reference_out, reference_grad)) in rank_results.items():
            if key[2] == "gaussian":  # libm's last bits, as in test_kernel_gives_the_reference_bits
                torch.testing.assert_close(fused_out.float(), reference_out.float(), rtol=0, atol=8e-3)
            else:
                assert torch.equal(fused_out, reference_out), key
            assert torch.equal(fused_grad, reference_grad), key
            assert fused_grad.abs().sum() > 0, key
