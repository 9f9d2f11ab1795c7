"""The parallel layout a model is split into, and the one check that the model can be split so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from symnoise_megatron.model.config import ModelConfig

FIRST_STAGE_FLAG = "--decoder-first-pipeline-num-layers"
LAST_STAGE_FLAG = "--decoder-last-pipeline-num-layers"
EMBEDDING_SPLIT_FLAG = "--account-for-embedding-in-pipeline-split"
LOSS_SPLIT_FLAG = "--account-for-loss-in-pipeline-split"


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout, named as Megatron-LM's flags name it.

    Attributes:
        tensor_model_parallel_size: ranks that split each layer's weights (TP).
        pipeline_model_parallel_size: stages the layers are split into (PP).
        virtual_pipeline_model_parallel_size: model chunks per stage (interleaved 1F1B).
        sequence_parallel: split norms/dropout activations along the sequence over TP.
        context_parallel_size: ranks that split each sequence (CP).
        num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage: an uneven split
            (Megatron-LM's --decoder-first/last-pipeline-num-layers): the first (last) stage holds
            this many transformer layers, the other stages share the rest equally.
        account_for_embedding_in_pipeline_split, account_for_loss_in_pipeline_split: split the
            layers as if the embedding (the output layer and loss) were one more layer, so the
            first (last) stage holds one transformer layer fewer.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size}"
            )
        return world_size // self.model_parallel_size

    @property
    def split_description(self) -> str:
        """The pipeline split's flags, or 'even'."""
        parts = [f"first stage {self.num_layers_in_first_pipeline_stage} layers"
                 if self.num_layers_in_first_pipeline_stage is not None else "",
                 f"last stage {self.num_layers_in_last_pipeline_stage} layers"
                 if self.num_layers_in_last_pipeline_stage is not None else "",
                 "embedding counted as a layer" if self.account_for_embedding_in_pipeline_split else "",
                 "loss counted as a layer" if self.account_for_loss_in_pipeline_split else ""]
        return ", ".join(part for part in parts if part) or "even"


def pipeline_layer_counts(num_layers: int, parallel: ParallelConfig) -> List[List[int]]:
    """Transformer layers each model chunk holds, ``[pipeline rank][virtual stage]``, as
    megatron-core 0.16 builds them (``transformer_block.get_num_layers_to_build``), or a
    ValueError naming the flags where megatron-core would refuse the split (its TransformerConfig
    and its block builder, and Megatron-LM's argument checks)."""
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    first, last = parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage
    embedding, loss = parallel.account_for_embedding_in_pipeline_split, parallel.account_for_loss_in_pipeline_split
    if first is not None or last is not None:
        if embedding or loss:
            raise ValueError(f"{FIRST_STAGE_FLAG}/{LAST_STAGE_FLAG} and {EMBEDDING_SPLIT_FLAG}/{LOSS_SPLIT_FLAG} "
                             "exclude each other (megatron-core refuses the combination): give the stages' layer "
                             "counts or count the embedding and loss as layers, not both")
        if pp < 2:
            raise ValueError(f"{FIRST_STAGE_FLAG}/{LAST_STAGE_FLAG} need --pipeline-model-parallel-size 2 or more")
        middle_layers, middle_stages = num_layers, pp
        for flag, count in ((FIRST_STAGE_FLAG, first), (LAST_STAGE_FLAG, last)):
            if count is None:
                continue
            if count < 1:
                raise ValueError(f"{flag} must be at least 1")
            if count % vpp:
                raise ValueError(f"{flag} {count} must be a multiple of the {vpp} virtual stages per pipeline rank")
            middle_layers, middle_stages = middle_layers - count, middle_stages - 1
        if (middle_layers != 0 if middle_stages == 0
                else middle_layers < middle_stages * vpp or middle_layers % (middle_stages * vpp)):
            raise ValueError(
                f"the model's {num_layers} layers less {FIRST_STAGE_FLAG}/{LAST_STAGE_FLAG} leave {middle_layers} for "
                f"{middle_stages} middle pipeline stage(s) of {vpp} virtual stage(s): they must split into equal, "
                "non-empty chunks")
        per_middle = middle_layers // middle_stages if middle_stages else 0
        per_rank = [first if rank == 0 and first is not None else last if rank == pp - 1 and last is not None
                    else per_middle for rank in range(pp)]
        return [[layers // vpp] * vpp for layers in per_rank]
    counted = num_layers + embedding + loss
    if counted % (pp * vpp):
        extra = " (with the embedding and loss counted as layers)" if embedding or loss else ""
        raise ValueError(f"{num_layers} layers{extra} cannot be split into {pp} pipeline stages x {vpp} virtual stages")
    counts = [[counted // (pp * vpp)] * vpp for _ in range(pp)]
    counts[0][0] -= embedding
    counts[-1][-1] -= loss
    if min(min(chunk) for chunk in counts) < 1:
        raise ValueError(f"{EMBEDDING_SPLIT_FLAG}/{LOSS_SPLIT_FLAG}: {num_layers} layers over {pp} x {vpp} stages "
                         "leave a model chunk without a transformer layer; use fewer stages")
    return counts


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> List[List[int]]:
    """Refuse a TP/PP layout the model cannot be split into, naming the numbers; the layers of
    each model chunk (:func:`pipeline_layer_counts`) otherwise.

    Tensor parallelism splits the attention heads, the key/value groups and the FFN; the
    vocabulary needs no check, since megatron pads it to a multiple of the TP size. Pipeline
    parallelism gives each (virtual) stage an equal share of the layers, unless the split is
    uneven (first/last stage layer counts, or the embedding and loss counted as layers).
    """
    tp = parallel.tensor_model_parallel_size
    if model.num_attention_heads % tp or model.query_groups % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide the {model.num_attention_heads} attention heads "
            f"and the {model.query_groups} key/value groups"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide the FFN size {model.ffn_hidden_size}")
    return pipeline_layer_counts(model.num_layers, parallel)
