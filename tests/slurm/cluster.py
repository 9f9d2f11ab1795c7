"""A real SLURM cluster of two nodes on this machine, for tests: munged, slurmctld, two slurmd.

Debian's slurm-wlm is built with MULTIPLE_SLURMD, so ``slurmd -N n1`` and ``slurmd -N n2``
on one host are two nodes (NodeAddr 127.0.0.1, a port each; spool, PID and log files per
node through ``%n``). Everything lives in one directory: the munge key and socket, the
configuration, the controller's state, the logs. The daemons run in the foreground as our
children, so they are stopped by PID; they also get SIGTERM if the test process dies first.
Each node advertises 8 GPUs backed by /dev/null-like device files, so the batch scripts'
``--gpus-per-node=8`` is allocated unchanged (the CPU runs ignore them).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODES = ("n1", "n2")
GPUS_PER_NODE = 8
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def why_not_available() -> Optional[str]:
    """The reason this machine cannot run the cluster, or None."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None and not os.path.exists(f"/usr/sbin/{name}")]
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the emulated SLURM cluster runs its daemons as root (SlurmUser=root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent():
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): a daemon must not outlive a killed test run.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class SlurmCluster:
    def __init__(self, root: str, kill_wait: int = 5):
        self.root = os.path.abspath(root)
        self.kill_wait = kill_wait
        self.conf = os.path.join(self.root, "slurm.conf")
        self.procs: Dict[str, subprocess.Popen] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            self._write_files()
            munge = os.path.join(self.root, "munge")
            self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--key-file={munge}/munge.key",
                                   f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                                   f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
            self._wait_for(lambda: os.path.exists(f"{munge}/munge.socket"), timeout, "munged's socket")
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i"])
            self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
                           timeout, "slurmctld to answer")
            for node in NODES:
                self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node])
            self._wait_for(lambda: self.node_states() == {node: "idle" for node in NODES}, timeout, "both nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Cancel every job, end the job processes this cluster started, then the daemons."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--quiet", "--user=root"], check=False)
            deadline = time.time() + 3 * self.kill_wait + 10
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for pid in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def job_processes(self) -> List[int]:
        """PIDs of the processes this cluster's daemons started (slurmstepd, job scripts, tasks):
        they carry its SLURM_CONF in their environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        ours = {os.getpid()} | {proc.pid for proc in self.procs.values()}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours:
                continue
            try:
                with open(f"/proc/{entry}/comm") as handle:
                    if handle.read().strip() == "slurmscriptd":  # slurmctld's own helper
                        continue
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if marker in handle.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    # --- client side -------------------------------------------------------------------------
    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=self.conf)

    def run(self, argv, check=True, env=None, timeout=60) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env=None, cwd=None) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args], env=env or self.env, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        result = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if result.returncode:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout.splitlines()[0]))

    def wait_until(self, predicate, timeout: float, what: str, period: float = 1.0):
        """Poll ``predicate`` until it returns something true (returned) or fail naming ``what``."""
        deadline = time.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"{what} did not happen within {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(period)

    def wait_finished(self, job_id, timeout: float) -> Dict[str, str]:
        return self.wait_until(lambda: (lambda j: j if j.get("JobState") in FINISHED else None)(self.job(job_id)),
                               timeout, f"job {job_id} finishing")

    def node_states(self) -> Dict[str, str]:
        result = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def diagnostics(self) -> str:
        parts = [self.run(["squeue", "-a"], check=False).stdout, self.run(["sinfo", "-N"], check=False).stdout]
        for pid in self.job_processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
                parts.append(f"job process {pid}: {command[:200]}")
            except OSError:
                pass
        for log in ("slurmctld.log", "slurmd.n1.log", "slurmd.n2.log"):
            path = os.path.join(self.root, log)
            if os.path.exists(path):
                with open(path) as handle:
                    parts.append(f"--- {log} (last lines)\n" + "".join(handle.readlines()[-15:]))
        return "\n".join(parts)

    # --- internals ---------------------------------------------------------------------------
    def _spawn(self, name, argv):
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()

    def _wait_for(self, predicate, timeout, what):
        deadline = time.time() + timeout
        while not predicate():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"SLURM test cluster: waiting for {what}: "
                                   f"{'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{self.diagnostics()}")
            time.sleep(0.2)

    def _write_files(self):
        root = self.root
        munge = os.path.join(root, "munge")
        os.makedirs(munge, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(munge, 0o711)  # munged refuses a key or socket directory others can write to
        key = os.path.join(munge, "munge.key")
        with open(key, "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(key, 0o600)
        for sub in ("state", "spool", "dev"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        for index in range(GPUS_PER_NODE):
            device = os.path.join(root, "dev", f"gpu{index}")
            if not os.path.exists(device):
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs=2 RealMemory=4000 "
            f"Gres=gpu:{GPUS_PER_NODE}" for node, port in zip(NODES, node_ports))
        with open(self.conf, "w") as handle:
            handle.write(f"""\
ClusterName=symnoise-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's start (default 120 s)
AuthInfo=socket={munge}/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=1
KillWait={self.kill_wait}
OverTimeLimit=0
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
GresTypes=gpu
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        with open(os.path.join(root, "gres.conf"), "w") as handle:
            handle.write(f"AutoDetect=off\nName=gpu File={root}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n")
