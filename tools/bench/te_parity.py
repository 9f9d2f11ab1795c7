#!/usr/bin/env python
"""The Transformer Engine spec against megatron-core's local spec, on the same weights (GPU).

  python tools/bench/te_parity.py --workdir /tmp/te_parity [--num-layers 2 --seq-length 512]

One set of weights (a LLaMA-2-7B-wide model with --num-layers layers, random, saved once as
a megatron checkpoint with the keys a converted checkpoint has) is loaded into both specs
through the project's own loader, in BF16. Checks, each against a stated tolerance:

- logits: max |TE - local| over the largest |logit| of the local spec, same tokens (eval);
- train_loss: 20 training steps with symmetric noise (alpha 5, concat pairing) from the same
  weights and batches, max over steps of |TE - local| / local loss; padded rows, and packed
  rows (TE: thd cumulative lengths; local: the dense block-diagonal mask);
- packed_sample_loss: on TE, the per-sample mean losses (both symmetric copies, noise on,
  no update) of packed rows with a padded tail and an empty filler row, laid end to end,
  against the same samples one per padded row; max |difference| in nats.

Writes tools/bench/results/te_parity.json (and $OUT/te_parity.json) with the tolerances, the
measured differences and ``passed``; exits 1 when a check fails, 0 with SKIPPED where there
is no CUDA or no Transformer Engine. Each phase runs in its own process (megatron-core keeps
global state that one process cannot reset).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import SKIPPED, check, device_name, needs_cuda_and_te, parity_report, versions, write_json  # noqa: E402

TOLERANCES = {
    # BF16 through different kernels (TE's fused norm+GEMM and fused attention vs torch norm,
    # GEMM and unfused attention): a few BF16 roundings (2^-8 each) of the largest logit.
    "logits": 0.02,
    # 20 steps of lr 1e-5 from the same start: the per-step loss may drift by BF16 rounding only.
    "train_loss_padded": 0.01,
    "train_loss_packed": 0.01,
    # The same tokens, the same noise, one sample per row or several: nats.
    "packed_sample_loss": 0.02,
}
ALPHA = 5.0


def data_prefix(workdir: str, seq_length: int) -> str:
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    prefix = os.path.join(workdir, f"bundled_{seq_length}")
    if not os.path.exists(prefix + "_tokens.bin"):
        preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                    prompt_template="alpaca", seq_length=seq_length + 1, progress=False))
    return prefix


def model_config(args, vocab: int):
    from symnoise_megatron.model.config import preset

    return preset("llama2-7b", num_layers=args.num_layers, vocab_size=vocab,
                  max_position_embeddings=max(4096, args.seq_length))


def build(model, noise, transformer_engine: bool):
    """One BF16 chunk on the GPU (unwrapped: the loader fills it before Float16Module wraps it)."""
    from symnoise_megatron.model import builder
    from symnoise_megatron.model.parallelism import ParallelConfig

    with mock.patch.object(builder, "transformer_engine_available", return_value=transformer_engine):
        config = builder.make_transformer_config(model, ParallelConfig(), params_dtype=torch.bfloat16)
        chunk = builder.build_gpt_model(model, noise, config, use_transformer_engine=transformer_engine)
    return chunk.cuda(), config


def phase_weights(args, prefix):
    """Random weights of the local spec, saved as a release checkpoint (the keys a converted one has)."""
    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.load import model_sharded_state_dict
    from symnoise_megatron.data.sft_dataset import SFTIndexedData
    from symnoise_megatron.noise.config import NoiseConfig

    model = model_config(args, SFTIndexedData(prefix).meta["tokenizer"]["vocab_size"])
    torch.manual_seed(args.seed)
    chunk, _ = build(model, NoiseConfig("none"), transformer_engine=False)
    root = os.path.join(args.workdir, "weights")
    paths.save_atomically(root, None, model_sharded_state_dict([chunk]),
                          {"model": dataclasses.asdict(model), "make_vocab_size_divisible_by": 128})
    return {"checkpoint": root, "parameters": model.num_parameters()}


def _loaded(args, root, noise, transformer_engine):
    from megatron.core.transformer.module import Float16Module

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.load import load_model_weights

    chunk, config = build(model_config_of(root), noise, transformer_engine)
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
    from symnoise_megatron.noise.config import NoiseConfig
    from symnoise_megatron.training.forward_step import forward_step

    root = os.path.join(args.workdir, "weights")
    noise = NoiseConfig("symmetric", ALPHA, 1234, "concat")
    local, te = _loaded(args, root, noise, False), _loaded(args, root, noise, True)
    generator = torch.Generator().manual_seed(args.seed)
    data = SFTIndexedData(prefix)
    vocab = data.meta["tokenizer"]["vocab_size"]
    tokens = torch.randint(0, vocab, (2, args.seq_length), generator=generator).cuda()
    positions = torch.arange(args.seq_length).expand(2, -1).cuda()
    mask = attention_mask_from_positions(positions)
    with torch.no_grad():
        logits = {}
        for name, chunk in (("local", local), ("te", te)):
            chunk.eval()
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
            mb = mb.to("cuda")
            output, _ = forward_step(iter([mb]), te)
            losses[name] = per_sample_losses(output, mb)
    if set(losses["packed"]) != set(losses["padded"]):
        raise RuntimeError(f"packed and padded rows hold different samples: {sorted(losses['packed'])} vs {sorted(losses['padded'])}")
    sample_error = max(abs(losses["packed"][k] - losses["padded"][k]) for k in losses["padded"])
    return {"logits": logit_error, "largest_logit": largest, "packed_sample_loss": sample_error,
            "packed_rows": packed.size, "samples": len(samples),
            "per_sample": {f"{uid}{'+' if sign > 0 else '-'}": [losses["packed"][(uid, sign)], losses["padded"][(uid, sign)]]
                           for uid, sign in sorted(losses["padded"])}}


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
    return {"losses": [trainer.train_step()[0] for _ in range(args.steps)]}


PHASES = {
    "weights": phase_weights,
    "forward": phase_forward,
    "train_te_padded": lambda args, prefix: phase_train(args, prefix, True, False),
    "train_local_padded": lambda args, prefix: phase_train(args, prefix, False, False),
    "train_te_packed": lambda args, prefix: phase_train(args, prefix, True, True),
    "train_local_packed": lambda args, prefix: phase_train(args, prefix, False, True),
}


def run_phase(args, phase: str) -> dict:
    out = os.path.join(args.workdir, f"{phase}.json")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29600 + os.getpid() % 1000))
    command = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--num-layers", str(args.num_layers),
               "--seq-length", str(args.seq_length), "--steps", str(args.steps), "--seed", str(args.seed),
               "--packed-samples", str(args.packed_samples), "--phase", phase, "--result", out]
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"te_parity phase {phase} failed (its output is above)")
    with open(out) as handle:
        return json.load(handle)


def relative_loss_gap(te: list, local: list) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(te, local)) if te and len(te) == len(local) else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/te_parity")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--packed-samples", type=int, default=12, help="samples in the packed vs padded check")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reason = needs_cuda_and_te("te_parity")
    if reason:
        print(reason)
        return SKIPPED
    os.makedirs(args.workdir, exist_ok=True)
    prefix = data_prefix(args.workdir, args.seq_length)
    if args.phase:
        from symnoise_megatron.model.parallelism import ParallelConfig
        from symnoise_megatron.runtime.parallel import initialize_distributed

        if args.phase in ("weights", "forward"):
            initialize_distributed(ParallelConfig(), seed=args.seed)
        with open(args.result, "w") as handle:
            json.dump(PHASES[args.phase](args, prefix), handle)
        return 0
    results = {phase: run_phase(args, phase) for phase in PHASES}
    forward = results["forward"]
    checks = {
        "logits": check(forward["logits"], TOLERANCES["logits"]),
        "train_loss_padded": check(relative_loss_gap(results["train_te_padded"]["losses"],
                                                     results["train_local_padded"]["losses"]), TOLERANCES["train_loss_padded"]),
        "train_loss_packed": check(relative_loss_gap(results["train_te_packed"]["losses"],
                                                     results["train_local_packed"]["losses"]), TOLERANCES["train_loss_packed"]),
        "packed_sample_loss": check(forward["packed_sample_loss"], TOLERANCES["packed_sample_loss"]),
    }
    report = parity_report(
        checks, device=device_name(), versions=versions(), command="python tools/bench/te_parity.py " + " ".join(argv or sys.argv[1:]),
        model=f"llama2-7b width, {args.num_layers} layers, {results['weights']['parameters']} parameters, BF16",
        seq_length=args.seq_length, steps=args.steps, noise=f"symmetric alpha {ALPHA:g}, concat pairing",
        details={"largest_logit": forward["largest_logit"], "per_sample_loss_packed_vs_padded": forward["per_sample"],
                 "losses": {phase: results[phase]["losses"] for phase in PHASES if phase.startswith("train_")}})
    print(f"\n{report['device']}: TE spec vs local spec, {report['model']}\n")
    print("| check | measured | tolerance | passed |\n|---|---|---|---|")
    for name, c in checks.items():
        print(f"| {name} | {c['measured']:.3g} | {c['tolerance']:g} | {'yes' if c['passed'] else 'NO'} |")
    print("written:", ", ".join(write_json("te_parity.json", report)))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
