"""A tiny LLaMA-style GPTModel trained with SymNoise under TP 2 on CPU, printing losses.

Run with ``torchrun --nproc-per-node 2 tools/smoke_symnoise.py``. Synthetic data: each row
counts upward from a random start, so the next token is learnable and the loss falls.
"""

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.noise import NOISE_KINDS, PAIRINGS, NoiseConfig
from symnoise_megatron.runtime.cpu import cpu_runtime
from symnoise_megatron.runtime.parallel import ParallelConfig, initialize_distributed
from symnoise_megatron.training.forward_step import forward_step
from symnoise_megatron.training.microbatch import (
    MicroBatch, attention_mask_from_positions, microbatch_rows, microbatches_per_step,
    paired_microbatches,
)


def counting_microbatch(step, index, size, seq, vocab):
    generator = torch.Generator().manual_seed(step * 1000 + index)
    starts = torch.randint(0, vocab - seq - 1, (size, 1), generator=generator)
    tokens = starts + torch.arange(seq)
    positions = torch.arange(seq).expand(size, seq).clone()
    uids = torch.arange(size) + (step * 1000 + index) * size
    return MicroBatch(tokens, tokens + 1, torch.ones(size, seq), positions,
                      attention_mask_from_positions(positions), uids, torch.full((size,), seq))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--noise-kind", choices=NOISE_KINDS, default="symmetric")
    parser.add_argument("--noise-pairing", choices=PAIRINGS, default="concat")
    parser.add_argument("--noise-alpha", type=float, default=5.0)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=2)
    args = parser.parse_args()

    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size)
    noise = NoiseConfig(args.noise_kind, args.noise_alpha, pairing=args.noise_pairing)
    model_config = ModelConfig(vocab_size=256, max_position_embeddings=32, num_query_groups=2)
    with cpu_runtime():
        initialize_distributed(parallel)
        torch.manual_seed(0)
        model = build_gpt_model(model_config, noise, make_transformer_config(model_config, parallel))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        micro_batch, num_micro, seq = 4, 2, 32
        for step in range(args.steps):
            optimizer.zero_grad()
            data = (counting_microbatch(step, i, micro_batch, seq, 256) for i in range(num_micro))
            reports = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=paired_microbatches(data, noise),
                model=[model],
                num_microbatches=microbatches_per_step(num_micro, noise),
                seq_length=seq,
                micro_batch_size=microbatch_rows(micro_batch, noise),
            )
            loss_sum, tokens = torch.stack([r["lm loss"] for r in reports]).sum(0)
            for param in model.parameters():
                param.grad /= tokens
            optimizer.step()
            if dist.get_rank() == 0:
                scale = model.embedding.word_embeddings.last_noise_scale
                print(f"iteration {step + 1:4d}/{args.steps:4d} | lm loss: {loss_sum / tokens:.4f} | "
                      f"noise scale: {scale:.3e} | tokens: {int(tokens)}", flush=True)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
