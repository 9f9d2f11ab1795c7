"""The noise configuration shared by the model, the data path and the checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass

NOISE_KINDS = ("none", "uniform", "gaussian", "bernoulli", "symmetric")
PAIRINGS = ("concat", "microbatch")


@dataclass(frozen=True)
class NoiseConfig:
    """Which embedding noise to add and how (SymNoise, arXiv 2312.01523).

    Attributes:
        kind: ``none``; ``uniform`` (NEFTune, eps ~ U(-1, 1)); ``gaussian`` (eps ~ N(0, 1));
            ``bernoulli`` (eps = +-1, one copy); ``symmetric`` (SymNoise: both X + s*eps and
            X - s*eps in the same step, with the same eps).
        alpha: noise strength; the per-sequence scale is ``alpha / sqrt(L_i * d)`` with L_i
            the sequence's real (unpadded) length and d the full hidden size. The paper's
            defaults: Alpaca 5, Evol-Instruct 5, ShareGPT 10, OpenPlatypus 15.
        seed: seed of the counter-based generator; the noise of an element is a pure
            function of (seed, sample uid, position, hidden index).
        pairing: how a symmetric step carries both copies. ``concat`` doubles each
            micro-batch (the paper); ``microbatch`` runs the two signs as consecutive
            micro-batches, keeping the activation memory of one copy.
    """

    kind: str = "symmetric"
    alpha: float = 5.0
    seed: int = 1234
    pairing: str = "concat"

    def __post_init__(self):
        # Named by the fine-tune's flags: its argument check is this constructor.
        if self.kind not in NOISE_KINDS or self.pairing not in PAIRINGS:
            raise ValueError(f"--noise-kind must be one of {NOISE_KINDS} and --noise-pairing one of {PAIRINGS}")
        if self.alpha < 0:
            raise ValueError(f"noise alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"noise seed must be in [0, 2**32), got {self.seed}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.alpha > 0

    @property
    def is_symmetric(self) -> bool:
        return self.kind == "symmetric" and self.enabled

    @property
    def copies(self) -> int:
        """Forward passes each sample makes per step: 2 for SymNoise, else 1."""
        return 2 if self.is_symmetric else 1

    def rows_per_microbatch(self, micro_batch_size: int) -> int:
        """Rows of each micro-batch a step runs: ``concat`` pairing carries both copies in one."""
        return micro_batch_size * (self.copies if self.pairing == "concat" else 1)

    def microbatches_per_step(self, num_microbatches: int) -> int:
        """Micro-batches a step runs for ``num_microbatches`` of data: ``microbatch`` pairing runs
        each copy as its own micro-batch."""
        return num_microbatches * (self.copies if self.pairing == "microbatch" else 1)

    def to_dict(self) -> dict:
        return asdict(self)
