"""Which TP/PP/CP/DP layout for a fine-tune: memory per GPU and step time, estimated.

Memory per GPU, on the busiest pipeline stage (the first: embedding plus its layers):
- weights: 2 bytes per parameter held (BF16; FP8 adds a 1-byte copy of the GEMM weights);
- gradients: 4 bytes (megatron-core DDP's FP32 main-grad buffer);
- optimizer: 12 bytes (FP32 master copy, Adam's two moments), divided by DP x CP with the
  distributed optimizer;
- activations: per layer and micro-batch ``34 * s * b * h / (TP * CP)`` bytes with sequence
  parallelism and flash attention (Korthikanti et al. 2022, selective recompute), ``2 * s * b
  * h / (TP * CP)`` with full recompute; the first stage holds ``PP`` micro-batches in flight
  under 1F1B, i.e. all of the model's layers' worth. ``concat`` pairing doubles every
  micro-batch's rows; ``microbatch`` pairing does not;
- logits: FP32 ``s * b * V / TP`` twice (logits and their gradient) on the last stage, every
  position counted (an upper bound: without sequence parallelism the model computes logits at
  loss tokens only, whose share the planner does not know);
- inputs: the step's micro-batches, all moved to the device before the schedule runs (token
  ids, labels, loss mask, positions, sample uids, lengths, loss positions: at most
  ``INPUT_BYTES_PER_TOKEN`` a token); on megatron-core's local spec also the dense boolean
  attention mask each in-flight micro-batch keeps for its backward (``b * s * s`` bytes, packed
  rows; padded rows share one ``s * s``). Transformer Engine's attention reads no mask, and the
  training loop builds none for it;
- a fixed 5 GB for the CUDA context, NCCL buffers and allocator fragmentation.

Step time: model FLOPs of the step (6 x parameters + attention, per token, x 2 for the
symmetric pair) over GPUs x peak x the stated MFU, stretched by the 1F1B bubble
``(PP - 1) / micro-batches``, plus three communication terms, none assumed overlapped (so
the estimate errs slow): the distributed optimizer's gradient reduce-scatter and parameter
all-gather over DP (FP32 gradients, BF16 parameters: 6 bytes per held parameter x (DP - 1) /
DP), over NVLink inside a node or the per-GPU network bandwidth across nodes; the pipeline's
sends and receives of each micro-batch's activations and gradients (four of ``s * b * h / TP``
BF16 values), across nodes when a stage fills a node; sequence parallelism's all-gathers and
reduce-scatters (8 per layer and micro-batch of ``s * b * h`` BF16 values x (TP - 1) / TP) over
NVLink. The MFU is an input, not a prediction: it stands for kernel efficiency. Context
parallelism, when the loop supports it, is offered only where each rank keeps at least 2,048
tokens of the sequence (below that its ring exchange dominates).
Layouts are ranked: those that fit first; among them, those within 5% of the fastest
estimate (the estimate cannot tell such layouts apart) by fewer model-parallel ranks, then
by smaller TP; then the rest by time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from symnoise_megatron.model.config import ModelConfig, padded_vocab_size
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.runtime.hardware import GPU_MEMORY_GB, peak_tflops

GPUS_PER_NODE = 8
FIXED_OVERHEAD_GB = 5.0
# int64 tokens, labels, positions, uids, lengths and loss positions, a float32 loss mask.
INPUT_BYTES_PER_TOKEN = 6 * 8 + 4
MIN_TOKENS_PER_CONTEXT_RANK = 2048
# The fine-tuning loop does not split sequences across context-parallel ranks yet, so the
# planner offers none; the memory and time model already accounts for CP (2, 4, 8).
CONTEXT_PARALLEL_SIZES = (1,)
NVLINK_GBPS = 300.0  # achieved per-GPU collective bandwidth inside an H100 node, GB/s
USABLE_FRACTION = 0.92  # of the card, before the allocator runs out in practice


@dataclass(frozen=True)
class PlanInputs:
    """Attributes:
        model: the architecture (a preset or a converted checkpoint's).
        seq_length, global_batch_size, micro_batch_size: as the fine-tune's flags.
        gpus: total GPUs; gpu: H100, H200 or A100.
        fp8: FP8 GEMMs (Transformer Engine) instead of BF16.
        recompute: ``selective`` (flash attention, nothing else recomputed) or ``full``.
        pairing: ``concat`` or ``microbatch`` for symmetric noise, ``none`` for a single copy.
        mfu: model-FLOPs utilisation assumed for the step-time estimate.
        distributed_optimizer: shard optimizer state over data (and context) parallel ranks.
        spec: ``te`` (Transformer Engine: fused attention, no mask) or ``local`` (megatron-core's
            local spec: a dense attention mask per micro-batch in flight).
    """

    model: ModelConfig
    seq_length: int = 4096
    global_batch_size: int = 128
    micro_batch_size: int = 1
    gpus: int = 64
    gpu: str = "H100"
    fp8: bool = False
    recompute: str = "selective"
    pairing: str = "concat"
    mfu: float = 0.40
    network_gbps: float = 50.0  # per-GPU bandwidth across nodes (8 x 400 Gb/s NICs per 8 GPUs), GB/s
    distributed_optimizer: bool = True
    make_vocab_size_divisible_by: int = 128
    spec: str = "te"

    @property
    def noise(self) -> NoiseConfig:
        """The noise whose pairing the plan counts rows and micro-batches for."""
        if self.pairing == "none":
            return NoiseConfig("none")
        return NoiseConfig("symmetric", pairing=self.pairing)


@dataclass(frozen=True)
class LayoutPlan:
    tp: int
    pp: int
    cp: int
    dp: int
    parameters_per_gpu: int
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    step_seconds: float
    fits: bool
    inputs_gb: float = 0.0  # in total_gb; the micro-batches and (local spec) attention masks


    @property
    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"


def layer_parameters(model: ModelConfig) -> int:
    """Parameters of one transformer layer: attention, MLP and two norms."""
    return (model.num_parameters() - embedding_parameters(model, model.vocab_size)
            - model.norm_parameters - model.position_embedding_parameters) // model.num_layers


def embedding_parameters(model: ModelConfig, vocab: int) -> int:
    return vocab * model.hidden_size * (1 if model.tie_word_embeddings else 2)


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int, vocab_divisible_by: int = 128) -> int:
    """Parameters one tensor-parallel rank of pipeline ``stage`` holds, as megatron-core builds it
    (vocabulary padded; norms replicated over TP; a tied output layer kept on the last stage too)."""
    vocab = padded_vocab_size(model.vocab_size, vocab_divisible_by, tp)
    h, layers = model.hidden_size, model.num_layers // pp
    per_layer_norms = 2 * model.norm_parameters
    sharded_layer = layer_parameters(model) - per_layer_norms
    held = layers * (sharded_layer // tp + per_layer_norms)
    first, last = stage == 0, stage == pp - 1
    if first:
        held += vocab * h // tp
    if last:
        held += model.norm_parameters  # final norm
        if not model.tie_word_embeddings or pp > 1:
            held += vocab * h // tp  # output layer (a tied one is a copy on the last stage)
    return held


def _splits(model: ModelConfig, tp: int, pp: int) -> bool:
    try:
        validate_layout(model, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    except ValueError:
        return False
    return True


def valid_layouts(inputs: PlanInputs):
    model = inputs.model
    for tp in (t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE):
        for pp in range(1, min(model.num_layers, 32) + 1):
            if not _splits(model, tp, pp):
                continue
            for cp in CONTEXT_PARALLEL_SIZES:
                if inputs.seq_length % (2 * cp * tp) or (cp > 1 and inputs.seq_length // cp < MIN_TOKENS_PER_CONTEXT_RANK):
                    continue
                ranks = tp * pp * cp
                if inputs.gpus % ranks:
                    continue
                dp = inputs.gpus // ranks
                if inputs.global_batch_size % (inputs.micro_batch_size * dp):
                    continue
                yield tp, pp, cp, dp


def plan(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int) -> LayoutPlan:
    model = inputs.model
    gb = 2 ** 30
    held = max(stage_parameters(model, tp, pp, stage, inputs.make_vocab_size_divisible_by) for stage in (0, pp - 1))
    weights = held * (3 if inputs.fp8 else 2)
    gradients = held * 4
    optimizer = held * 12 / ((dp * cp) if inputs.distributed_optimizer else 1)
    rows = inputs.noise.rows_per_microbatch(inputs.micro_batch_size)
    per_layer_bytes = (2 if inputs.recompute == "full" else 34) * inputs.seq_length * rows * model.hidden_size / (tp * cp)
    layers_per_stage = model.num_layers // pp
    activations = per_layer_bytes * layers_per_stage * min(pp, max(1, _microbatches(inputs, dp)))
    vocab = padded_vocab_size(model.vocab_size, inputs.make_vocab_size_divisible_by, tp)
    logits = 2 * 4 * inputs.seq_length / cp * rows * vocab / tp
    held_inputs = input_bytes(inputs, pp, dp)
    total = (weights + gradients + optimizer + activations + logits + held_inputs) / gb + FIXED_OVERHEAD_GB
    return LayoutPlan(
        tp=tp, pp=pp, cp=cp, dp=dp, parameters_per_gpu=held, weights_gb=weights / gb, gradients_gb=gradients / gb,
        optimizer_gb=optimizer / gb, activations_gb=(activations + logits) / gb, total_gb=total, inputs_gb=held_inputs / gb,
        step_seconds=(step_seconds(inputs, pp, dp) + gradient_sync_seconds(inputs, held, tp * pp * cp, dp)
                      + tensor_parallel_seconds(inputs, tp, pp, cp, dp) + pipeline_seconds(inputs, tp, pp, cp, dp)), fits=total <= USABLE_FRACTION * GPU_MEMORY_GB[inputs.gpu],
    )


def input_bytes(inputs: PlanInputs, pp: int, dp: int) -> float:
    """The step's micro-batches on one rank's device, and the local spec's masks in flight."""
    tokens = inputs.global_batch_size // dp * inputs.seq_length * inputs.noise.copies
    masks = 0.0
    if inputs.spec == "local":
        rows = inputs.noise.rows_per_microbatch(inputs.micro_batch_size)
        masks = min(pp, _microbatches(inputs, dp)) * rows * inputs.seq_length ** 2
    return tokens * INPUT_BYTES_PER_TOKEN + masks


def _microbatches(inputs: PlanInputs, dp: int) -> int:
    per_replica = inputs.global_batch_size // (inputs.micro_batch_size * dp)
    return inputs.noise.microbatches_per_step(per_replica)


def step_seconds(inputs: PlanInputs, pp: int, dp: int) -> float:
    copies = inputs.noise.copies
    flops = inputs.model.flops_per_token(inputs.seq_length) * inputs.global_batch_size * inputs.seq_length * copies
    peak = peak_tflops(inputs.gpu, inputs.fp8) * 1e12
    compute = flops / (inputs.gpus * peak * inputs.mfu)
    return compute * (1 + (pp - 1) / _microbatches(inputs, dp))


def gradient_sync_seconds(inputs: PlanInputs, held: int, replica_ranks: int, dp: int) -> float:
    """The distributed optimizer's reduce-scatter (FP32) and all-gather (BF16) across DP."""
    if dp == 1:
        return 0.0
    bandwidth = (NVLINK_GBPS if replica_ranks * dp <= GPUS_PER_NODE else inputs.network_gbps) * 1e9
    return 6 * held * (dp - 1) / dp / bandwidth


def tensor_parallel_seconds(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int) -> float:
    """Sequence parallelism's activation collectives of one GPU's layers over the step."""
    if tp == 1:
        return 0.0
    rows = inputs.noise.rows_per_microbatch(inputs.micro_batch_size)
    per_layer = 8 * (inputs.seq_length // cp) * rows * inputs.model.hidden_size * 2 * (tp - 1) / tp
    return per_layer * (inputs.model.num_layers // pp) * _microbatches(inputs, dp) / (NVLINK_GBPS * 1e9)


def pipeline_seconds(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int) -> float:
    if pp == 1:
        return 0.0
    rows = inputs.noise.rows_per_microbatch(inputs.micro_batch_size)
    message = (inputs.seq_length // cp) * rows * inputs.model.hidden_size * 2 / tp
    bandwidth = (inputs.network_gbps if tp * cp >= GPUS_PER_NODE else NVLINK_GBPS) * 1e9
    return 4 * message * _microbatches(inputs, dp) / bandwidth


def ranked_plans(inputs: PlanInputs) -> List[LayoutPlan]:
    """Every valid layout; those that fit first, fastest first, then fewer model-parallel ranks."""
    if inputs.gpu not in GPU_MEMORY_GB:
        raise ValueError(f"unknown GPU {inputs.gpu!r}; known: {', '.join(GPU_MEMORY_GB)}")
    if inputs.spec not in ("te", "local"):
        raise ValueError(f"spec must be te or local, got {inputs.spec!r}")
    if inputs.pairing not in ("concat", "microbatch", "none"):
        raise ValueError(f"--pairing must be concat, microbatch or none, got {inputs.pairing!r}")
    plans = [plan(inputs, *layout) for layout in valid_layouts(inputs)]
    if not plans:
        raise ValueError(f"no TP/PP/CP/DP layout divides {inputs.gpus} GPUs, {inputs.model.num_layers} layers, "
                         f"{inputs.model.num_attention_heads} heads and global batch {inputs.global_batch_size}")
    fastest = min((p.step_seconds for p in plans if p.fits), default=0.0)
    return sorted(plans, key=lambda p: (not p.fits, p.step_seconds > 1.05 * fastest,
                                        0 if p.step_seconds > 1.05 * fastest else p.tp * p.pp * p.cp,
                                        0 if p.step_seconds > 1.05 * fastest else p.tp, p.step_seconds))
