"""Run a function on N real processes with the gloo backend and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
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
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.get_context("spawn")
        port = _free_port()
        procs = [
            context.Process(target=_worker, args=(rank, world_size, port, out_dir, fn, args))
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
