"""NoisyVocabParallelEmbedding on real gloo process groups: rank consistency and layout invariance.

One 4-rank run builds the embedding under every layout below in turn and records, for each
(sample uid, position), the noised output row each rank produced; the tests compare them.
"""

import pytest
import torch

from symnoise_megatron.noise import NoiseConfig, embedding_noise
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, HIDDEN, SEQ = 96, 32, 16
LENGTHS = [16, 11, 16, 5]  # four samples, uids 0..3, two of them padded
NOISE = NoiseConfig("symmetric", alpha=10.0, seed=99)

# name: (tensor parallel, context parallel, sequence parallel, micro-batch size)
LAYOUTS = {
    "tp1_dp4_mbs1": (1, 1, False, 1),
    "tp2_dp2_mbs1": (2, 1, False, 1),
    "tp2_dp2_mbs2": (2, 1, False, 2),
    "tp4_dp1_mbs1": (4, 1, False, 1),
    "tp4_dp1_mbs2": (4, 1, False, 2),
    "tp4_dp1_mbs4": (4, 1, False, 4),
    "tp2_sp_dp2_mbs2": (2, 1, True, 2),
    "tp4_sp_dp1_mbs4": (4, 1, True, 4),
    "tp4_sp_dp1_mbs2": (4, 1, True, 2),
    "tp1_cp2_dp2_mbs2": (1, 2, False, 2),
    "tp2_cp2_dp1_mbs4": (2, 2, False, 4),
}


def global_batch():
    tokens = torch.randint(0, VOCAB, (len(LENGTHS), SEQ), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(SEQ).expand(len(LENGTHS), SEQ).clone()
    return tokens, positions, torch.tensor(LENGTHS), torch.arange(len(LENGTHS))


def embed_under_layouts():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from symnoise_megatron.data.microbatch import context_parallel_index
    from symnoise_megatron.model.builder import make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise.embedding import NoiseBatch, NoisyVocabParallelEmbedding, set_noise_batch
    from symnoise_megatron.runtime.parallel import initialize_distributed

    model = ModelConfig(hidden_size=HIDDEN, num_attention_heads=4, vocab_size=VOCAB)
    tokens, positions, lengths, uids = global_batch()
    records, end_to_end_errors = {}, {}
    for name, (tp, cp, sp, mbs) in LAYOUTS.items():
        parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp)
        initialize_distributed(parallel)
        config = make_transformer_config(model, parallel)
        torch.manual_seed(5)  # the same full weight on every rank, sharded by vocabulary
        plain = VocabParallelEmbedding(
            VOCAB, HIDDEN, init_method=torch.nn.init.normal_, reduce_scatter_embeddings=sp, config=config
        )
        noisy = NoisyVocabParallelEmbedding.replacing(plain, NOISE, config)
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        cp_index = context_parallel_index(SEQ, parallel_state.get_context_parallel_rank(), cp)
        per_rank = len(LENGTHS) // dp_size
        rows = {}
        for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, mbs):
            batch = slice(start, start + mbs)
            local_tokens, local_positions = tokens[batch][:, cp_index], positions[batch][:, cp_index]
            set_noise_batch(noisy, NoiseBatch(uids[batch], local_positions, lengths[batch]))
            noisy.train()
            trained = noisy(local_tokens)
            noisy.eval()
            evaluated = noisy(local_tokens)
            reference = plain(local_tokens)
            held_positions = local_positions
            if sp:  # [s/tp, b, h]: this rank holds a slice of the sequence
                trained, evaluated, reference = (t.transpose(0, 1) for t in (trained, evaluated, reference))
                local = trained.shape[1]
                rank = parallel_state.get_tensor_model_parallel_rank()
                held_positions = local_positions[:, rank * local:(rank + 1) * local]
            assert torch.equal(evaluated, reference), "eval mode must equal the plain embedding"
            if cp == 1:
                end_to_end_errors.setdefault(name, []).append(
                    end_to_end_error(noisy, plain, local_tokens, uids[batch], local_positions, lengths[batch]))
            for row, uid in enumerate(uids[batch].tolist()):
                for col, pos in enumerate(held_positions[row].tolist()):
                    rows[(uid, pos)] = (trained[row, col].clone(), reference[row, col].clone())
        records[name] = rows
        parallel_state.destroy_model_parallel()
    records["end_to_end_errors"] = end_to_end_errors
    return records


def end_to_end_error(noisy, plain, tokens, uids, positions, lengths):
    """Packed rows on TE's thd path reach the embedding laid end to end ([1, b * s]) while the
    noise batch keeps its rows: the largest difference from the pure noise of those tokens
    (under SP: of this rank's slice of them), with the symmetric copies' signs per row."""
    from megatron.core import parallel_state

    from symnoise_megatron.noise.embedding import NoiseBatch, set_noise_batch

    rows, seq = tokens.shape
    signs = torch.tensor([1, -1] * rows)[:rows]
    set_noise_batch(noisy, NoiseBatch(uids, positions, lengths, signs))
    noisy.train()
    flat_tokens = tokens.reshape(1, rows * seq)
    noised, clean = noisy(flat_tokens).reshape(-1, HIDDEN), plain(flat_tokens).reshape(-1, HIDDEN)
    start = parallel_state.get_tensor_model_parallel_rank() * noised.shape[0] if noisy.reduce_scatter_embeddings else 0
    expected = embedding_noise(NOISE, uids, positions, lengths, HIDDEN, sign=signs).reshape(rows * seq, HIDDEN)
    return float((noised - clean - expected[start:start + noised.shape[0]]).abs().max())


@pytest.fixture(scope="module")
def per_rank_records():
    return run_distributed(embed_under_layouts, 4)


def merged(per_rank_records, layout):
    """(uid, pos) -> the list of rows every rank produced for it under ``layout``."""
    out = {}
    for rank_records in per_rank_records:
        for key, value in rank_records[layout].items():
            out.setdefault(key, []).append(value)
    return out


def test_rows_laid_end_to_end_get_the_noise_of_their_rows(per_rank_records):
    layouts = [name for name, (_, cp, _, _) in LAYOUTS.items() if cp == 1]
    for rank_records in per_rank_records:
        errors = rank_records["end_to_end_errors"]
        assert sorted(errors) == sorted(layouts)
        for layout in layouts:
            assert max(errors[layout]) < 1e-6, layout


def test_every_layout_covers_every_token(per_rank_records):
    expected = {(uid, pos) for uid in range(len(LENGTHS)) for pos in range(SEQ)}
    for layout in LAYOUTS:
        assert set(merged(per_rank_records, layout)) == expected, layout


@pytest.mark.parametrize("layout", ["tp2_dp2_mbs1", "tp4_dp1_mbs2", "tp2_cp2_dp1_mbs4"])
def test_tensor_parallel_ranks_add_identical_noise(per_rank_records, layout):
    tp = LAYOUTS[layout][0]
    for key, replicas in merged(per_rank_records, layout).items():
        assert len(replicas) == tp, key
        for trained, _ in replicas[1:]:
            assert torch.equal(trained, replicas[0][0]), (layout, key)


@pytest.mark.parametrize("layout", ["tp2_sp_dp2_mbs2", "tp4_sp_dp1_mbs4"])
def test_sequence_parallel_slices_equal_slices_of_the_full_noise(per_rank_records, layout):
    _, positions, lengths, uids = global_batch()
    full = embedding_noise(NOISE, uids, positions, lengths, HIDDEN)
    rows = merged(per_rank_records, layout)
    for (uid, pos), replicas in rows.items():
        assert len(replicas) == 1, "under SP each position is held by exactly one TP rank"
        trained, clean = replicas[0]
        assert torch.allclose(trained - clean, full[uid, pos], atol=1e-6, rtol=0)


def test_noise_is_identical_across_layouts(per_rank_records):
    baseline = merged(per_rank_records, "tp1_dp4_mbs1")
    for layout in LAYOUTS:
        rows = merged(per_rank_records, layout)
        for key, replicas in rows.items():
            assert torch.equal(replicas[0][0], baseline[key][0][0]), (layout, key)


def test_noise_matches_the_pure_function_and_spares_padding(per_rank_records):
    _, positions, lengths, uids = global_batch()
    full = embedding_noise(NOISE, uids, positions, lengths, HIDDEN)
    for key, replicas in merged(per_rank_records, "tp2_cp2_dp1_mbs4").items():
        trained, clean = replicas[0]
        uid, pos = key
        if pos >= LENGTHS[uid]:
            assert torch.equal(trained, clean), f"padding {key} was changed"
        else:
            assert torch.allclose(trained - clean, full[uid, pos], atol=1e-6, rtol=0)
            assert not torch.equal(trained, clean)
