"""The cluster batch jobs, submitted with sbatch to a real two-node SLURM on this machine.

Every job is examples/slurm_finetune.sbatch (or the ablation's pair of scripts) as a user
submits it, with the CPU preset: a tiny LLaMA, the bundled data, gloo, one process per node,
TP 1 x PP 2 (one pipeline stage per node). Losses are compared as the log prints them.
"""

import os
import re
import subprocess

import pytest

from tests.slurm.conftest import REPO

pytestmark = pytest.mark.slurm

ITERS = 16
SCRIPT = "examples/slurm_finetune.sbatch"
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: (\S+) \|")


def logged_losses(text):
    """[(iteration, loss as printed)] in log order (a resumed run repeats none, a crashed one may)."""
    return [(int(m.group(1)), m.group(2)) for m in ITERATION.finditer(text)]


def read(path):
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def last_iteration(path):
    return max((i for i, _ in logged_losses(read(path))), default=0) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def reference(job_env, tmp_path_factory):
    """The same fine-tune launched by plain torchrun on one node (2 processes, PP 2)."""
    out = tmp_path_factory.mktemp("plain")
    env = dict(job_env, NNODES="1", NPROC_PER_NODE="2", OUT=str(out / "run"), ITERS=str(ITERS), SAVE_INTERVAL="1000")
    result = subprocess.run(["bash", "examples/finetune.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = logged_losses(result.stdout)
    assert [i for i, _ in losses] == list(range(1, ITERS + 1)), result.stdout[-3000:]
    return dict(losses)


def submit(slurm, env, tmp_path, name, *sbatch_args, **variables):
    out = tmp_path / name
    job_env = dict(env, OUT=str(out), ITERS=str(ITERS), **{k: str(v) for k, v in variables.items()})
    job_id = slurm.sbatch("--nodes=2", f"--output={tmp_path}/{name}.job%j.out", *sbatch_args, SCRIPT,
                          env=job_env, cwd=REPO)
    return job_id, out


def assert_losses_match(log_path, reference):
    """Every iteration of every attempt printed the loss of the uninterrupted run, and all ran."""
    losses = logged_losses(read(log_path))
    mismatched = [(i, loss, reference.get(i)) for i, loss in losses if reference.get(i) != loss]
    assert not mismatched, mismatched
    assert {i for i, _ in losses} == set(reference)


def latest_checkpoint(out):
    with open(out / "latest_checkpointed_iteration.txt") as handle:
        return int(handle.read())


def assert_complete(out, iteration):
    """The tracker names it and it was renamed from .partial after every rank wrote its part
    (the resume that follows proves it loads)."""
    assert latest_checkpoint(out) == iteration
    assert {".metadata", "metadata.json", "common.pt"} <= {p.name for p in (out / f"iter_{iteration:07d}").iterdir()}


def test_two_nodes_one_stage_each_train_the_losses_of_plain_torchrun(slurm, job_env, reference, tmp_path):
    job_id, out = submit(slurm, job_env, tmp_path, "two_nodes", SAVE_INTERVAL=1000)
    job = slurm.wait_finished(job_id, timeout=240)
    assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), read(out / "train.log")
    assert logged_losses(read(out / "train.log")) == sorted(reference.items())
    # The rendezvous used the address SLURM has for the first node, not its (unresolvable) name.
    assert "rendezvous 127.0.0.1:" in read(next(tmp_path.glob("two_nodes.job*.out")))


def test_time_limit_saves_requeues_and_the_requeued_job_finishes_the_same_run(slurm, job_env, reference, tmp_path):
    # SLURM looks at time limits every 30 s and sends --signal's warning at the first look
    # within lead + 30 s of the limit. The job starts with room to spare; once it trains, its
    # limit drops to the next minute but one, so the next look sends USR1 (lead 120 s) while
    # the paced training has about 80 s to go, and the limit itself is at least a minute away.
    job_id, out = submit(slurm, job_env, tmp_path, "time_limit", "--time=10", "--signal=B:USR1@120",
                         FINETUNE_MODULE="tests.slurm.paced_finetune", PACE_SECONDS=6, SAVE_INTERVAL=2)
    log_path = out / "train.log"
    slurm.wait_until(lambda: os.path.exists(log_path) and "saved checkpoint at iteration 2 " in read(log_path),
                     240, "the first checkpoint")
    hours, minutes, seconds = (int(x) for x in slurm.job(job_id)["RunTime"].split(":"))
    slurm.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={hours * 60 + minutes + 2}"])
    slurm.wait_until(lambda: slurm.job(job_id).get("Restarts") == "1", 120, "the job requeueing itself")
    # The requeued job keeps the lowered limit (it would be warned at once again): give it back.
    slurm.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"])
    job = slurm.wait_finished(job_id, timeout=240)
    log = read(log_path)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    # The time-limit warning reached the training through the stop file, not a signal to torchrun.
    stopped = int(re.search(rf"exiting at iteration (\d+) \(stop file {out}/symnoise.stop\)", log).group(1))
    assert 2 <= stopped < ITERS and not (out / "symnoise.stop").exists()
    assert f"saved checkpoint at iteration {stopped} " in log
    assert re.search(rf"resumed from \S+iter_{stopped:07d} at iteration {stopped}\n", log), log[-3000:]
    assert [i for i, _ in logged_losses(log)] == list(range(1, ITERS + 1))  # nothing redone, nothing skipped
    assert_losses_match(log_path, reference)
    batch = read(next(tmp_path.glob("time_limit.job*.out")))
    assert "time limit near" in batch and "requeueing" in batch


def test_scancel_and_a_failed_node_end_the_job_keep_the_checkpoint_and_a_resubmission_resumes(
        slurm, job_env, reference, tmp_path):
    paced = dict(FINETUNE_MODULE="tests.slurm.paced_finetune", PACE_SECONDS=1.5, SAVE_INTERVAL=2)
    # 1. scancel --signal=TERM: the training saves where it is and the job ends (not requeued).
    job_id, out = submit(slurm, job_env, tmp_path, "stopped", **paced)
    log_path = out / "train.log"
    slurm.wait_until(lambda: "saved checkpoint at iteration 2 " in read(log_path) if log_path.exists() else False,
                     240, "the first checkpoint")
    slurm.run(["scancel", "--signal=TERM", str(job_id)])
    job = slurm.wait_finished(job_id, timeout=60)
    assert job["Restarts"] == "0"
    stopped = int(re.search(r"exiting at iteration (\d+) \(SIGTERM\)", read(log_path)).group(1))
    assert_complete(out, stopped)

    # 2. Resubmitted, the same command resumes there; then node n2 fails mid-run.
    job_id, _ = submit(slurm, job_env, tmp_path, "stopped", **paced)
    resumed = f"resumed from {out}/iter_{stopped:07d} at iteration {stopped}\n"
    slurm.wait_until(lambda: resumed in read(log_path) and last_iteration(log_path) >= stopped + 3, 240,
                     "the resubmitted job training past another checkpoint")
    slurm.run(["scontrol", "update", "nodename=n2", "state=down", "reason=test"])
    try:
        # The job loses both nodes' processes (no hang) and, with --requeue, waits to run again.
        slurm.wait_until(lambda: slurm.job(job_id).get("Restarts") == "1" and not slurm.job_processes(), 60,
                         "the job's processes ending after the node failure")
        last_good = latest_checkpoint(out)
        assert stopped < last_good < ITERS
        assert_complete(out, last_good)
    finally:
        slurm.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
    job = slurm.wait_finished(job_id, timeout=240)
    log = read(log_path)
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert f"resumed from {out}/iter_{last_good:07d} at iteration {last_good}\n" in log
    assert_losses_match(log_path, reference)


def test_ablation_as_a_job_array_then_compare_runs_once_all_succeeded(slurm, job_env, tmp_path):
    runs = tmp_path / "ablation"
    env = dict(job_env, ABLATION="none:0 symmetric:5", SEEDS="1 2", RUNS=str(runs), ITERS="2", SAVE_INTERVAL="1000")
    result = subprocess.run(["bash", "examples/slurm_ablation.sh"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    array_id, compare_id = (int(x) for x in re.findall(r"job (\d+)", result.stdout))
    compare = slurm.wait_finished(compare_id, timeout=300)
    assert compare["JobState"] == "COMPLETED", read(runs / f"slurm-{compare_id}.out")
    tasks = [slurm.job(f"{array_id}_{task}") for task in range(4)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 4
    assert compare["StartTime"] >= max(t["EndTime"] for t in tasks)
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        "none.seed1", "none.seed2", "results", "symmetric5.seed1", "symmetric5.seed2"]
    # Each task ran its own setting and seed: the seeds change the losses, the settings too.
    first = {name: logged_losses(read(runs / name / "train.log"))[0][1]
             for name in ("none.seed1", "none.seed2", "symmetric5.seed1", "symmetric5.seed2")}
    assert len(set(first.values())) == 4, first
    table = read(runs / "results" / "table.md")
    assert "none" in table and "symmetric5" in table
