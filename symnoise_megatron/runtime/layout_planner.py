"""Which layout for a fine-tune: TP/PP/CP/DP, virtual pipeline stages, the pipeline split, the
activation recomputation and the data-parallel overlap, by estimated memory and step time.

Every pipeline rank is estimated on its own (its layers as megatron-core splits them,
``model.parallelism.pipeline_layer_counts``), and the plan is that of the busiest one.

Memory of a pipeline rank:
- weights: 2 bytes per parameter held (BF16; FP8 adds a 1-byte copy of the GEMM weights);
- gradients: 4 bytes (megatron-core DDP's FP32 buffer), 2 without FP32 accumulation;
- optimizer: 12 bytes (FP32 master copy, Adam's two moments), divided by DP x CP with the
  distributed optimizer;
- activations of one layer and micro-batch, split over TP x CP (sequence parallelism):
  ``s * b * h * (12 + 4 g / a + c f / h) / (TP * CP)`` bytes, counted from what the layer keeps
  for its backward with flash attention and no dropout (``_activation_bytes_per_element``; g / a
  key/value groups per head, c = 6 for a gated MLP, 4 for GELU; Transformer Engine's FP8 keeps
  the GEMM inputs in one byte: ``11 + 4 g / a + (c - 1) f / h``). Megatron-LM's own count,
  ``18 + 4 f / h``, includes dropout masks and a GELU MLP. Recomputation keeps less: ``mlp``
  (selective) drops the MLP's inside; ``full`` keeps a layer's 2-byte input for the layers it
  recomputes (all of them, or the first N of each model chunk with the block method), plus one
  layer's activations while it is recomputed; ``selective`` (core_attn) keeps as much as none
  under flash attention;
- in flight: under 1F1B pipeline rank r holds ``min(M, PP - r)`` micro-batches' activations;
  interleaved, ``2 (PP - r - 1) + (V - 1) PP + 1`` model-chunk forwards (megatron-core's warm-up,
  whose rank-0 count is Megatron-LM's memory penalty ``PP (1 + (PP - 1) / (PP V))``). ``concat``
  pairing doubles every micro-batch's rows; ``microbatch`` pairing doubles M;
- logits: FP32 ``s * b * V / TP`` twice (logits and their gradient) on the last rank, every
  position counted (an upper bound: without sequence parallelism the model computes logits at
  loss tokens only, whose share the planner does not know);
- inputs: the micro-batches of the forwards in flight and the one being moved (each moves just
  before its first forward: token ids, labels, loss mask, positions, sample uids, lengths, loss
  positions: at most ``INPUT_BYTES_PER_TOKEN`` a token); on megatron-core's local spec also the dense boolean
  attention mask each in-flight micro-batch keeps for its backward (``b * s * s`` bytes, packed
  rows; padded rows share one ``s * s``). Transformer Engine's attention reads no mask, and the
  training loop builds none for it;
- a fixed 5 GB for the CUDA context, NCCL buffers and allocator fragmentation.

Step time, from the FLOPs each pipeline rank runs per micro-batch (6 x its layers' parameters
+ attention scores per token, the output layer's 6 h V on the last rank; recomputation adds
the forward of what it recomputes) at peak x the stated MFU (an input, standing for kernel
efficiency, not a prediction), plus sequence parallelism's collectives (8 per layer and
micro-batch of ``s * b * h`` BF16 values x (TP - 1) / TP over NVLink; 4 more per recomputed
layer), which nothing overlaps. The pipeline runs ``M + (PP - 1) / V`` micro-batch times of its
slowest rank (the 1F1B bubble, divided by V when interleaved); an uneven split balances the
ranks (the first rank also holds the embedding and PP micro-batches in flight, the last the
output layer and its logits). Communication, not overlapped unless said:
- data-parallel: the gradients' reduce-scatter (FP32 or BF16) and the parameters' all-gather
  (BF16) with the distributed optimizer, an all-reduce without it; over NVLink when a DP group
  (TP x CP x DP consecutive GPUs) stays in a node, the per-GPU network bandwidth otherwise.
  ``--overlap-grad-reduce`` hides the reduction behind the backward of the step's last
  micro-batch and ``--overlap-param-gather`` the gather behind the first forward, down to one
  bucket's share (megatron-core's default bucket of max(40M, 1M x DP) parameters);
- pipeline: four messages (activations and gradients sent and received) of ``s * b * h / TP``
  BF16 values per micro-batch and model chunk, over the network once the job spans nodes.
Context parallelism, when the loop supports it, is offered only where each rank keeps at least
2,048 tokens of the sequence (below that its ring exchange dominates).

Candidates: every TP (1, 2, 4, 8) x PP (up to 32) x CP x DP that divides the GPUs, the model
(with one of the splits below) and the global batch; for each, interleaving with V = 2..8
virtual stages where megatron-core can run it (PP above 2 and a step's micro-batches a multiple
of PP); the splits megatron-core can build (even; the embedding and/or loss counted as a layer;
the first and last stages one or two layers (x V) off an even share, the middle stages sharing
the rest); and for each of those the fastest recomputation that fits (``auto``: none, else the
MLP's or full recomputation of the fewest layers per model chunk, whichever is faster). With
DP above 1 the overlap flags are on (they only hide time in this model).

Layouts are ranked: those that fit first; among them, those within 5% of the fastest estimate
(the estimate cannot tell such layouts apart) by fewer model-parallel ranks, then by smaller
TP, then by time; then the rest by time. Megatron-Bridge's published SFT layouts are planned
beside the candidates (:func:`reference_plans`) and :func:`compare_with_reference` says where and
why the pick differs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

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
LAYER_INPUT_BYTES = 2  # what full recomputation keeps of a layer: its BF16 input
SPLIT_SHIFTS = (-2, -1, 1, 2)  # uneven splits tried: the end stages' layers (x V) off an even share
MAX_VIRTUAL_STAGES = 8
RECOMPUTE_CHOICES = ("auto", "none", "selective", "mlp", "full")
WITHIN = 1.05  # estimates closer than this are not told apart


@dataclass(frozen=True)
class PlanInputs:
    """Attributes:
        model: the architecture (a preset or a converted checkpoint's).
        seq_length, global_batch_size, micro_batch_size: as the fine-tune's flags.
        gpus: total GPUs; gpu: H100, H200 or A100.
        fp8: FP8 GEMMs (Transformer Engine) instead of BF16.
        recompute: ``auto`` (weigh none, mlp and full recomputation of the fewest layers that
            fit) or one of ``none``, ``selective`` (core_attn), ``mlp``, ``full`` (every layer).
        pairing: ``concat`` or ``microbatch`` for symmetric noise, ``none`` for a single copy.
        mfu: model-FLOPs utilisation assumed for the step-time estimate.
        distributed_optimizer: shard optimizer state over data (and context) parallel ranks.
        spec: ``te`` (Transformer Engine: fused attention, no mask) or ``local`` (megatron-core's
            local spec: a dense attention mask per micro-batch in flight).
        virtual_stages: weigh interleaved pipeline stages.
        uneven_splits: weigh uneven pipeline splits.
        overlap: with DP > 1, overlap the gradient reduction and (distributed optimizer) the
            parameter all-gather with the backward and forward.
        grad_reduce_in_fp32: FP32 gradient buffers and reductions (the fine-tune's default).
    """

    model: ModelConfig
    seq_length: int = 4096
    global_batch_size: int = 128
    micro_batch_size: int = 1
    gpus: int = 64
    gpu: str = "H100"
    fp8: bool = False
    recompute: str = "auto"
    pairing: str = "concat"
    mfu: float = 0.40
    network_gbps: float = 50.0  # per-GPU bandwidth across nodes (8 x 400 Gb/s NICs per 8 GPUs), GB/s
    distributed_optimizer: bool = True
    make_vocab_size_divisible_by: int = 128
    spec: str = "te"
    virtual_stages: bool = True
    uneven_splits: bool = True
    overlap: bool = True
    grad_reduce_in_fp32: bool = True

    @property
    def noise(self) -> NoiseConfig:
        """The noise whose pairing the plan counts rows and micro-batches for."""
        if self.pairing == "none":
            return NoiseConfig("none")
        return NoiseConfig("symmetric", pairing=self.pairing)


@dataclass(frozen=True)
class Recompute:
    """One activation-recomputation setting, as the fine-tune's flags give it.

    ``granularity`` None (no recomputation), ``selective`` (``modules``) or ``full`` (``num_layers``
    per model chunk with the block method; None: uniform, every layer)."""

    granularity: Optional[str] = None
    modules: Tuple[str, ...] = ()
    num_layers: Optional[int] = None

    @property
    def name(self) -> str:
        if self.granularity is None:
            return "none"
        if self.granularity == "selective":
            return "selective" if self.modules in ((), ("core_attn",)) else "+".join(self.modules)
        return "full" if self.num_layers is None else f"full block {self.num_layers}"

    def flags(self) -> dict:
        """The run-config keys of this setting (the fine-tune's flag names)."""
        if self.granularity is None:
            return {}
        if self.granularity == "selective":
            return {"recompute_granularity": "selective", **({"recompute_modules": list(self.modules)} if self.modules else {})}
        if self.num_layers is None:
            return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        return {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": self.num_layers}


NO_RECOMPUTE, SELECTIVE, MLP_RECOMPUTE, FULL_RECOMPUTE = (
    Recompute(), Recompute("selective"), Recompute("selective", ("mlp",)), Recompute("full"))


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
    parallel: ParallelConfig = ParallelConfig()
    recompute: Recompute = NO_RECOMPUTE
    overlap: bool = False
    busiest_rank: int = 0  # the pipeline rank whose memory the columns show
    time: Dict[str, float] = field(default_factory=dict)  # the step's parts, seconds; they sum to step_seconds

    @property
    def vpp(self) -> Optional[int]:
        return self.parallel.virtual_pipeline_model_parallel_size
    inputs_gb: float = 0.0  # in total_gb; the micro-batches and (local spec) attention masks

    @property
    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp}{f' VP{self.vpp}' if self.vpp else ''} CP{self.cp} DP{self.dp}"

    @property
    def split(self) -> str:
        return self.parallel.split_description

    def run_config(self) -> dict:
        """The fine-tune's settings for this plan, by flag name (what a layout file holds)."""
        parallel = self.parallel
        config = {"tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp}
        if self.cp > 1:
            config["context_parallel_size"] = self.cp
        if self.tp > 1:
            config["sequence_parallel"] = True
        if self.vpp:
            config["num_virtual_stages_per_pipeline_rank"] = self.vpp
        for key, value in (("decoder_first_pipeline_num_layers", parallel.num_layers_in_first_pipeline_stage),
                           ("decoder_last_pipeline_num_layers", parallel.num_layers_in_last_pipeline_stage)):
            if value is not None:
                config[key] = value
        for key in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
            if getattr(parallel, key):
                config[key] = True
        config.update(self.recompute.flags())
        if self.overlap:
            config["overlap_grad_reduce"] = True
            config["overlap_param_gather"] = True
        return config


@functools.lru_cache(maxsize=None)
def layer_parameters(model: ModelConfig) -> int:
    """Parameters of one transformer layer: attention, MLP and two norms."""
    return (model.num_parameters() - embedding_parameters(model, model.vocab_size)
            - model.norm_parameters - model.position_embedding_parameters) // model.num_layers


def mlp_parameters(model: ModelConfig) -> int:
    fc1_rows = (2 if model.traits.gated_linear_unit else 1) * model.ffn_hidden_size
    return (fc1_rows + model.ffn_hidden_size) * model.hidden_size


def embedding_parameters(model: ModelConfig, vocab: int) -> int:
    return vocab * model.hidden_size * (1 if model.tie_word_embeddings else 2)


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int, vocab_divisible_by: int = 128,
                     layers: Optional[int] = None) -> int:
    """Parameters one tensor-parallel rank of pipeline ``stage`` holds, as megatron-core builds it
    (vocabulary padded; norms replicated over TP; a tied output layer kept on the last stage too).
    ``layers``: the stage's transformer layers (default: an even split)."""
    vocab = padded_vocab_size(model.vocab_size, vocab_divisible_by, tp)
    h = model.hidden_size
    layers = model.num_layers // pp if layers is None else layers
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


# Candidates ---------------------------------------------------------------------------------
def _layer_counts(model: ModelConfig, parallel: ParallelConfig) -> Optional[List[List[int]]]:
    try:
        return validate_layout(model, parallel)
    except ValueError:
        return None


def _splits(model: ModelConfig, tp: int, pp: int, vpp: Optional[int], uneven: bool) -> Iterator[ParallelConfig]:
    """The pipeline splits megatron-core can build for this geometry: even, and (``uneven``) the
    embedding and/or loss counted as a layer, or the first and last stages given up to two
    layers (x V) fewer or more than an even share, the middle stages sharing the rest equally."""
    base = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp, sequence_parallel=tp > 1)
    candidates = [base]
    if uneven and pp > 1:
        candidates += [replace(base, account_for_embedding_in_pipeline_split=embedding,
                               account_for_loss_in_pipeline_split=loss)
                       for embedding, loss in ((True, False), (False, True), (True, True))]
        step = vpp or 1
        share = model.num_layers // pp // step * step
        counts = [None] + [share + shift * step for shift in SPLIT_SHIFTS if share + shift * step >= step]
        candidates += [replace(base, num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
                       for first in counts for last in counts if first is not None or last is not None]
    for parallel in candidates:
        if _layer_counts(model, parallel) is not None:
            yield parallel


def _interleaving_works(inputs: PlanInputs, pp: int, dp: int) -> bool:
    """megatron-core's interleaved schedule runs the micro-batches in groups of PP (a step's count
    must be a multiple of it); PP 2 is refused on GPUs, whose batched p2p would pair a rank's two
    messages to its one peer wrongly (as Megatron-LM refuses it)."""
    return pp > 2 and _microbatches(inputs, dp) % pp == 0


def valid_layouts(inputs: PlanInputs):
    """(tp, pp, cp, dp) that divide the GPUs, the global batch and (with a split the planner may
    use) the model."""
    model = inputs.model
    for tp in (t for t in (1, 2, 4, 8) if t <= GPUS_PER_NODE):
        for pp in range(1, min(model.num_layers, 32) + 1):
            if next(_splits(model, tp, pp, None, inputs.uneven_splits), None) is None:
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


def input_bytes(inputs: PlanInputs, forwards_in_flight: int, dp: int) -> float:
    """The micro-batches on one rank's device, and the local spec's masks of the model-chunk
    forwards in flight. Each micro-batch moves to the device just before its first forward and
    stays while a forward in flight needs it (its token ids for the embedding's backward, its mask):
    those in flight and the one moving, at most the step's (the symmetric pair shares one copy)."""
    resident = min(_microbatches(inputs, dp), forwards_in_flight + 1)
    tokens = resident * _rows(inputs) * inputs.seq_length
    masks = 0.0
    if inputs.spec == "local":
        masks = forwards_in_flight * _rows(inputs) * inputs.seq_length ** 2
    return tokens * INPUT_BYTES_PER_TOKEN + masks


def _virtual_stage_counts(inputs: PlanInputs, pp: int, dp: int) -> List[Optional[int]]:
    counts: List[Optional[int]] = [None]
    if inputs.virtual_stages and _interleaving_works(inputs, pp, dp):
        counts += list(range(2, MAX_VIRTUAL_STAGES + 1))
    return counts


def _recompute_options(inputs: PlanInputs, chunk_layers: int) -> List[Recompute]:
    """Cheapest first; ``auto`` weighs no recomputation, the MLP's, and full recomputation of
    1..all layers of each model chunk (the block method: the fewest that fit win)."""
    fixed = {"none": NO_RECOMPUTE, "selective": SELECTIVE, "mlp": MLP_RECOMPUTE, "full": FULL_RECOMPUTE}
    if inputs.recompute != "auto":
        return [fixed[inputs.recompute]]
    return [NO_RECOMPUTE, MLP_RECOMPUTE] + [Recompute("full", num_layers=n) for n in range(1, chunk_layers + 1)]


# The model of one plan ------------------------------------------------------------------------
def _microbatches(inputs: PlanInputs, dp: int) -> int:
    per_replica = inputs.global_batch_size // (inputs.micro_batch_size * dp)
    return inputs.noise.microbatches_per_step(per_replica)


def _rows(inputs: PlanInputs) -> int:
    return inputs.noise.rows_per_microbatch(inputs.micro_batch_size)


def layer_activation_bytes(inputs: PlanInputs, tp: int, cp: int) -> Tuple[float, float, float]:
    """One layer's stored activations for one micro-batch on one GPU: (all of them, without the
    MLP's inside, its input only)."""
    model = inputs.model
    tokens_hidden = inputs.seq_length * _rows(inputs) * model.hidden_size / (tp * cp)
    outside_mlp, inside_mlp = _activation_bytes_per_element(model, inputs.fp8)
    return (tokens_hidden * (outside_mlp + inside_mlp), tokens_hidden * outside_mlp,
            tokens_hidden * LAYER_INPUT_BYTES)


def _activation_bytes_per_element(model: ModelConfig, fp8: bool) -> Tuple[float, float]:
    """Bytes a layer stores for its backward per token and hidden unit, outside and inside its MLP
    (no dropout, flash attention: no scores).

    Attention: the residual (2) and the norm's output (2, the QKV GEMM's input), q (2), k and v
    (4 x key/value groups / heads), the attention output (2, also the projection's input). MLP:
    the residual (2) and the norm's output (2, FC1's input); inside, FC1's output (2 f/h, twice
    for a gated MLP's gate and up projections) and FC2's input (2 f/h). Under FP8, Transformer
    Engine keeps the GEMM inputs as 1-byte copies: the two norm outputs and FC2's input shrink
    by half, the projection's input gains a copy beside the attention's BF16 output."""
    ratio = model.ffn_hidden_size / model.hidden_size
    outside = 12 + 4 * model.query_groups / model.num_attention_heads
    inside = (6 if model.traits.gated_linear_unit else 4) * ratio
    if fp8:
        outside, inside = outside - 1, inside - ratio
    return outside, inside


def _chunk_activation_bytes(inputs: PlanInputs, tp: int, cp: int, layers: int, recompute: Recompute) -> float:
    """A model chunk's stored activations for one micro-batch in flight."""
    full, without_mlp, kept = layer_activation_bytes(inputs, tp, cp)
    if recompute.granularity == "full":
        recomputed = _recomputed_layers(layers, recompute)
        return recomputed * kept + (layers - recomputed) * full
    if recompute == MLP_RECOMPUTE:
        return layers * without_mlp
    return layers * full


def _chunk_forwards_in_flight(pp: int, vpp: Optional[int], rank: int, microbatches: int) -> int:
    """Model-chunk forwards whose activations pipeline rank ``rank`` holds at its peak."""
    if not vpp:
        return min(microbatches, pp - rank)
    return min(microbatches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)


def _recompute_flops_per_token(inputs: PlanInputs, layers: int, recompute: Recompute) -> float:
    """The forward FLOPs recomputation adds for a model chunk of ``layers`` layers, per token."""
    model = inputs.model
    attention_forward = 4 * model.hidden_size * inputs.seq_length
    if recompute.granularity == "full":
        return _recomputed_layers(layers, recompute) * (2 * layer_parameters(model) + attention_forward)
    if recompute == MLP_RECOMPUTE:
        return layers * 2 * mlp_parameters(model)
    if recompute == SELECTIVE:
        return layers * attention_forward
    return 0.0


def _recomputed_layers(layers: int, recompute: Recompute) -> int:
    if recompute.granularity != "full":
        return 0
    return layers if recompute.num_layers is None else min(recompute.num_layers, layers)


def plan(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int, *, parallel: Optional[ParallelConfig] = None,
         recompute: Optional[Recompute] = None, overlap: Optional[bool] = None) -> LayoutPlan:
    """The estimate for one layout. ``parallel``: its virtual stages and split (default even, no
    interleaving); ``recompute``: default the inputs' (``auto``: none); ``overlap``: default the
    inputs' wherever DP > 1."""
    model = inputs.model
    gb = 2 ** 30
    parallel = parallel or ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          sequence_parallel=tp > 1)
    recompute = recompute or _recompute_options(inputs, 1)[0]
    overlap = (inputs.overlap if overlap is None else overlap) and dp > 1
    counts = validate_layout(model, parallel)
    vpp = parallel.virtual_pipeline_model_parallel_size
    microbatches = _microbatches(inputs, dp)
    rows = _rows(inputs)
    vocab = padded_vocab_size(model.vocab_size, inputs.make_vocab_size_divisible_by, tp)
    tokens = inputs.seq_length * rows  # of one micro-batch
    rate = peak_tflops(inputs.gpu, inputs.fp8) * 1e12 * inputs.mfu * tp * cp  # one pipeline rank's FLOP/s
    layer_flops = 6 * layer_parameters(model) + 12 * model.hidden_size * inputs.seq_length
    tp_bytes_per_layer = 8 * (inputs.seq_length // cp) * rows * model.hidden_size * 2 * (tp - 1) / tp

    ranks = []
    for rank, chunks in enumerate(counts):
        layers = sum(chunks)
        held = stage_parameters(model, tp, pp, rank, inputs.make_vocab_size_divisible_by, layers=layers)
        weights = held * (3 if inputs.fp8 else 2)
        gradients = held * (4 if inputs.grad_reduce_in_fp32 else 2)
        optimizer = held * 12 / ((dp * cp) if inputs.distributed_optimizer else 1)
        in_flight = _chunk_forwards_in_flight(pp, vpp, rank, microbatches)
        per_chunk = [_chunk_activation_bytes(inputs, tp, cp, n, recompute) for n in chunks]
        activations = sum(per_chunk) / len(chunks) * in_flight
        if recompute.granularity == "full":  # one layer's activations while it is recomputed
            activations += layer_activation_bytes(inputs, tp, cp)[0]
        if rank == pp - 1:
            activations += 2 * 4 * inputs.seq_length / cp * rows * vocab / tp
        held_inputs = input_bytes(inputs, in_flight, dp)
        total = (weights + gradients + optimizer + activations + held_inputs) / gb + FIXED_OVERHEAD_GB
        flops = layers * layer_flops * tokens + (6 * model.hidden_size * vocab * tokens if rank == pp - 1 else 0)
        extra = sum(_recompute_flops_per_token(inputs, n, recompute) for n in chunks) * tokens
        tp_seconds = (layers + 0.5 * sum(_recomputed_layers(n, recompute) for n in chunks)) * tp_bytes_per_layer / (
            NVLINK_GBPS * 1e9) if tp > 1 else 0.0
        ranks.append(dict(held=held, weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activations, inputs=held_inputs, total=total, compute=flops / rate, recompute=extra / rate,
                          tp=tp_seconds))

    busiest = max(range(pp), key=lambda r: ranks[r]["total"])
    per_microbatch = [r["compute"] + r["recompute"] + r["tp"] for r in ranks]
    slowest = max(range(pp), key=lambda r: per_microbatch[r])
    mean_compute = sum(r["compute"] for r in ranks) / pp
    time = {
        "compute": mean_compute * microbatches,
        "imbalance": (ranks[slowest]["compute"] - mean_compute) * microbatches,
        "recompute": ranks[slowest]["recompute"] * microbatches,
        "tensor parallel": ranks[slowest]["tp"] * microbatches,
        "bubble": per_microbatch[slowest] * (pp - 1) / (vpp or 1),
        "data parallel": max(data_parallel_seconds(inputs, r["held"], tp, cp, dp, overlap, per_microbatch[i])
                             for i, r in enumerate(ranks)),
        "pipeline": pipeline_seconds(inputs, tp, pp, cp, dp, vpp),
    }
    top = ranks[busiest]
    return LayoutPlan(
        tp=tp, pp=pp, cp=cp, dp=dp, parameters_per_gpu=top["held"], weights_gb=top["weights"] / gb,
        gradients_gb=top["gradients"] / gb, optimizer_gb=top["optimizer"] / gb, activations_gb=top["activations"] / gb,
        total_gb=top["total"], inputs_gb=top["inputs"] / gb, step_seconds=sum(time.values()),
        fits=top["total"] <= USABLE_FRACTION * GPU_MEMORY_GB[inputs.gpu], parallel=parallel, recompute=recompute,
        overlap=overlap, busiest_rank=busiest, time=time,
    )


def data_parallel_seconds(inputs: PlanInputs, held: int, tp: int, cp: int, dp: int, overlap: bool,
                          microbatch_seconds: float) -> float:
    """The exposed time of one pipeline rank's gradient reduction and parameter all-gather over DP."""
    if dp == 1:
        return 0.0
    bandwidth = (NVLINK_GBPS if tp * cp * dp <= GPUS_PER_NODE else inputs.network_gbps) * 1e9
    share = held * (dp - 1) / dp / bandwidth
    grad_bytes = 4 if inputs.grad_reduce_in_fp32 else 2
    if inputs.distributed_optimizer:
        reduce, gather = grad_bytes * share, 2 * share
    else:
        reduce, gather = 2 * grad_bytes * share, 0.0
    if not overlap:
        return reduce + gather
    buckets = max(1, math.ceil(held / max(40_000_000, 1_000_000 * dp)))
    return (max(reduce / buckets, reduce - 2 / 3 * microbatch_seconds)
            + max(gather / buckets, gather - 1 / 3 * microbatch_seconds))


def pipeline_seconds(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int, vpp: Optional[int] = None) -> float:
    if pp == 1:
        return 0.0
    message = (inputs.seq_length // cp) * _rows(inputs) * inputs.model.hidden_size * 2 / tp
    bandwidth = (inputs.network_gbps if inputs.gpus > GPUS_PER_NODE else NVLINK_GBPS) * 1e9
    return 4 * message * _microbatches(inputs, dp) * (vpp or 1) / bandwidth


# Choosing -----------------------------------------------------------------------------------
def best_plan(inputs: PlanInputs, tp: int, pp: int, cp: int, dp: int, parallel: ParallelConfig) -> LayoutPlan:
    """The fastest recomputation setting that fits this geometry (the most frugal one when none does).
    Recomputing more layers only costs time, so the block method's search stops at the first fit."""
    chunk_layers = max(max(chunks) for chunks in validate_layout(inputs.model, parallel))
    options = _recompute_options(inputs, chunk_layers)
    first = plan(inputs, tp, pp, cp, dp, parallel=parallel, recompute=options[0])
    if first.fits or len(options) == 1:
        return first
    fitting, frugal = [], first
    for choice in options[1:]:
        candidate = plan(inputs, tp, pp, cp, dp, parallel=parallel, recompute=choice)
        frugal = min(frugal, candidate, key=lambda p: p.total_gb)
        if candidate.fits:
            fitting.append(candidate)
            if choice.granularity == "full":
                break
    return min(fitting, key=lambda p: p.step_seconds) if fitting else frugal


def candidate_plans(inputs: PlanInputs) -> List[LayoutPlan]:
    """One plan for every geometry (TP, PP, CP, DP, virtual stages, split): its best recomputation."""
    return [best_plan(inputs, tp, pp, cp, dp, parallel)
            for tp, pp, cp, dp in valid_layouts(inputs)
            for vpp in _virtual_stage_counts(inputs, pp, dp)
            for parallel in _splits(inputs.model, tp, pp, vpp, inputs.uneven_splits)]


def _rank_key(fastest: float):
    def key(p: LayoutPlan):
        slow = p.step_seconds > WITHIN * fastest
        return (not p.fits, slow, 0 if slow else p.tp * p.pp * p.cp, 0 if slow else p.tp, p.step_seconds)
    return key


def check_inputs(inputs: PlanInputs) -> None:
    if inputs.gpu not in GPU_MEMORY_GB:
        raise ValueError(f"unknown GPU {inputs.gpu!r}; known: {', '.join(GPU_MEMORY_GB)}")
    if inputs.spec not in ("te", "local"):
        raise ValueError(f"spec must be te or local, got {inputs.spec!r}")
    if inputs.pairing not in ("concat", "microbatch", "none"):
        raise ValueError(f"--pairing must be concat, microbatch or none, got {inputs.pairing!r}")
    if inputs.recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, got {inputs.recompute!r}")


def ranked_plans(inputs: PlanInputs) -> List[LayoutPlan]:
    """Every candidate; those that fit first, fastest first, then fewer model-parallel ranks."""
    check_inputs(inputs)
    plans = candidate_plans(inputs)
    if not plans:
        raise ValueError(f"no TP/PP/CP/DP layout divides {inputs.gpus} GPUs, {inputs.model.num_layers} layers, "
                         f"{inputs.model.num_attention_heads} heads and global batch {inputs.global_batch_size}")
    fastest = min((p.step_seconds for p in plans if p.fits), default=0.0)
    return sorted(plans, key=_rank_key(fastest))


# Published layouts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceLayout:
    """A layout published for a model of this shape (``num_layers``, ``hidden_size``), planned under
    the planner's inputs with its own recomputation and gradient-reduction settings."""

    name: str
    num_layers: int
    hidden_size: int
    tp: int
    pp: int
    vpp: Optional[int]
    recompute: Recompute
    grad_reduce_in_fp32: bool
    published_for: str


# Megatron-Bridge's H100 SFT speed recipes (src/megatron/bridge/perf_recipes/llama/h100/llama3.py):
# LLaMA-3-70B at TP 4 x PP 4 x VP 5 with sequence parallelism on 32 GPUs (DP 2), LLaMA-3-8B at
# TP 1 x PP 1 on 8 (DP 8); both at seq 4096 (packed rows), global batch 32, micro-batch 1, no
# recomputation, the distributed optimizer with overlapped gradient reduction and parameter
# gather, BF16 gradient reduction (grad_reduce_in_fp32 off), FP8 current scaling or BF16.
MEGATRON_BRIDGE_SFT = (
    ReferenceLayout("Megatron-Bridge's LLaMA-3-70B SFT layout", 80, 8192, 4, 4, 5, NO_RECOMPUTE, False,
                    "published for 32 H100, seq 4096, global batch 32, no noise, BF16 gradient reduction"),
    ReferenceLayout("Megatron-Bridge's LLaMA-3-8B SFT layout", 32, 4096, 1, 1, None, NO_RECOMPUTE, False,
                    "published for 8 H100, seq 4096, global batch 32, no noise, BF16 gradient reduction"),
)


def reference_plans(inputs: PlanInputs, references=MEGATRON_BRIDGE_SFT
                    ) -> List[Tuple[ReferenceLayout, LayoutPlan, Optional[LayoutPlan]]]:
    """Each published layout for a model of this shape that these inputs can run (its TP/PP/VP
    divide the model, GPUs and batch): planned with the inputs' settings and its own
    recomputation, and (when they differ) with its own gradient-reduction setting too."""
    out = []
    model = inputs.model
    for reference in references:
        if (model.num_layers, model.hidden_size) != (reference.num_layers, reference.hidden_size):
            continue
        for tp, pp, cp, dp in valid_layouts(inputs):
            if (tp, pp) != (reference.tp, reference.pp) or (reference.vpp and (
                    model.num_layers % (pp * reference.vpp) or not _interleaving_works(inputs, pp, dp))):
                continue
            parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      virtual_pipeline_model_parallel_size=reference.vpp, sequence_parallel=tp > 1)
            planned = plan(inputs, tp, pp, cp, dp, parallel=parallel, recompute=reference.recompute)
            published = None
            if reference.grad_reduce_in_fp32 != inputs.grad_reduce_in_fp32:
                published = plan(replace(inputs, grad_reduce_in_fp32=reference.grad_reduce_in_fp32), tp, pp, cp, dp,
                                 parallel=parallel, recompute=reference.recompute)
            out.append((reference, planned, published))
    return out


def compare_with_reference(pick: LayoutPlan, reference: ReferenceLayout, planned: LayoutPlan,
                           published: Optional[LayoutPlan], usable_gb: float) -> str:
    """Where the published layout stands against the pick under the same settings, why the pick
    differs, and what the layout's own published settings change."""
    head = f"{reference.name} ({reference.published_for}): {planned.name}, {planned.recompute.name} recomputation"
    if (planned.name, planned.split, planned.recompute) == (pick.name, pick.split, pick.recompute):
        line = f"{head}: the planner's pick too"
    elif not planned.fits:
        line = (f"{head}: does not fit by this estimate: {planned.total_gb:.1f} GB on pipeline rank "
                f"{planned.busiest_rank} (activations {planned.activations_gb:.1f} GB) against {usable_gb:.1f} GB usable")
    else:
        differences = sorted(((planned.time.get(part, 0.0) - pick.time.get(part, 0.0), part)
                              for part in set(planned.time) | set(pick.time)), reverse=True)
        more = [f"{part} +{delta:.2f} s" for delta, part in differences if delta > 0.005][:3]
        less = [f"{part} {delta:.2f} s" for delta, part in differences if delta < -0.005][-3:]
        if planned.step_seconds > WITHIN * pick.step_seconds:
            reason = "slower by this estimate"
        elif (pick.tp * pick.pp * pick.cp, pick.tp) < (planned.tp * planned.pp * planned.cp, planned.tp):
            reason = "within the estimate's 5%, where the planner prefers fewer model-parallel ranks, then smaller TP"
        else:
            reason = "within the estimate's 5% and slower"
        parts = "; ".join(part for part in ("more " + ", ".join(more) if more else "",
                                            "less " + ", ".join(less) if less else "") if part)
        line = (f"{head}: {planned.step_seconds:.2f} s and {planned.total_gb:.1f} GB against the pick's "
                f"{pick.step_seconds:.2f} s and {pick.total_gb:.1f} GB ({planned.step_seconds / pick.step_seconds - 1:+.0%}), "
                f"{reason}" + (f" ({parts})" if parts else ""))
    if published is not None:
        reduction = "FP32" if reference.grad_reduce_in_fp32 else "BF16"
        line += (f". With its published {reduction} gradient reduction: {published.step_seconds:.2f} s, "
                 f"{published.total_gb:.1f} GB, {'fits' if published.fits else 'does not fit'} "
                 f"(plan with {'--grad-reduce-in-bf16' if not reference.grad_reduce_in_fp32 else 'FP32 gradients'} "
                 "to rank every layout so)")
    return line
