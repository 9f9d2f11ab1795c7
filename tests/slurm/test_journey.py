"""The journey's job scripts (examples/cluster/) chained by examples/cluster/journey.sh on the
two-node cluster: a tiny Hugging Face LLaMA and the bundled instructions in, AlpacaEval-style
answers out, through preprocess, convert (torchrun), fine-tune (2 nodes), export and generate,
each job starting after the one before it succeeded.

One journey also carries what a real cluster would break on: whole nodes (--exclusive), a
pyxis container (the emulated cluster has no pyxis: srun is a wrapper that records its
arguments and drops the --container-* flags), and MASTER_ADDR, MASTER_PORT and NODE_RANK left
exported in the submitting shell, which must not reach the rendezvous. (The evaluate step
needs symnoise-evaluate, another change's command, and a judge: not run here.)
"""

import json
import re
import subprocess

import pytest

from tests.slurm.conftest import REPO

pytestmark = pytest.mark.slurm

STEPS = ["preprocess", "convert", "finetune", "export", "generate"]
RECORDING_SRUN = """#!/usr/bin/env bash
# srun as pyxis would receive it: the arguments recorded, the --container-* flags then dropped.
echo "$*" >> "$SRUN_RECORD"
kept=()
for argument in "$@"; do
  case "$argument" in --container-*) ;; *) kept+=("$argument") ;; esac
done
exec srun "${kept[@]}"
"""


def read(path):
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def test_the_journey_runs_as_chained_jobs_from_a_hugging_face_model_to_answers(slurm, submit_env, tmp_path):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS
    from tools.make_tiny_llama import main as make_tiny_llama

    hf_model = tmp_path / "tiny-llama-hf"  # the stand-in for LLaMA-2-70B: config, safetensors, tokenizer
    make_tiny_llama(["--save-dir", str(hf_model), "--hidden-size", "64", "--num-layers", "2"])
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps([{"instruction": "Name a color.", "dataset": "test"},
                                   {"instruction": "Give me a word.", "dataset": "test"}]))
    srun = tmp_path / "srun"
    srun.write_text(RECORDING_SRUN)
    srun.chmod(0o755)
    work = tmp_path / "journey"
    env = dict(submit_env, STEPS=" ".join(STEPS), WORK=str(work), HF_MODEL=str(hf_model), RAW_DATA=BUNDLED_INSTRUCTIONS,
               PROMPTS=str(prompts), PRESET="cpu", NODES="2", ITERS="2", SAVE_INTERVAL="1000", CONVERT_NPROC="2", EXPORT_NPROC="2",
               GENERATE_ENGINE="transformers", GENERATE_ARGS="--max-new-tokens 8",
               # whole nodes, in a container
               EXCLUSIVE="1", CONTAINER_IMAGE="registry#symnoise/test:1", CONTAINER_MOUNTS="/lustre:/lustre",
               SRUN=str(srun), SRUN_RECORD=str(tmp_path / "srun.record"),
               # left over from some other launch in the submitting shell
               MASTER_ADDR="192.0.2.1", MASTER_PORT="40000", NODE_RANK="1")
    for name in ("CPUS_PER_NODE", "MEM_PER_NODE"):
        env.pop(name)
    result = subprocess.run(["bash", "examples/cluster/journey.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = dict(re.findall(r"^(\w+): job (\d+)$", result.stdout, re.M))
    assert list(jobs) == STEPS

    last = slurm.wait_finished(jobs["generate"], timeout=600)
    records = {step: slurm.job(job_id) for step, job_id in jobs.items()}
    logs = {step: read(work / "logs" / f"symnoise-{step}.{job_id}.out") for step, job_id in jobs.items()}
    assert last["JobState"] == "COMPLETED", {step: (r.get("JobState"), logs[step][-2000:]) for step, r in records.items()}
    for before, after in zip(STEPS, STEPS[1:]):  # each waited for the one before to succeed
        assert records[after]["StartTime"] >= records[before]["EndTime"]

    answers = json.loads((work / "alpaca_eval_outputs.json").read_text())
    assert [a["instruction"] for a in answers] == ["Name a color.", "Give me a word."]
    assert all(isinstance(a["output"], str) and a["generator"] for a in answers)

    # The fine-tune had both nodes whole (every CPU), trained, and its rendezvous was SLURM's.
    finetune = records["finetune"]
    assert (finetune["NodeList"], finetune["NumCPUs"]) == ("n[1-2]", "4")
    assert re.findall(r"iteration\s+(\d+)/\s*2 \|", read(work / "finetune" / "train.log")) == ["1", "2"]
    rendezvous = re.search(r"rendezvous 127\.0\.0\.1:(\d+)", logs["finetune"])
    assert rendezvous and 20000 <= int(rendezvous.group(1)) < 32768  # below Linux's ephemeral range
    for stale in ("MASTER_ADDR=192.0.2.1", "MASTER_PORT=40000", "NODE_RANK=1"):
        assert f"ignoring {stale} from the environment" in logs["finetune"]

    # Every step ran its work through srun with the node's CPUs and the settings' container.
    calls = read(tmp_path / "srun.record").splitlines()
    assert len(calls) == len(STEPS), calls
    for call in calls:
        assert "--cpus-per-task=2 " in call and "--container-image=registry#symnoise/test:1 " in call
        assert f"--container-workdir={REPO} " in call and "--container-mounts=/lustre:/lustre " in call
