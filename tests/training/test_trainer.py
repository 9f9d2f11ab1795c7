"""The fine-tuning loop on real gloo process groups: layouts, pairing, resume, crashes, SIGTERM."""

import json
import os
import shutil

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

BASE = dict(global_batch_size=8, micro_batch_size=2, seq_length=128, train_iters=4,
            lr=2e-3, lr_warmup_fraction=0.0, log_interval=1, noise_kind="symmetric", noise_alpha=5.0)


def convert(hf_dir, megatron_dir):
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, megatron_dir, progress=False)


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    """A tiny LLaMA for the bundled tokenizer, converted: every layout starts from its weights.

    (Random initialisation depends on the pipeline layout, as in Megatron-LM: each stage
    draws only its own layers.)"""
    from tests.checkpoint.conftest import make_hf_model

    root = tmp_path_factory.mktemp("tiny")
    hf_dir = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                         num_hidden_layers=4, max_position_embeddings=256), str(root / "hf"))
    run_distributed(convert, 1, hf_dir, str(root / "megatron"))
    return str(root / "megatron")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory, converted_tiny):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    prefix = str(tmp_path_factory.mktemp("data") / "bundled")
    preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                seq_length=129, progress=False))
    BASE.update(load=converted_tiny, finetune=True)
    return prefix


def train_runs(runs, log_hook=None):
    """Train each config in turn in this process group; the loss history of each."""
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    histories = []
    for kwargs in runs:
        trainer = Trainer(TrainingConfig.from_flags(**kwargs), log=log_hook or (lambda message: None))
        histories.append([record["loss"] for record in trainer.run()])
        parallel_state.destroy_model_parallel()
    return histories


# name: (tensor parallel, pipeline parallel, world size, layers per virtual stage)
LAYOUTS = {"tp1": (1, 1, 1, None), "dp2": (1, 1, 2, None), "tp2": (2, 1, 2, None), "pp2": (1, 2, 2, None),
           "pp2_interleaved": (1, 2, 2, 1), "tp2_pp2": (2, 2, 4, None)}


@pytest.fixture(scope="module")
def layout_runs(data_prefix):
    """Per layout: the losses and the noise scales of rank 0's log lines."""
    out = {}
    for name, (tp, pp, world, per_virtual_stage) in LAYOUTS.items():
        config = dict(BASE, data_path=[data_prefix], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      num_layers_per_virtual_pipeline_stage=per_virtual_stage)
        losses, messages = run_distributed(logged_run, world, config)[0]
        out[name] = losses, [float(m.split("noise scale: ")[1].split()[0]) for m in messages if "noise scale: " in m]
    return out


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1"])
def test_every_layout_trains_the_same_losses_and_logs_the_same_noise_scale(layout_runs, layout):
    losses, scales = layout_runs["tp1"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert layout_runs[layout][0] == pytest.approx(losses, rel=2e-5, abs=2e-5)
    # The logged scale is the step's mean over all its samples, not one rank's last micro-batch.
    assert len(scales) == 4 and all(scale > 0 for scale in scales)
    assert layout_runs[layout][1] == pytest.approx(scales, rel=1e-3)


@pytest.mark.parametrize("pairing", ["concat", "microbatch"])
def test_packed_rows_train_the_same_losses_under_pipeline_parallelism(data_prefix, pairing):
    # Packing leaves a short last micro-batch; pipeline stages need one shape for all.
    packed = dict(BASE, data_path=[data_prefix], pack_sequences=True, micro_batch_size=2, noise_pairing=pairing)
    reference = run_distributed(train_runs, 1, [packed])[0][0]
    pipelined = run_distributed(train_runs, 2, [dict(packed, pipeline_model_parallel_size=2)])[0][0]
    assert reference[-1] < reference[0]
    assert pipelined == pytest.approx(reference, rel=2e-5, abs=2e-5)


def test_concat_and_microbatch_pairing_follow_the_same_trajectory(data_prefix):
    concat, split, none, one_sign = run_distributed(train_runs, 1, [
        dict(BASE, data_path=[data_prefix], noise_pairing="concat"),
        dict(BASE, data_path=[data_prefix], noise_pairing="microbatch"),
        dict(BASE, data_path=[data_prefix], noise_kind="none", train_iters=1),
        dict(BASE, data_path=[data_prefix], noise_kind="bernoulli", train_iters=1),
    ])[0]
    assert split == pytest.approx(concat, rel=2e-5, abs=2e-5)
    # Both pairings carry both signs: the first step's loss is neither the clean one nor that of
    # the + copy alone (bernoulli draws the same eps). Its exact value: tests/training/test_oracle_step.py.
    assert concat[0] != pytest.approx(none[0], rel=1e-6) and concat[0] != pytest.approx(one_sign[0], rel=1e-6)


def grad_norm_history(runs, fused):
    from megatron.core import parallel_state

    from symnoise_megatron.training import loop
    from symnoise_megatron.training.arguments import TrainingConfig

    histories = []
    for kwargs in runs:
        trainer = loop.Trainer(TrainingConfig.from_flags(**kwargs, no_gradient_accumulation_fusion=not fused),
                               log=lambda m: None)
        assert trainer.transformer_config.gradient_accumulation_fusion == fused
        histories.append([(r["loss"], r["grad_norm"]) for r in trainer.run()])
        parallel_state.destroy_model_parallel()
    return histories


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weight_gradients_accumulated_in_place_match_megatrons_unfused_path(data_prefix, tmp_path, tied):
    # The CPU runtime's stand-in for apex's fused wgrad kernel against megatron-core's own
    # unfused path, with gradient accumulation over micro-batches and tensor parallelism. Tied
    # embeddings take megatron's zero_out_wgrad branch (the output layer's gradient goes to the
    # buffer, the embedding's through the hook): losing either half changes the grad norm.
    load = BASE["load"]
    if tied:
        from tests.checkpoint.conftest import make_hf_model

        hf_dir = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                             num_hidden_layers=2, max_position_embeddings=256,
                                             tie_word_embeddings=True), str(tmp_path / "hf"))
        load = str(tmp_path / "megatron")
        run_distributed(convert, 1, hf_dir, load)
    runs = [dict(BASE, data_path=[data_prefix], load=load, eval_interval=None, tensor_model_parallel_size=2)]
    fused = run_distributed(grad_norm_history, 2, runs, True)[0][0]
    unfused = run_distributed(grad_norm_history, 2, runs, False)[0][0]
    assert len(fused) == BASE["train_iters"]
    flat = [value for record in fused for value in record]
    assert flat == pytest.approx([value for record in unfused for value in record], rel=1e-5, abs=1e-6)


def optimizer_state(trainer):
    """Adam's step and moments per parameter name, and the parameter itself, on this rank."""
    names = {id(param): name for chunk in trainer.chunks for name, param in chunk.module.named_parameters()}
    state = {}
    for optimizer in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for group in optimizer.optimizer.param_groups:
            for param in group["params"]:
                moments = optimizer.optimizer.state[param]
                state[names[id(param)]] = {key: torch_clone(moments[key]) for key in ("step", "exp_avg", "exp_avg_sq")}
                state[names[id(param)]]["param"] = torch_clone(param)
    return state


def torch_clone(value):
    return value.detach().clone() if hasattr(value, "detach") else value


def resume_runs(runs):
    """Per (config, rank to SIGTERM after iteration 2 or None): the losses, rank 0's log lines
    and the optimizer state at the end, on each rank."""
    import signal

    import torch.distributed as dist
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config, signalled_rank in runs:
        messages = []
        trainer = Trainer(TrainingConfig.from_flags(**config), log=messages.append)
        train_one = trainer._train_one_iteration

        def train_one_then_signal():
            record = train_one()
            if trainer.iteration == 2 and dist.get_rank() == signalled_rank:
                os.kill(os.getpid(), signal.SIGTERM)  # this rank only: the others are not told
            return record

        trainer._train_one_iteration = train_one_then_signal
        losses = [record["loss"] for record in trainer.run()]
        out.append((losses, messages, optimizer_state(trainer)))
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def tp2_resume(data_prefix, tmp_path_factory):
    """TP 2 runs: straight; stopped by SIGTERM to rank 1 alone after iteration 2, then resumed;
    stopped by --exit-interval 2, then resumed under TP 1 x PP 2."""
    root = tmp_path_factory.mktemp("resume")
    common = dict(BASE, data_path=[data_prefix], tensor_model_parallel_size=2, eval_interval=None)
    runs = {"straight": (dict(common, save=str(root / "straight")), None),
            "signalled": (dict(common, save=str(root / "signalled")), 1),
            "exited": (dict(common, save=str(root / "exited"), exit_interval=2), None)}
    ranks = run_distributed(resume_runs, 2, list(runs.values()))
    out = {name: [rank[i] for rank in ranks] for i, name in enumerate(runs)}
    out["resumed"] = [rank[0] for rank in run_distributed(resume_runs, 2, [runs["signalled"]])]
    other_layout = dict(runs["exited"][0], tensor_model_parallel_size=1, pipeline_model_parallel_size=2, exit_interval=None)
    out["resumed_elsewhere"] = [rank[0] for rank in run_distributed(resume_runs, 2, [(other_layout, None)])]
    out["save"] = {name: config["save"] for name, (config, _) in runs.items()}
    return out


def test_sigterm_to_one_rank_saves_and_stops_every_rank(tp2_resume):
    from symnoise_megatron.checkpoint.paths import read_tracker

    signalled = tp2_resume["signalled"]
    assert [len(losses) for losses, _, _ in signalled] == [2, 2]  # rank 0 stopped too, unsignalled
    assert "exiting at iteration 2 (SIGTERM)" in signalled[0][1]
    assert read_tracker(tp2_resume["save"]["signalled"]) == 4  # saved at 2, then the resumed run finished
    assert any(m.startswith("saved checkpoint at iteration 2 ") for m in signalled[0][1]), signalled[0][1]


def test_resume_is_exact_to_the_optimizer_state_and_works_under_another_layout(tp2_resume):
    straight = tp2_resume["straight"]
    first_half, resumed = tp2_resume["signalled"], tp2_resume["resumed"]
    for rank in range(2):
        assert first_half[rank][0] == straight[rank][0][:2]
        assert resumed[rank][0] == straight[rank][0][2:], "resuming must reproduce the uninterrupted run bit for bit"
        # Adam's moments and step count of every parameter, and the parameter, compared directly.
        expected, got = straight[rank][2], resumed[rank][2]
        assert expected and set(got) == set(expected)
        for name, state in expected.items():
            assert int(got[name]["step"]) == int(state["step"]) == BASE["train_iters"], name
            for key in ("exp_avg", "exp_avg_sq", "param"):
                assert got[name][key].equal(state[key]), (rank, name, key)
    assert tp2_resume["exited"][0][0] == straight[0][0][:2]
    assert tp2_resume["resumed_elsewhere"][-1][0] == pytest.approx(straight[0][0][2:], rel=2e-5, abs=2e-5)


def bf16_parameter_dtypes(config):
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    trainer = Trainer(TrainingConfig.from_flags(**config), log=lambda message: None)
    dtypes = sorted({str(p.dtype) for chunk in trainer.chunks for p in chunk.parameters()})
    parallel_state.destroy_model_parallel()
    return dtypes


def test_bf16_training_holds_bf16_weights_and_resumes_exactly(data_prefix, tmp_path):
    # Megatron-LM's Float16Module: the local spec's torch norms would otherwise stay FP32 and the
    # mixed-precision optimizer's checkpoint would not match the model's (the save failed).
    common = dict(BASE, data_path=[data_prefix], bf16=True, pipeline_model_parallel_size=2, eval_interval=None,
                  noise_kind="symmetric")
    assert run_distributed(bf16_parameter_dtypes, 2, common)[0] == ["torch.bfloat16"]
    straight, first_half = run_distributed(train_runs, 2, [
        dict(common, save=str(tmp_path / "straight")), dict(common, save=str(tmp_path / "stopped"), exit_interval=2)])[0]
    second_half = run_distributed(train_runs, 2, [dict(common, save=str(tmp_path / "stopped"))])[0][0]
    assert first_half == straight[:2] and second_half == straight[2:]


def crash_during_second_save(config):
    from megatron.core import dist_checkpointing

    real_save, calls = dist_checkpointing.save, []

    def failing_save(state, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save(state, directory, *args, **kwargs)

    dist_checkpointing.save = failing_save
    try:
        train_runs([config])
    except OSError as error:
        return str(error)
    finally:
        dist_checkpointing.save = real_save
    return "no crash"


def test_a_crash_during_save_leaves_the_previous_checkpoint(data_prefix, tmp_path):
    from symnoise_megatron.checkpoint.paths import read_tracker

    save = str(tmp_path / "run")
    config = dict(BASE, data_path=[data_prefix], save=save, save_interval=1)
    assert run_distributed(crash_during_second_save, 1, config)[0] == "disk full (injected)"
    assert read_tracker(save) == 1
    assert os.path.isdir(os.path.join(save, "iter_0000001")) and not os.path.isdir(os.path.join(save, "iter_0000002"))
    resumed = run_distributed(train_runs, 1, [config])[0][0]
    assert len(resumed) == 3  # iterations 2..4 after resuming from 1


def sigterm_at_iteration_two(config):
    import signal

    def hook(message):
        if "iteration        2/" in message:
            os.kill(os.getpid(), signal.SIGTERM)

    return train_runs([config], log_hook=hook)[0]


def test_sigterm_saves_and_the_resumed_run_continues(data_prefix, tmp_path):
    from symnoise_megatron.checkpoint.paths import read_tracker

    save = str(tmp_path / "run")
    config = dict(BASE, data_path=[data_prefix], save=save)
    interrupted = run_distributed(sigterm_at_iteration_two, 1, config)[0]
    assert len(interrupted) == 2 and read_tracker(save) == 2
    rest = run_distributed(train_runs, 1, [config])[0][0]
    straight = run_distributed(train_runs, 1, [dict(config, save=str(tmp_path / "straight"))])[0][0]
    assert interrupted + rest == straight
    # Run once more: nothing to train, said, and the finished checkpoint left alone.
    again, messages = run_distributed(logged_run, 1, config)[0]
    assert again == [] and read_tracker(save) == 4
    assert any("nothing to train: the run is at iteration 4 of 4" in message for message in messages), messages


def test_each_step_line_comes_before_its_validation_line(data_prefix):
    _, messages = run_distributed(logged_run, 1, dict(BASE, data_path=[data_prefix], train_iters=2, eval_interval=1,
                                                      eval_iters=1))[0]
    lines = [m for m in messages if "iteration        " in m or "validation loss at" in m]
    kinds = ["validation" if "validation loss" in line else "step" for line in lines]
    assert kinds == ["step", "validation", "step", "validation"], lines


def test_an_empty_validation_part_skips_validation_and_says_so_once(data_prefix):
    # --split 100,0 under a run config's eval_interval: every --eval-interval finds no validation
    # sample (evaluate() has no loss to give); the run trains on and says why once.
    history, messages = run_distributed(logged_run, 1, dict(BASE, data_path=[data_prefix], train_iters=2, split="100,0",
                                                            eval_interval=1, eval_iters=1))[0]
    assert len(history) == 2
    assert not any("validation loss at" in message for message in messages), messages
    notes = [message for message in messages if message.startswith("no validation")]
    assert notes == ["no validation: the validation part is empty (--split 100,0), so --eval-interval 1 is skipped"]


def logged_run(config):
    messages = []
    return train_runs([config], log_hook=messages.append)[0], messages


def build(config):
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    try:
        Trainer(TrainingConfig.from_flags(**config))
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return "built"


def test_bad_arguments_fail_before_any_work(data_prefix, tmp_path):
    from symnoise_megatron.checkpoint.paths import read_info
    from symnoise_megatron.finetune import main

    assert main(["--data-path", str(tmp_path / "nothing"), "--train-iters", "1"]) == 2
    assert main(["--data-path", data_prefix]) == 2  # neither --train-iters nor --train-epochs
    refused_save = tmp_path / "refused"
    messages = run_distributed(build, 2, dict(BASE, data_path=[data_prefix], global_batch_size=6, micro_batch_size=2,
                                              save=str(refused_save)))
    assert "global batch size 6 is not divisible by micro-batch size 2 x data-parallel size 2" in messages[0]
    assert not refused_save.exists()  # refused before --save (and its lock) is created
    save = str(tmp_path / "run")
    run_distributed(train_runs, 1, [dict(BASE, data_path=[data_prefix], save=save, train_iters=1)])
    # Each save records the data's prompt template, for symnoise-generate's default.
    with open(data_prefix + "_meta.json", encoding="utf-8") as handle:
        assert read_info(save)["prompt_template"] == json.load(handle)["prompt_template"]
    other = run_distributed(build, 1, dict(BASE, data_path=[data_prefix], save=save, load=None, finetune=False))[0]
    assert "holds a checkpoint of another model" in other
    # Megatron-LM habits that would start from the wrong weights here: a trained run as --load
    # without --finetune (a run resumes from --save), and a converted checkpoint as --save.
    ignored_load = run_distributed(build, 1, dict(BASE, data_path=[data_prefix], load=save, finetune=False,
                                                  save=str(tmp_path / "next")))[0]
    converted_save = run_distributed(build, 1, dict(BASE, data_path=[data_prefix], save=BASE["load"]))[0]
    assert f"--load {save} is a training run's checkpoint (iteration 1)" in ignored_load and "--finetune" in ignored_load
    assert not os.path.exists(tmp_path / "next")
    assert f"--save {BASE['load']} holds a converted checkpoint (release)" in converted_save
    assert "symnoise_save.lock" not in os.listdir(BASE["load"])


def learning_rates(config):
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    history = Trainer(TrainingConfig.from_flags(**config), log=lambda message: None).run()
    parallel_state.destroy_model_parallel()
    return [record["lr"] for record in history]


def test_resuming_with_another_schedule_is_refused_unless_a_flag_says_which(data_prefix, tmp_path):
    # Megatron-LM's rule: a resumed run whose --train-iters (so its decay) differs from the
    # checkpoint's would otherwise continue the old schedule silently (here: at its minimum lr).
    first = dict(BASE, data_path=[data_prefix], save=str(tmp_path / "run"), train_iters=2, eval_interval=None)
    run_distributed(learning_rates, 1, first)
    longer = dict(first, train_iters=4)
    assert "--override-opt-param-scheduler" in run_distributed(build, 1, longer)[0]
    shutil.copytree(tmp_path / "run", tmp_path / "run_copy")
    overridden = run_distributed(learning_rates, 1, dict(longer, override_opt_param_scheduler=True))[0]
    kept = run_distributed(learning_rates, 1, dict(longer, save=str(tmp_path / "run_copy"),
                                                      use_checkpoint_opt_param_scheduler=True))[0]
    assert len(overridden) == len(kept) == 2  # iterations 3 and 4
    assert kept == [0.0, 0.0]  # the checkpoint's 2-step decay is over: its minimum
    assert overridden[0] > 0.0  # iteration 3 of the new 4-step decay


def test_a_resume_with_another_learning_rate_trains_at_the_one_the_flag_picks(data_prefix, tmp_path):
    # The optimizer's state carries each parameter group's max_lr: loaded as it was saved, it
    # silently kept the checkpoint's rate under --override-opt-param-scheduler (megatron-core
    # 0.16), or refused to load at all (0.19 matches groups by it).
    first = dict(BASE, data_path=[data_prefix], save=str(tmp_path / "run"), train_iters=2, eval_interval=None,
                 lr_decay_style="constant")
    assert run_distributed(learning_rates, 1, first)[0] == [2e-3, 2e-3]
    shutil.copytree(tmp_path / "run", tmp_path / "run_copy")
    lower = dict(first, train_iters=3, lr=5e-4)
    assert run_distributed(learning_rates, 1, dict(lower, override_opt_param_scheduler=True))[0] == [5e-4]
    kept = run_distributed(learning_rates, 1, dict(lower, save=str(tmp_path / "run_copy"),
                                                   use_checkpoint_opt_param_scheduler=True))[0]
    assert kept == [2e-3]


def nan_at_iteration_two(config):
    from symnoise_megatron.training.loop import Trainer

    original = Trainer._run_schedule

    def poisoned(self, microbatches, noise, forward_only):
        loss_sum, tokens = original(self, microbatches, noise, forward_only)
        return (float("nan") if self.iteration == 1 and not forward_only else loss_sum), tokens

    Trainer._run_schedule = poisoned
    try:
        return train_runs([config])[0]
    except RuntimeError as error:
        return str(error)
    finally:
        Trainer._run_schedule = original


def test_nonfinite_loss_stops_with_the_last_checkpoint_or_is_skipped(data_prefix, tmp_path):
    save = str(tmp_path / "run")
    stopped = run_distributed(nan_at_iteration_two, 1, dict(BASE, data_path=[data_prefix], save=save, save_interval=1))[0]
    assert stopped.startswith("loss is nan at iteration 2; last checkpoint: ") and stopped.split(": ")[1].endswith("iter_0000001 (--skip-nonfinite-loss skips such steps instead)")
    skipped = run_distributed(nan_at_iteration_two, 1, dict(BASE, data_path=[data_prefix], skip_nonfinite_loss=True))[0]
    assert len(skipped) == 4 and skipped[1] != skipped[1]  # NaN recorded, the run went on


def test_tensorboard_gets_the_logged_scalars(data_prefix, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_distributed(train_runs, 2, [dict(BASE, data_path=[data_prefix], tensorboard_dir=str(tmp_path / "tb"),
                                         tensor_model_parallel_size=2, eval_interval=2, eval_iters=1)])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "validation loss", "learning rate", "grad norm", "noise scale"} <= tags
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in events.Scalars("noise scale"))


def test_gpu_only_features_are_refused_on_cpu_at_start(data_prefix):
    message = run_distributed(build, 2, dict(BASE, data_path=[data_prefix], tensor_model_parallel_size=2, sequence_parallel=True))[0]
    assert "--sequence-parallel needs Transformer Engine on a GPU" in message
    message = run_distributed(build, 1, dict(BASE, data_path=[data_prefix], fp8_format="hybrid"))[0]
    assert "--fp8-format needs Transformer Engine" in message


@pytest.mark.parametrize("pipeline, per_virtual_stage", [(2, 3), (2, 4), (1, 1)])
def test_virtual_stages_that_do_not_split_the_layers_are_refused_naming_the_flag(data_prefix, pipeline, per_virtual_stage):
    # The tiny model has 4 layers: 2 stages x 3 or 4 layers, or interleaving without a pipeline, cannot hold them.
    message = run_distributed(build, 1, dict(BASE, data_path=[data_prefix], pipeline_model_parallel_size=pipeline,
                                             num_layers_per_virtual_pipeline_stage=per_virtual_stage))[0]
    assert message.startswith(f"--num-layers-per-virtual-pipeline-stage {per_virtual_stage}: the model's 4 layers"), message


def train_offline_wandb(config):
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return train_runs([config])[0]


def test_weights_and_biases_gets_the_same_scalars_offline(data_prefix, tmp_path):
    import glob

    pytest.importorskip("wandb")
    run_distributed(train_offline_wandb, 1, dict(BASE, data_path=[data_prefix], wandb_project="symnoise-test",
                                                 wandb_exp_name="t", wandb_save_dir=str(tmp_path)))
    [record] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    content = open(record, "rb").read()
    assert b"lm loss" in content and b"noise scale" in content and b"symnoise-test" in content


def validation_losses(configs):
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config in configs:
        trainer = Trainer(TrainingConfig.from_flags(**config), log=lambda message: None)
        out.append((len(trainer.datasets.train_indices), len(trainer.datasets.train), trainer.evaluate()))
        parallel_state.destroy_model_parallel()
    return out


def test_valid_data_path_is_the_held_out_set_and_all_of_data_path_trains(data_prefix, tmp_path):
    import json

    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    with open(BUNDLED_INSTRUCTIONS) as handle:
        rows = json.load(handle)
    (tmp_path / "held_out.json").write_text(json.dumps(rows[:24]))
    held_out = str(tmp_path / "held_out")
    preprocess(PreprocessConfig([str(tmp_path / "held_out.json")], held_out, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                seq_length=129, progress=False))
    common = dict(BASE, eval_iters=2)
    separate, held_out_only, split = run_distributed(validation_losses, 1, [
        dict(common, data_path=[data_prefix], valid_data_path=[held_out]),
        dict(common, data_path=[held_out], valid_data_path=[held_out]),
        dict(common, data_path=[data_prefix]),
    ])[0]
    assert separate[0] == separate[1] and split[0] < split[1]
    assert separate[2] == held_out_only[2]  # the validation loss depends on the held-out set only
    assert separate[2] != pytest.approx(split[2], rel=1e-4)

    preprocess(PreprocessConfig([str(tmp_path / "held_out.json")], held_out + "_vicuna", TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                prompt_template="vicuna_v1.1", seq_length=129, progress=False))
    with pytest.raises(RuntimeError, match="another tokenizer or template"):
        run_distributed(validation_losses, 1, [dict(common, data_path=[data_prefix], valid_data_path=[held_out + "_vicuna"])])


def built_layers(config):
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    trainer = Trainer(TrainingConfig.from_flags(**config), log=lambda message: None)
    return trainer.model_config.num_layers, len(trainer.chunks[0].module.decoder.layers), trainer.train_step()[0]


def test_num_layers_overrides_the_preset(data_prefix):
    config = dict(BASE, data_path=[data_prefix], load=None, finetune=False, model="tiny", num_layers=3)
    declared, built, loss = run_distributed(built_layers, 1, config)[0]
    assert declared == built == 3 and loss > 0


def builds(configs):
    """Build a Trainer for each config in this process group: 'built' (and its warnings) or the error."""
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config in configs:
        warnings = []
        try:
            Trainer(TrainingConfig.from_flags(**config), log=lambda m: warnings.append(m) if m.startswith("WARNING") else None).close()
            out.append(" ".join(["built"] + warnings))
        except (ValueError, FileNotFoundError) as error:
            out.append(str(error))
        parallel_state.destroy_model_parallel()
    return out


def hold_lock(save):
    """A process holding --save's lock, as a running job does; returns it once it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from symnoise_megatron.training.checkpointing import SaveLock\n"
                               f"lock = SaveLock({save!r})\nprint('locked', flush=True)\ntime.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def small_bpe_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["Below is an instruction that describes a task."] * 4,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def test_resume_checks_noise_checksums_tokenizers_and_the_lock(data_prefix, tmp_path):
    import re
    import socket

    from symnoise_megatron.checkpoint.paths import HF_ASSETS
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from symnoise_megatron.training.checkpointing import MANIFEST, SaveLock

    save = str(tmp_path / "run")
    common = dict(BASE, data_path=[data_prefix], save=save, train_iters=2, save_interval=1, eval_interval=None)
    run_distributed(train_runs, 1, [common])
    shard = sorted(f for f in os.listdir(os.path.join(save, "iter_0000002")) if f.endswith(".distcp"))[0]
    assert os.path.exists(os.path.join(save, "iter_0000002", MANIFEST))
    # Damaged copies: a byte flipped (same size) and a truncated shard.
    for name in ("flipped", "truncated"):
        shutil.copytree(save, tmp_path / name)
        path = tmp_path / name / "iter_0000002" / shard
        data = bytearray(path.read_bytes())
        if name == "flipped":
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(data if name == "flipped" else data[: len(data) // 2])
    (tmp_path / "unfinished" / "iter_0000001.partial").mkdir(parents=True)
    # A checkpoint whose hf_assets hold the data's tokenizer, and one holding another tokenizer.
    shutil.copytree(BASE["load"], tmp_path / "same_tokenizer")
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "same_tokenizer" / HF_ASSETS / "tokenizer.model")
    shutil.copytree(BASE["load"], tmp_path / "other_tokenizer")
    other = small_bpe_tokenizer(tmp_path / "other_tokenizer" / HF_ASSETS)
    fresh = dict(common, save=None, save_interval=None, train_iters=4)
    locked = str(tmp_path / "locked")
    holder = hold_lock(locked)
    try:
        messages = run_distributed(builds, 1, [
            dict(common, noise_kind="none", noise_alpha=10.0),
            dict(common, noise_seed=7, override_noise_config=True),
            dict(common, save=str(tmp_path / "flipped")),
            dict(common, save=str(tmp_path / "truncated")),
            dict(fresh, load=str(tmp_path / "unfinished")),
            dict(fresh, load=str(tmp_path / "same_tokenizer"), tokenizer_model=BUNDLED_TOKENIZER,
                 tokenizer_type="GPTSentencePieceTokenizer"),
            dict(fresh, load=str(tmp_path / "other_tokenizer")),
            dict(fresh, load=str(tmp_path / "other_tokenizer"), allow_tokenizer_mismatch=True),
            dict(fresh, tokenizer_model=other),
            dict(fresh, tokenizer_type="HuggingFaceTokenizer"),
            dict(common, save=locked),
        ])[0]
    finally:
        holder.kill()
        holder.wait()
    noise, overridden, flipped, truncated, unfinished, same, mismatch, allowed, given, kind, lock = messages
    assert noise == (f"--save {save}: this run's noise differs from the checkpoint's: --noise-kind none (checkpoint: symmetric), "
                     "--noise-alpha 10.0 (checkpoint: 5.0); pass --override-noise-config to train on with this run's settings")
    assert overridden.startswith("built WARNING: ") and "--noise-seed 7 (checkpoint: 1234)" in overridden
    for message, what in ((flipped, " is corrupted: its SHA-256 differs"), (truncated, r" has \d+ bytes, the save wrote \d+")):
        assert re.search(re.escape(f"iter_0000002/{shard}") + what, message), message
        assert "the previous good checkpoint is iteration 1" in message
    assert "holds only an unfinished save (iter_0000001.partial)" in unfinished
    assert same == "built"
    assert mismatch.startswith(f"--data-path {data_prefix} was tokenized with {BUNDLED_TOKENIZER}, which is not the tokenizer "
                               f"of the checkpoint {tmp_path / 'other_tokenizer'}")
    assert "vocab_size: 1024 != 291" in mismatch and "--allow-tokenizer-mismatch" in mismatch
    assert allowed.startswith("built WARNING: ") and "vocab_size: 1024 != 291" in allowed
    assert given.startswith(f"--tokenizer-model {other} is not the tokenizer --data-path {data_prefix} was preprocessed with")
    assert kind.startswith("built WARNING: --tokenizer-type HuggingFaceTokenizer names a huggingface tokenizer"), kind
    assert lock.startswith(f"--save {locked} is in use by another run") and f"'pid': {holder.pid}" in lock
    assert f"'host': '{socket.gethostname()}'" in lock
    # The holder is dead: its lock file is taken over, with a warning naming it.
    taken = []
    SaveLock(locked, log=taken.append).release()
    assert len(taken) == 1 and f"pid {holder.pid} on {socket.gethostname()}, no longer running" in taken[0]


def save_with_a_slow_writer(config, record):
    """Train with megatron-core's checkpoint writers stalled: each records its pid and the saving
    rank's, then waits, long enough for the test to SIGKILL the saving rank. megatron-core 0.16
    writes from forked processes; 0.19 from threads of the rank itself (the same pid)."""
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data
    saver = os.getpid()

    def stalled(*args, **kwargs):
        with open(record, "a") as handle:
            handle.write(f"{os.getpid()} {saver}\n")
        time.sleep(120)
        return original(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(stalled)
    return train_runs([config])


def test_checkpoint_writers_die_with_a_killed_saver(data_prefix, tmp_path):
    import signal
    import threading
    import time

    import psutil

    record = tmp_path / "writers"
    config = dict(BASE, data_path=[data_prefix], save=str(tmp_path / "run"), train_iters=1, eval_interval=None)
    failures = []
    runner = threading.Thread(target=lambda: failures.append(pytest.raises(RuntimeError, run_distributed,
                                                                           save_with_a_slow_writer, 1, config, str(record))))
    runner.start()
    deadline = time.time() + 240
    while not (record.exists() and record.read_text().endswith("\n")) and time.time() < deadline:
        time.sleep(0.2)
    writer, saver = map(int, record.read_text().split("\n")[0].split())
    # The forked writers (their results queue stays in the rank: checkpoint.paths.save_atomically);
    # none where the rank writes from its own threads.
    helpers = [child.pid for child in psutil.Process(saver).children(recursive=True)]
    assert writer in helpers or writer == saver
    os.kill(saver, signal.SIGKILL)
    runner.join(60)

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 10
    while any(map(alive, helpers)) and time.time() < deadline:
        time.sleep(0.2)
    left = [" ".join(psutil.Process(pid).cmdline())[:80] for pid in helpers if alive(pid)]
    assert not left, f"checkpoint writers outlived the rank that started them: {left}"
    assert failures and "died" in str(failures[0].value)


def test_workers_save_and_stop_when_torchrun_is_killed(data_prefix, tmp_path):
    # torchrun starts each worker in its own session: a kill -9 of torchrun alone reaches none.
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from symnoise_megatron.checkpoint.paths import read_tracker

    save = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "symnoise_megatron.finetune", "--data-path", data_prefix, "--load", BASE["load"], "--finetune",
               "--save", save, "--train-iters", "100000", "--global-batch-size", "4", "--micro-batch-size", "2",
               "--seq-length", "64", "--log-interval", "1", "--lr-warmup-fraction", "0"]
    out, err = tmp_path / "stdout", tmp_path / "stderr"  # files: a full pipe would stall the run
    with open(out, "w") as stdout, open(err, "w") as stderr:
        agent = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    workers = []
    try:
        deadline = time.time() + 600
        while " iteration        1/" not in out.read_text():
            assert agent.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.5)
        workers = [child for child in psutil.Process(agent.pid).children(recursive=True) if "finetune" in " ".join(child.cmdline())]
        assert workers
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=120)
        assert not alive, "workers trained on after torchrun was killed"
    finally:
        agent.kill()
        for worker in workers:
            if worker.is_running():
                worker.kill()
    assert read_tracker(save) >= 1  # they saved before stopping
    assert "the torchrun agent (pid" in err.read_text()
