"""Compare a megatron checkpoint's logits with transformers' on the original HF model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ParityReport:
    max_abs_diff: float
    max_rel_diff: float
    max_abs_logit: float  # the scale the differences are measured against
    megatron_loss: float
    hf_loss: float
    tokens: int

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage, None elsewhere.

    One row per micro-batch, so every schedule runs it (interleaving needs >= PP micro-batches).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from symnoise_megatron.data.microbatch import attention_mask_from_positions

    batch, seq = tokens.shape
    positions = torch.arange(seq)[None]
    mask = attention_mask_from_positions(positions)

    def forward_step(data_iterator, model):
        row = next(data_iterator)
        output = model(row, positions, mask)

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor)[..., :vocab_size]

        return output, collect

    rows = [tokens[i:i + 1] for i in range(batch)]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
            model=chunks, num_microbatches=batch, seq_length=seq, micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([output.float() for output in outputs])


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))


def check_same_model(hf_dir: str, megatron_dir: str, model) -> None:
    """Refuse two different models before any forward pass (tokens of one vocabulary would index
    past the other's embedding, a traceback rather than an answer)."""
    from dataclasses import asdict

    from symnoise_megatron.checkpoint.convert import read_hf_config
    from symnoise_megatron.checkpoint.hf_config import model_config_from_hf

    def forward_shape(config) -> dict:
        # What the logits depend on: None query groups means one per head, and the init std does not count.
        return dict(asdict(config), num_query_groups=config.query_groups, init_method_std=None)

    theirs, ours = forward_shape(model_config_from_hf(read_hf_config(hf_dir))), forward_shape(model)
    differing = [f"{key} {ours[key]} vs {theirs[key]}" for key in ours if ours[key] != theirs[key]]
    if differing:
        raise ValueError(f"--megatron-dir {megatron_dir} and --hf-dir {hf_dir} are different models: "
                         + ", ".join(differing))


def compare_with_transformers(
    hf_dir: str, megatron_dir: str, parallel, *, batch: int = 2, seq: int = 32, seed: int = 0,
) -> Optional[ParityReport]:
    """Load both, run the same random token batch; the report on the last stage, else None."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.load import load_model_weights
    from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config
    from symnoise_megatron.model.parallelism import validate_layout
    from symnoise_megatron.noise import NoiseConfig

    model = model_config_of(megatron_dir)
    check_same_model(hf_dir, megatron_dir, model)
    validate_layout(model, parallel)
    info = paths.read_info(megatron_dir)
    chunks = build_model_chunks(
        model, NoiseConfig("none"), make_transformer_config(model, parallel),
        make_vocab_size_divisible_by=info["make_vocab_size_divisible_by"],
    )
    load_model_weights(chunks, paths.latest_checkpoint_dir(megatron_dir))
    tokens = torch.randint(0, model.vocab_size, (batch, min(seq, model.max_position_embeddings)),
                           generator=torch.Generator().manual_seed(seed))
    logits = megatron_logits(chunks, tokens, model.vocab_size)
    if logits is None or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reference.eval()
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits.float()
    difference = (logits - expected).abs()
    return ParityReport(
        max_abs_diff=float(difference.max()),
        max_rel_diff=float((difference / expected.abs().clamp(min=1e-6)).max()),
        max_abs_logit=float(expected.abs().max()),
        megatron_loss=next_token_loss(logits, tokens), hf_loss=next_token_loss(expected, tokens),
        tokens=tokens.numel(),
    )
