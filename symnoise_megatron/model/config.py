"""Model shapes: LLaMA-1/2/3 and OPT presets, and the tiny model of the demo and tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional



@dataclass(frozen=True)
class ArchitectureTraits:
    """What an architecture implies. The builder, the conversion and the planner read these
    (``ModelConfig.traits``), never the architecture's name.

    Attributes:
        normalization: megatron-core's name of the norm (``RMSNorm``, ``LayerNorm``).
        gated_linear_unit: a gated MLP (SwiGLU: gate and up projections) instead of one FC1.
        activation: the MLP's activation function, as Hugging Face names it.
        linear_biases: whether the attention and MLP linear layers carry biases.
        position_embedding_type: megatron-core's name (``rope``, ``learned_absolute``).
        unused_position_rows: rows at the start of Hugging Face's learned position table that no
            position uses (OPT's offset of 2); megatron's table has no room for them.
    """

    normalization: str
    gated_linear_unit: bool
    activation: str
    linear_biases: bool
    position_embedding_type: str
    unused_position_rows: int


ARCHITECTURE_TRAITS = {
    "llama": ArchitectureTraits("RMSNorm", gated_linear_unit=True, activation="silu", linear_biases=False,
                                position_embedding_type="rope", unused_position_rows=0),
    "opt": ArchitectureTraits("LayerNorm", gated_linear_unit=False, activation="relu", linear_biases=True,
                              position_embedding_type="learned_absolute", unused_position_rows=2),
}
ARCHITECTURES = tuple(ARCHITECTURE_TRAITS)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only model, as Hugging Face's config.json states it.

    Attributes:
        architecture: ``llama`` (RMSNorm, SwiGLU, rope, no biases) or ``opt`` (LayerNorm,
            ReLU, learned absolute positions, biases).
        num_layers, hidden_size, num_attention_heads, ffn_hidden_size: the usual shape.
        num_query_groups: key/value heads (GQA); ``None`` means one per attention head.
        vocab_size: the tokenizer's vocabulary, before padding for tensor parallelism.
        max_position_embeddings: longest sequence (OPT's learned position table size).
        rotary_base: rope theta (LLaMA-1/2 10000, LLaMA-3 500000).
        rope_scaling: LLaMA-3.1 style scaling (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``) or ``None``.
        norm_epsilon: epsilon of RMSNorm / LayerNorm.
        tie_word_embeddings: output layer shares the embedding (OPT, small LLaMAs).
        init_method_std: std of the random initialisation (used only without --load).
    """

    architecture: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 176
    vocab_size: int = 1000
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False, compare=True)
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.query_groups}"
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def traits(self) -> ArchitectureTraits:
        return ARCHITECTURE_TRAITS[self.architecture]

    @property
    def hf_model_type(self) -> str:
        """The ``model_type`` of the Hugging Face config.json this model converts to and from."""
        return self.architecture

    @property
    def norm_parameters(self) -> int:
        """Parameters of one norm: a weight, and a bias for LayerNorm."""
        return self.hidden_size * (2 if self.traits.normalization == "LayerNorm" else 1)

    @property
    def position_embedding_parameters(self) -> int:
        """Parameters of the learned position table (none with rope)."""
        return self.max_position_embeddings * self.hidden_size if self.traits.position_embedding_type == "learned_absolute" else 0

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        """Parameters of the unpadded model (embedding counted once when tied)."""
        d, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        kv = self.query_groups * self.head_dim
        bias = 1 if self.traits.linear_biases else 0
        fc1_rows = 2 * f if self.traits.gated_linear_unit else f
        attention = d * (d + 2 * kv) + bias * (d + 2 * kv) + d * d + bias * d
        mlp = fc1_rows * d + bias * fc1_rows + d * f + bias * d
        layer = attention + mlp + 2 * self.norm_parameters
        extra = self.norm_parameters + self.position_embedding_parameters
        embeddings = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + extra

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x parameters + attention scores."""
        attention = 12 * self.num_layers * self.hidden_size * seq_length
        return 6.0 * self.num_parameters() + attention


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = make_vocab_size_divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


PRESETS = {
    "tiny": ModelConfig(),
    "llama1-7b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
        vocab_size=32000, max_position_embeddings=2048, norm_epsilon=1e-6,
    ),
    "llama2-7b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
        vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama2-13b": ModelConfig(
        num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
        vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama2-70b": ModelConfig(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, vocab_size=32000, max_position_embeddings=4096,
    ),
    "llama3-8b": ModelConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
    "llama3-70b": ModelConfig(
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
        ffn_hidden_size=28672, vocab_size=128256, max_position_embeddings=8192,
        rotary_base=500000.0,
    ),
    "opt-6.7b": ModelConfig(
        architecture="opt", num_layers=32, hidden_size=4096, num_attention_heads=32,
        ffn_hidden_size=16384, vocab_size=50272, max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **overrides)
