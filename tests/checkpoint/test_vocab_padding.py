"""A vocabulary megatron pads (301 tokens: 384 columns under TP 1, 512 under TP 2 and 4, a shard of
padding only on TP 4's last rank) gives transformers' loss, gradients and logits under every TP.

The converted models of tests/checkpoint/conftest.py, on 4 gloo ranks: megatron's loss at loss
tokens only (the training path), its full-output-layer loss (the path under sequence parallelism)
and its logits outside training, against LlamaForCausalLM / OPTForCausalLM on the same weights.
"""

from contextlib import nullcontext

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

NAMES = {"llama_mha": "llama", "opt": "opt"}  # untied and tied output layers, 301 tokens
TPS = (4, 2, 1)
BATCH, SEQ, PROMPT = 2, 24, 5


def batch():
    tokens = torch.randint(0, 301, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    labels = torch.roll(tokens, -1, 1)
    positions = torch.arange(SEQ)
    loss_mask = ((positions >= PROMPT) & (positions < SEQ - 1)).float().expand(BATCH, SEQ).contiguous()
    return tokens, labels, loss_mask


# megatron parameter -> (HF parameter per architecture, split along dim 0 over TP)
GRADIENTS = {
    "embedding.word_embeddings.weight": ({"llama": "model.embed_tokens.weight",
                                          "opt": "model.decoder.embed_tokens.weight"}, True),
    "output_layer.weight": ({"llama": "lm_head.weight"}, True),
    "decoder.final_layernorm.weight": ({"llama": "model.norm.weight",
                                        "opt": "model.decoder.final_layer_norm.weight"}, False),
}


def _gather_rows(tensor, group):
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def megatron_under_every_tp(pairs):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.load import load_model_weights
    from symnoise_megatron.data.microbatch import attention_mask_from_positions, loss_positions
    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.model.step_inputs import step_inputs
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    tokens, labels, loss_mask = batch()
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    attention_mask = attention_mask_from_positions(position_ids)
    results = {}
    for tp in TPS:
        parallel = ParallelConfig(tensor_model_parallel_size=tp)
        initialize_distributed(parallel)
        group = parallel_state.get_tensor_model_parallel_group()
        for name in NAMES:
            _, megatron_dir = pairs[name]
            model_config = model_config_of(megatron_dir)
            model = build_gpt_model(model_config, NoiseConfig("none"), make_transformer_config(model_config, parallel),
                                    make_vocab_size_divisible_by=paths.read_info(megatron_dir)["make_vocab_size_divisible_by"])
            load_model_weights([model], paths.latest_checkpoint_dir(megatron_dir))
            for path in ("loss tokens only", "full"):
                model.zero_grad()
                selecting = step_inputs(model, loss_positions=loss_positions(loss_mask)) if path == "loss tokens only" else nullcontext()
                with selecting:
                    per_token = model(tokens, position_ids, attention_mask, labels=labels)
                (torch.sum(per_token * loss_mask) / loss_mask.sum()).backward()
                params = dict(model.named_parameters())
                grads = {key: _gather_rows(params[key].grad, group) if split else params[key].grad.clone()
                         for key, (_, split) in GRADIENTS.items() if key in params}
                results[(tp, name, path)] = {"per_token": per_token.detach(), "grads": grads}
            with torch.no_grad():
                model.eval()
                logits = gather_from_tensor_model_parallel_region(model(tokens, position_ids, attention_mask))
            results[(tp, name, "logits")] = logits
        parallel_state.destroy_model_parallel()
    return results if dist.get_rank() == 0 else None


def transformers_reference(hf_dir):
    from transformers import AutoModelForCausalLM

    tokens, _, loss_mask = batch()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    logits = model(input_ids=tokens).logits
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none").view(BATCH, SEQ - 1)
    mask = loss_mask[:, :-1]
    (torch.sum(per_token * mask) / mask.sum()).backward()
    return {"per_token": per_token.detach(), "logits": logits.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


@pytest.fixture(scope="module")
def outcomes(converted):
    megatron = run_distributed(megatron_under_every_tp, 4, converted)[0]
    return megatron, {name: transformers_reference(converted[name][0]) for name in NAMES}


@pytest.mark.parametrize("path", ["loss tokens only", "full"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp", TPS)
def test_loss_and_gradients_equal_transformers(outcomes, tp, name, path):
    megatron, reference = outcomes[0][(tp, name, path)], outcomes[1][name]
    mask = batch()[2][:, :-1].bool()
    torch.testing.assert_close(megatron["per_token"][:, :-1][mask], reference["per_token"][mask], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(megatron["per_token"][:, :-1][~mask]) == 0 or path == "full"
    for key, (hf_names, split) in GRADIENTS.items():
        if NAMES[name] not in hf_names:
            continue
        expected = reference["grads"][hf_names[NAMES[name]]]
        actual = megatron["grads"][key]
        if split:
            # The padded rows' logits are masked, so those rows get no gradient at all.
            assert torch.count_nonzero(actual[expected.shape[0]:]) == 0, key
            actual = actual[: expected.shape[0]]
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=f"TP {tp} {name} {path} {key}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp", TPS)
def test_logits_outside_training_never_rank_a_padded_column(outcomes, tp, name):
    logits, expected = outcomes[0][(tp, name, "logits")], outcomes[1][name]["logits"]
    vocab = expected.shape[-1]
    torch.testing.assert_close(logits[..., :vocab], expected, rtol=1e-4, atol=1e-4)
    padding = logits[..., vocab:]
    assert padding.numel() and bool((padding == torch.finfo(padding.dtype).min).all())
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_the_columns_each_rank_keeps():
    from symnoise_megatron.model.config import padded_vocab_size
    from symnoise_megatron.model.loss_tokens import valid_vocab_columns

    def kept(vocab, tp):
        shard = padded_vocab_size(vocab, 128, tp) // tp
        return [valid_vocab_columns(vocab, shard, rank * shard) for rank in range(tp)]

    assert kept(300, 1) == [300]
    assert kept(300, 2) == [256, 44]
    assert kept(300, 4) == [128, 128, 44, 0]
    # LLaMA-2 under TP 8: 32,000 tokens padded to 32,768, the last rank holds 768 padded columns.
    assert padded_vocab_size(32000, 128, 8) == 32768
    assert kept(32000, 8) == [4096] * 7 + [3328]
    assert kept(32000, 1) == [32000]
