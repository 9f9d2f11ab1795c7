"""Compare a megatron checkpoint's logits with transformers' on the original HF model.

Both models run on this rank's device (its GPU under NCCL, else the CPU), in FP32. The verdict
is relative to the logits' scale: the largest |difference| over the largest |logit| of
transformers. Where megatron-core runs Transformer Engine's layers, their FP32 GEMMs run as TF32
(a 10-bit mantissa), so the default tolerance there is looser; a conversion error (a swapped
head, a transposed weight) moves the logits by their own size either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

# Relative to the largest |logit|. FP32 throughout: SmolLM2-135M's 30 layers measured 2.9e-6 and
# 5.8e-6 under TP 3 and PP 2 on CPU (tools/bench/RESULTS.md).
FP32_TOLERANCE = 2e-5
# TE's TF32 GEMMs: each input rounded to 11 significant bits (about 5e-4 relative), compounded
# over the layers. Set from that bound, not yet measured on a GPU.
TF32_TOLERANCE = 1e-2


@dataclass
class ParityReport:
    max_abs_diff: float
    max_rel_diff: float
    max_abs_logit: float  # the scale the differences are measured against
    megatron_loss: float
    hf_loss: float
    tokens: int
    device: str = "cpu"
    tf32: bool = False  # megatron's layers ran Transformer Engine's FP32 GEMMs (as TF32)

    @property
    def scaled_diff(self) -> float:
        """The largest |difference| over the largest |logit|: what the tolerance bounds."""
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    def default_tolerance(self) -> float:
        return TF32_TOLERANCE if self.tf32 else FP32_TOLERANCE

    def passed(self, tolerance: Optional[float] = None) -> bool:
        return self.scaled_diff <= (self.default_tolerance() if tolerance is None else tolerance)


@contextlib.contextmanager
def exact_fp32_matmuls():
    """torch's own FP32 GEMMs in full FP32 (no TF32) on CUDA for the check, whatever the process set."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def megatron_logits(chunks, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage, None elsewhere.

    One row per micro-batch, so every schedule runs it (interleaving needs >= PP micro-batches).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from symnoise_megatron.data.microbatch import attention_mask_from_positions
    from symnoise_megatron.model.builder import built_with_transformer_engine

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device)[None]
    # Only the local spec reads a mask (TE's attention is causal by itself).
    mask = None if any(built_with_transformer_engine(chunk) for chunk in chunks) else attention_mask_from_positions(positions)

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
    """Load both on this rank's device, run the same random token batch; the report on the last
    stage, else None."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.load import load_model_weights
    from symnoise_megatron.model.builder import build_model_chunks, built_with_transformer_engine, make_transformer_config
    from symnoise_megatron.model.parallelism import validate_layout
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import compute_device

    model = model_config_of(megatron_dir)
    check_same_model(hf_dir, megatron_dir, model)
    validate_layout(model, parallel)
    info = paths.read_info(megatron_dir)
    chunks = build_model_chunks(
        model, NoiseConfig("none"), make_transformer_config(model, parallel),
        make_vocab_size_divisible_by=info["make_vocab_size_divisible_by"],
    )
    load_model_weights(chunks, paths.latest_checkpoint_dir(megatron_dir))
    device = compute_device()
    # As the trainer: layers megatron-core builds on the host (the local spec's norms) join the rest.
    chunks = [chunk.to(device) for chunk in chunks]
    tokens = torch.randint(0, model.vocab_size, (batch, min(seq, model.max_position_embeddings)),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    with exact_fp32_matmuls():
        logits = megatron_logits(chunks, tokens, model.vocab_size)
        if logits is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
        reference.eval()
        with torch.no_grad():
            expected = reference(input_ids=tokens).logits.float()
    logits, expected, tokens = logits.cpu(), expected.cpu(), tokens.cpu()
    difference = (logits - expected).abs()
    return ParityReport(
        max_abs_diff=float(difference.max()),
        max_rel_diff=float((difference / expected.abs().clamp(min=1e-6)).max()),
        max_abs_logit=float(expected.abs().max()),
        megatron_loss=next_token_loss(logits, tokens), hf_loss=next_token_loss(expected, tokens),
        tokens=tokens.numel(), device=str(device), tf32=any(built_with_transformer_engine(c) for c in chunks),
    )
