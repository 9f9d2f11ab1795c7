"""Run a function on N real processes with the gloo backend and collect what each returns.

The ranks are fresh processes for every call, forked from a forkserver that imported torch and
megatron-core once per test session: each spawn no longer pays those imports (seconds of CPU a
rank), while every call still starts from a clean interpreter state that no earlier test touched.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

# What the ranks import anyway. The forkserver imports these once, before any rank exists and
# before anything initialises (no process group, no model state); a name that fails to import
# (a module that moved) is skipped by the forkserver, and the rank imports it itself.
PRELOAD = [
    "torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
    "megatron.core.tensor_parallel", "megatron.core.models.gpt", "megatron.core.dist_checkpointing",
    "transformers", "symnoise_megatron.runtime.cpu", "symnoise_megatron.training.loop",
]

# The environment the session started with (this module is imported at collection, before any
# fixture sets a variable): the forkserver imports under it, whichever test starts it.
_SESSION_ENVIRON = dict(os.environ)


# Whether the running test may start ranks: tests/conftest.py allows it for tests marked
# ``distributed`` only, so that ``pytest -m "not distributed"`` starts no process group.
spawning_allowed = True
_forkserver_started = False


def _context():
    global _forkserver_started
    context = mp.get_context("forkserver")
    if not _forkserver_started:
        context.set_forkserver_preload(PRELOAD)
        current = dict(os.environ)
        os.environ.clear()
        os.environ.update(_SESSION_ENVIRON)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(current)
        _forkserver_started = True
    return context


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, environ, cwd, fn, args):
    # The forkserver's environment and directory are those of the session's first call: take the
    # caller's, as a spawned process would (tests set variables such as TRITON_INTERPRET).
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        import torch.distributed as dist

        from symnoise_megatron.runtime.cpu import cpu_runtime

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            # Every rank holds its connections before any may return and close them: a rank
            # leaving at once would otherwise break a peer's connectFullMesh.
            dist.barrier()
            with cpu_runtime():
                result = fn(*args)
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        torch.save({"result": result}, result_path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, result_path)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    """``fn(*args)`` on each of ``world_size`` ranks (inside the CPU runtime); a list of results.

    ``fn`` must be importable (module level). A failure on any rank raises with its traceback.
    """
    if not spawning_allowed:
        raise RuntimeError(f"{fn.__name__} starts ranks in a test not marked distributed: add "
                           "pytest.mark.distributed to the test, its class or its module")
    with tempfile.TemporaryDirectory() as out_dir:
        context = _context()
        port = _free_port()
        procs = [
            context.Process(target=_worker, args=(rank, world_size, port, out_dir, dict(os.environ), os.getcwd(),
                                                  fn, args))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
            if proc.is_alive():
                for other in procs:
                    other.kill()
                raise TimeoutError(f"distributed test {fn.__name__} timed out after {timeout}s")
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {fn.__name__} died (exit code {procs[rank].exitcode})")
            payload = torch.load(path, weights_only=False)
            if "error" in payload:
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
