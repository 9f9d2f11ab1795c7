"""The parallel layout a model is split into, and the one check that the model can be split so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from symnoise_megatron.model.config import ModelConfig


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout, named as Megatron-LM's flags name it.

    Attributes:
        tensor_model_parallel_size: ranks that split each layer's weights (TP).
        pipeline_model_parallel_size: stages the layers are split into (PP).
        virtual_pipeline_model_parallel_size: model chunks per stage (interleaved 1F1B).
        sequence_parallel: split norms/dropout activations along the sequence over TP.
        context_parallel_size: ranks that split each sequence (CP).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1

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


def validate_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Refuse a TP/PP layout the model cannot be split into, naming the numbers.

    Tensor parallelism splits the attention heads, the key/value groups and the FFN; the
    vocabulary needs no check, since megatron pads it to a multiple of the TP size. Pipeline
    parallelism gives each (virtual) stage an equal share of the layers.
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    if model.num_attention_heads % tp or model.query_groups % tp:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} must divide the {model.num_attention_heads} attention heads "
            f"and the {model.query_groups} key/value groups"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} must divide the FFN size {model.ffn_hidden_size}")
    if model.num_layers % (pp * vpp):
        raise ValueError(f"{model.num_layers} layers cannot be split into {pp} pipeline stages x {vpp} virtual stages")
