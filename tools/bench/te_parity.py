#!/usr/bin/env python
"""The Transformer Engine spec against megatron-core's local spec, on the same weights (GPU).

  python tools/bench/te_parity.py --workdir /tmp/te_parity [--num-layers 2 --seq-length 512]

One set of weights (a LLaMA-2-7B-wide model with --num-layers layers, random, saved once as
a megatron checkpoint with the keys a converted checkpoint has) is loaded into both specs
through the project's own loader, in BF16. The local spec is purely local (torch norms and
attention, no TE module anywhere). Checks, each against a stated tolerance:

- logits: max |TE - local| over the largest |logit| of the local spec, same tokens (eval);
- train_loss: --steps training steps with symmetric noise (alpha 5, concat pairing) from the
  same weights and batches, max over steps of |TE - local| / local loss; padded rows, and packed
  rows (TE: thd cumulative lengths; local: the dense block-diagonal mask);
- packed_sample_loss: on TE, the per-sample mean losses (both symmetric copies, noise on,
  no update) of packed rows with a padded tail and an empty filler row, laid end to end,
  against the same samples one per padded row; max |difference| in nats;
- noise_gradients: on TE, one noisy forward and backward through the fused Triton kernel and
  through the torch reference: the word embedding's and layer 0's QKV gradients, max relative
  difference (issue 24: the kernel's output once had no grad_fn; the kernel must have run).

Writes tools/bench/results/te_parity.json (and $OUT/te_parity.json) after every phase, with the
tolerances, the measured differences, ``passed`` and ``complete``; exits 1 when a check fails,
0 with SKIPPED where there is no CUDA or no Transformer Engine. The phases run one after the
other in this process (each releases megatron-core's groups before the next).
``--smallest``: the tiny model on the CPU, local spec on both sides (the dry run).
"""

import argparse
import dataclasses
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import (  # noqa: E402
    add_smallest_flag, bundled_data, check, device_name, one_process_group, parity_report, release_trainer,
    stage_device, versions, write_json,
)

TOLERANCES = {
    # BF16 through different kernels (TE's fused norm+GEMM and fused attention vs torch norm,
    # GEMM and unfused attention): a few BF16 roundings (2^-8 each) of the largest logit.
    "logits": 0.02,
    # 20 steps of lr 1e-5 from the same start: the per-step loss may drift by BF16 rounding only.
    "train_loss_padded": 0.01,
    "train_loss_packed": 0.01,
    # The same tokens, the same noise, one sample per row or several: nats.
    "packed_sample_loss": 0.02,
    # The same bits of noise either way (the kernel equals the reference bit for bit in BF16): what
    # is left is the order of the backward's atomic adds.
    "noise_gradients": 0.01,
}
ALPHA = 5.0


def model_config(args, vocab: int):
    from symnoise_megatron.model.config import preset

    return preset("tiny" if args.smallest else "llama2-7b", num_layers=args.num_layers, vocab_size=vocab,
                  max_position_embeddings=max(4096, args.seq_length))


def build(model, noise, transformer_engine: bool, device: str):
    """One BF16 chunk on ``device`` (unwrapped: the loader fills it before Float16Module wraps it)."""
    from symnoise_megatron.model import builder
    from symnoise_megatron.model.parallelism import ParallelConfig

    with mock.patch.object(builder, "transformer_engine_available", return_value=transformer_engine):
        config = builder.make_transformer_config(model, ParallelConfig(), params_dtype=torch.bfloat16)
        chunk = builder.build_gpt_model(model, noise, config, use_transformer_engine=transformer_engine)
    return chunk.to(device), config


def phase_weights(args, prefix):
    """Random weights of the local spec, saved as a release checkpoint (the keys a converted one has)."""
    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.load import model_sharded_state_dict
    from symnoise_megatron.data.sft_dataset import SFTIndexedData
    from symnoise_megatron.noise.config import NoiseConfig

    model = model_config(args, SFTIndexedData(prefix).meta["tokenizer"]["vocab_size"])
    torch.manual_seed(args.seed)
    chunk, _ = build(model, NoiseConfig("none"), False, args.device)
    root = os.path.join(args.workdir, "weights")
    paths.save_atomically(root, None, model_sharded_state_dict([chunk]),
                          {"model": dataclasses.asdict(model), "make_vocab_size_divisible_by": 128})
    return {"checkpoint": root, "parameters": model.num_parameters()}


def _loaded(args, noise, transformer_engine):
    from megatron.core.transformer.module import Float16Module

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.load import load_model_weights

    root = os.path.join(args.workdir, "weights")
    chunk, config = build(model_config_of(root), noise, transformer_engine, args.device)
    load_model_weights([chunk], paths.latest_checkpoint_dir(root))
    return Float16Module(config, chunk)


def per_sample_losses(output: torch.Tensor, mb) -> dict:
    """(uid, sign) -> mean loss over that copy's loss tokens."""
    from symnoise_megatron.noise.embedding_noise import per_token

    losses = output.float().reshape(mb.tokens.shape).cpu()
    mask = mb.loss_mask.cpu()
    uids = per_token(mb.sample_uids.cpu(), mb.position_ids.cpu())
    signs = mb.sign.cpu() if isinstance(mb.sign, torch.Tensor) else torch.full((mb.size,), mb.sign)
    sums = {}
    for row in range(mb.size):
        for uid in uids[row][mask[row] > 0].unique().tolist():
            where = (uids[row] == uid) & (mask[row] > 0)
            total, count = sums.get((uid, int(signs[row])), (0.0, 0))
            sums[(uid, int(signs[row]))] = (total + float(losses[row][where].sum()), count + int(where.sum()))
    return {key: total / count for key, (total, count) in sums.items()}


def phase_forward(args, prefix):
    """Logits of both specs on the same tokens; packed vs padded per-sample losses on TE."""
    from symnoise_megatron.data.microbatch import attention_mask_from_positions, concatenate
    from symnoise_megatron.data.sft_dataset import Sample, SFTIndexedData, collate, empty_packed_row, pack
    from symnoise_megatron.model.builder import built_with_transformer_engine
    from symnoise_megatron.noise.config import NoiseConfig
    from symnoise_megatron.training.forward_step import forward_step

    noise = NoiseConfig("symmetric", ALPHA, 1234, "concat")
    local, te = _loaded(args, noise, False), _loaded(args, noise, args.transformer_engine)
    generator = torch.Generator().manual_seed(args.seed)
    data = SFTIndexedData(prefix)
    vocab = data.meta["tokenizer"]["vocab_size"]
    tokens = torch.randint(0, vocab, (2, args.seq_length), generator=generator).to(args.device)
    positions = torch.arange(args.seq_length, device=args.device).expand(2, -1)
    with torch.no_grad():
        logits = {}
        for name, chunk in (("local", local), ("te", te)):
            chunk.eval()
            # Only the local spec reads a mask (TE's attention is causal by itself).
            mask = None if built_with_transformer_engine(chunk) else attention_mask_from_positions(positions[:1])
            logits[name] = chunk(tokens, positions, mask).float()
    largest = float(logits["local"].abs().max())
    logit_error = float((logits["te"] - logits["local"]).abs().max()) / largest

    samples = [Sample(uid, *data[uid]) for uid in range(args.packed_samples)]
    packed = concatenate(pack(samples, args.seq_length) + [empty_packed_row(args.seq_length)]).doubled()
    padded = collate(samples, args.seq_length).doubled()
    losses = {}
    te.train()
    with torch.no_grad():
        for name, mb in (("packed", packed), ("padded", padded)):
            mb = mb.to(args.device)
            output, _ = forward_step(iter([mb]), te)
            losses[name] = per_sample_losses(output, mb)
    if set(losses["packed"]) != set(losses["padded"]):
        raise RuntimeError(f"packed and padded rows hold different samples: {sorted(losses['packed'])} vs {sorted(losses['padded'])}")
    sample_error = max(abs(losses["packed"][k] - losses["padded"][k]) for k in losses["padded"])
    return {"logits": logit_error, "largest_logit": largest, "packed_sample_loss": sample_error,
            "packed_rows": packed.size, "samples": len(samples),
            "per_sample": {f"{uid}{'+' if sign > 0 else '-'}": [losses["packed"][(uid, sign)], losses["padded"][(uid, sign)]]
                           for uid, sign in sorted(losses["padded"])}}


def phase_noise_gradients(args, prefix):
    """One noisy forward and backward on TE through each noise path: the gradients they give."""
    from symnoise_megatron.data.sft_dataset import Sample, SFTIndexedData, collate
    from symnoise_megatron.noise import embedding as noisy_embedding
    from symnoise_megatron.noise.config import NoiseConfig
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.training.forward_step import forward_step

    te = _loaded(args, NoiseConfig("symmetric", ALPHA, 1234, "concat"), args.transformer_engine)
    te.train()
    data = SFTIndexedData(prefix)
    mb = collate([Sample(uid, *data[uid]) for uid in range(2)], args.seq_length).doubled().to(args.device)
    watched = {name: param for name, param in te.named_parameters()
               if name.endswith(("word_embeddings.weight", "layers.0.self_attention.linear_qkv.weight"))}
    gradients, calls = {}, {}
    for fused in (True, False):
        for embedding in noisy_embeddings(te):
            embedding.use_fused_noise = fused
        te.zero_grad(set_to_none=True)
        kernel = mock.Mock(wraps=noisy_embedding.add_noise_fused)
        with mock.patch.object(noisy_embedding, "add_noise_fused", kernel):
            output, loss_func = forward_step(iter([mb]), te)
            loss_func(output)[0].backward()
        calls[fused] = kernel.call_count
        gradients[fused] = {name: (param.grad.float().clone() if param.grad is not None else torch.zeros_like(param, dtype=torch.float32))
                            for name, param in watched.items()}
    difference = {name: float((gradients[True][name] - gradients[False][name]).norm() / gradients[False][name].norm())
                  for name in watched}
    return {"noise_gradients": max(difference.values()), "per_parameter": difference, "fused_kernel_calls": calls[True],
            "reference_norms": {name: float(g.norm()) for name, g in gradients[False].items()}}


def phase_train(args, prefix, transformer_engine: bool, packed: bool):
    """--steps training steps from the shared weights: the loss of each."""
    from symnoise_megatron.model import builder
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    config = TrainingConfig.from_flags(
        data_path=[prefix], load=os.path.join(args.workdir, "weights"), finetune=True, seq_length=args.seq_length,
        pack_sequences=packed, micro_batch_size=2, global_batch_size=8, train_iters=args.steps, lr=1e-5,
        lr_warmup_fraction=0.0, bf16=True, noise_kind="symmetric", noise_alpha=ALPHA, noise_pairing="concat",
        eval_interval=None, log_interval=10 ** 6, split="100,0", seed=args.seed)
    with mock.patch.object(builder, "transformer_engine_available", return_value=transformer_engine):
        trainer = Trainer(config, log=lambda message: None)
    layers = {type(m).__name__ for m in trainer.chunks[0].modules()}
    uses_te = any(name.startswith("TE") for name in layers)
    if uses_te != transformer_engine:
        raise RuntimeError(f"asked for {'TE' if transformer_engine else 'local'} spec, built {sorted(layers)}")
    losses = [trainer.train_step()[0] for _ in range(args.steps)]
    release_trainer(trainer)
    return {"losses": losses}


PHASES = {
    "weights": phase_weights,
    "forward": phase_forward,
    "noise_gradients": phase_noise_gradients,
    "train_te_padded": lambda args, prefix: phase_train(args, prefix, args.transformer_engine, False),
    "train_local_padded": lambda args, prefix: phase_train(args, prefix, False, False),
    "train_te_packed": lambda args, prefix: phase_train(args, prefix, args.transformer_engine, True),
    "train_local_packed": lambda args, prefix: phase_train(args, prefix, False, True),
}
# Phases that build their own chunks outside a trainer: they run inside a plain process group.
OUTSIDE_TRAINER = ("weights", "forward", "noise_gradients")


def relative_loss_gap(te: list, local: list) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(te, local)) if te and len(te) == len(local) else float("nan")


def checks_of(results: dict) -> dict:
    """The verdicts of the phases that ran (a phase cut off by the time limit is absent)."""
    checks = {}
    forward = results.get("forward")
    if forward:
        checks["logits"] = check(forward["logits"], TOLERANCES["logits"])
        checks["packed_sample_loss"] = check(forward["packed_sample_loss"], TOLERANCES["packed_sample_loss"])
    for rows in ("padded", "packed"):
        te, local = results.get(f"train_te_{rows}"), results.get(f"train_local_{rows}")
        if te and local:
            checks[f"train_loss_{rows}"] = check(relative_loss_gap(te["losses"], local["losses"]), TOLERANCES[f"train_loss_{rows}"])
    if "noise_gradients" in results:
        gradients = results["noise_gradients"]
        ran = gradients["fused_kernel_calls"] > 0 or gradients.get("dry_run")
        checks["noise_gradients"] = check(gradients["noise_gradients"] if ran else float("nan"), TOLERANCES["noise_gradients"])
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/te_parity")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--packed-samples", type=int, default=12, help="samples in the packed vs padded check")
    parser.add_argument("--seed", type=int, default=1234)
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    args.device = stage_device("te_parity", args.smallest)
    if args.device is None:
        return 0
    args.transformer_engine = not args.smallest
    if args.smallest:
        args.seq_length, args.steps, args.packed_samples = 64, 2, 4
    os.makedirs(args.workdir, exist_ok=True)
    with one_process_group():
        return run(args, argv)


def run(args, argv) -> int:
    from megatron.core import parallel_state

    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    prefix = bundled_data(args.workdir, args.seq_length)
    results, report = {}, {}
    for phase, run_phase in PHASES.items():
        if phase in OUTSIDE_TRAINER:
            initialize_distributed(ParallelConfig(), seed=args.seed)
        results[phase] = run_phase(args, prefix)
        if phase == "noise_gradients":
            results[phase]["dry_run"] = args.smallest  # no fused kernel on the CPU: both paths are the reference
        parallel_state.destroy_model_parallel()
        print(f"te_parity phase {phase} done", flush=True)
        checks = checks_of(results)
        report = parity_report(
            checks, device=device_name(), versions=versions(), dry_run=args.smallest,
            command="python tools/bench/te_parity.py " + " ".join(argv or sys.argv[1:]),
            model=f"{'tiny' if args.smallest else 'llama2-7b width'}, {args.num_layers} layers, "
                  f"{results['weights']['parameters']} parameters, BF16",
            seq_length=args.seq_length, steps=args.steps, noise=f"symmetric alpha {ALPHA:g}, concat pairing",
            complete=len(results) == len(PHASES),
            details={"largest_logit": results.get("forward", {}).get("largest_logit"),
                     "per_sample_loss_packed_vs_padded": results.get("forward", {}).get("per_sample"),
                     "noise_gradients": results.get("noise_gradients"),
                     "losses": {name: value["losses"] for name, value in results.items() if name.startswith("train_")}})
        report["passed"] = report["passed"] and report["complete"]
        written = write_json("te_parity.json", report, dry_run=args.smallest)
    print(f"\n{report['device']}: TE spec vs local spec, {report['model']}\n")
    print("| check | measured | tolerance | passed |\n|---|---|---|---|")
    for name, c in report["checks"].items():
        print(f"| {name} | {c['measured']:.3g} | {c['tolerance']:g} | {'yes' if c['passed'] else 'NO'} |")
    print("written:", ", ".join(written))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
