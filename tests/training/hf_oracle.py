"""The outside oracle of a training step: transformers' loss and gradients on the same samples.

Everything here is transformers and formulas: the samples are read with megatron-core's own
indexed-dataset reader, the labels are the token ids where the loss mask is 1 (transformers
shifts them itself), the loss is transformers' ``ForCausalLMLoss`` summed over the samples and
divided by the global batch's loss tokens (``num_items_in_batch``), and the noise enters
through ``inputs_embeds = E[x] + s * eps`` with ``s * eps`` from the pure ``embedding_noise``
function (which tests/noise/test_embedding_noise.py checks against its formulas). The
gradients are then laid out as megatron-core holds them, by the rules of its tensor-parallel
layers written out here (not by the package's converter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

# (uid, dataset index) of each sample of a global batch, as the trainer consumed them.
Samples = Sequence[Tuple[int, int]]


def read_samples(prefix: str, indices: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(token ids, loss mask) of each dataset index, through megatron-core's reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(prefix + "_tokens"), IndexedDataset(prefix + "_loss_mask")
    return [(torch.from_numpy(tokens[i].astype("int64")), torch.from_numpy(masks[i].astype("int64"))) for i in indices]


@dataclass
class Reference:
    samples: List[Tuple[int, int]]
    loss: float
    loss_tokens: int
    grads: Dict[str, torch.Tensor]  # megatron-core's parameter names, tensor-parallel-1 layout, unpadded vocabulary


def load_hf_model(hf_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()  # no dropout; gradients are still taken
    # transformers gives the pad token's embedding row no gradient (nn.Embedding's padding_idx).
    # SmolLM2's pad token is <|im_end|>, which ends every ChatML turn: a real token that the
    # trainer trains (its padding never reaches the loss). Train that row here too.
    model.get_input_embeddings().padding_idx = None
    return model


def reference_step(model, prefix: str, samples: Samples, noise, max_tokens: int, gradients: bool = True) -> Reference:
    """The mean cross entropy over every loss token of ``samples`` (both copies for SymNoise)
    and its gradients. ``noise``: a NoiseConfig.

    One right-padded batch, a row per sample and copy (padding attends to nothing and carries
    no label, so each row's loss is its sample's alone)."""
    from symnoise_megatron.noise.embedding_noise import embedding_noise

    model.zero_grad(set_to_none=True)
    data = read_samples(prefix, [index for _, index in samples])
    signs = (1, -1) if noise.is_symmetric else (1,)
    width = max(ids.numel() for ids, _ in data)
    ids_rows, label_rows, noise_rows, attention = [], [], [], []
    for (uid, _), (ids, mask) in zip(samples, data):
        # The model reads all tokens but the last (it is only a target): L = len - 1.
        length = ids.numel() - 1
        assert length <= max_tokens, f"sample {uid} is cut by --seq-length; the oracle reads it whole"
        pad = width - ids.numel()
        for sign in signs:
            ids_rows.append(torch.nn.functional.pad(ids, (0, pad)))
            label_rows.append(torch.nn.functional.pad(torch.where(mask.bool(), ids, -100), (0, pad), value=-100))
            attention.append(torch.nn.functional.pad(torch.ones_like(ids), (0, pad)))
            # Positions >= L (the last token, a target only, and the padding) get no noise.
            noise_rows.append(embedding_noise(noise, torch.tensor([uid]), torch.arange(width)[None], torch.tensor([length]),
                                              model.config.hidden_size, sign=sign)[0])
    labels = torch.stack(label_rows)
    loss_tokens = int((labels[:, 1:] != -100).sum())  # transformers shifts: the first token is no target
    with torch.set_grad_enabled(gradients):
        embeds = model.get_input_embeddings()(torch.stack(ids_rows)) + torch.stack(noise_rows)
        out = model(inputs_embeds=embeds, attention_mask=torch.stack(attention), labels=labels,
                    num_items_in_batch=loss_tokens)
    if gradients:
        out.loss.backward()
    return Reference(list(samples), float(out.loss.detach()), loss_tokens, megatron_layout(model) if gradients else {})


def megatron_layout(model) -> Dict[str, torch.Tensor]:
    """A LLaMA's gradients under megatron-core's local-spec parameter names (TP 1): fused
    qkv per query group, [gate; up]."""
    config = model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    params = dict(model.named_parameters())

    def grad(name):
        return params[name].grad

    out = {"embedding.word_embeddings.weight": grad("model.embed_tokens.weight").clone(),
           "decoder.final_layernorm.weight": grad("model.norm.weight").clone()}
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = grad("lm_head.weight").clone()
    for i in range(config.num_hidden_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (grad(hf + f"self_attn.{x}_proj.weight") for x in "qkv")
        per_group = heads // groups * head_dim
        qkv = torch.cat([q.reshape(groups, per_group, -1), k.reshape(groups, head_dim, -1),
                         v.reshape(groups, head_dim, -1)], dim=1)
        out.update({
            mg + "input_layernorm.weight": grad(hf + "input_layernorm.weight"),
            mg + "self_attention.linear_qkv.weight": qkv.reshape(-1, config.hidden_size),
            mg + "self_attention.linear_proj.weight": grad(hf + "self_attn.o_proj.weight"),
            mg + "pre_mlp_layernorm.weight": grad(hf + "post_attention_layernorm.weight"),
            mg + "mlp.linear_fc1.weight": torch.cat([grad(hf + "mlp.gate_proj.weight"), grad(hf + "mlp.up_proj.weight")]),
            mg + "mlp.linear_fc2.weight": grad(hf + "mlp.down_proj.weight"),
        })
    return out


def padded_vocabulary(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's rule: the rows rounded up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


VOCABULARY_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


def tensor_parallel_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The part of ``full`` (TP 1 layout) that tensor-parallel rank ``rank`` of ``size`` holds;
    the vocabulary tables padded first, with rows no token reaches (zero gradient)."""
    if name in VOCABULARY_TABLES:
        rows = padded_vocabulary(full.shape[0], size)
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], full.shape[1])])
    if size == 1 or name.endswith("layernorm.weight"):
        return full  # norms are replicated
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(size, dim=1)[rank]  # row-parallel: the input dimension is split
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2)  # each rank holds its share of the gate and of the up projection
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    # Column-parallel (qkv: whole query groups per rank) and the vocabulary-parallel tables.
    return full.chunk(size)[rank]


def gradient_mismatches(grads: Dict[str, torch.Tensor], reference: Reference, rank: int, size: int,
                        tolerance: float) -> List[str]:
    """Every parameter whose gradient differs from the reference's by more than ``tolerance`` of
    the reference's largest entry (and any parameter missing on either side)."""
    problems = sorted(set(reference.grads) ^ set(grads))
    for name in sorted(set(reference.grads) & set(grads)):
        expected = tensor_parallel_shard(name, reference.grads[name], rank, size)
        got = grads[name]
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
            continue
        scale = float(expected.abs().max())
        error = float((got.float() - expected).abs().max())
        if error > tolerance * scale:
            problems.append(f"{name}: max |difference| {error:.3g} of max |gradient| {scale:.3g}")
    return problems
