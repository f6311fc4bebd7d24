"""Run a function on N local gloo ranks in spawned processes, with a deadline (a hang fails, never blocks).

Used by the tests and CPU benchmarks: ``run_local_ranks(fn, 2, timeout_s=60, args=(...))`` calls
``fn(rank, world_size, *args)`` in each rank after ``init_process_group("gloo")`` on 127.0.0.1 and returns the
per-rank return values (anything ``torch.save`` can store). ``fn`` must be importable (module level).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """A rank raised, died or missed the deadline."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, args: tuple):
    from ditmoe.parallel.distributed import import_before_joining, leave_distributed

    import_before_joining()
    torch.set_num_threads(1)  # ranks share the cores
    out = Path(out_dir)
    # What a launcher (torchrun, deepspeed) would export, for code that reads the environment.
    env = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args)
        if dist.is_initialized():  # fn may have left the world itself
            dist.barrier()
        torch.save(result, out / f"rank{rank}.pt")
        leave_distributed()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_local_ranks(fn: Callable, world_size: int, timeout_s: float = 60.0, args: tuple = ()) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; their results in rank order.

    Raises ``RankFailure`` with the traceback of the rank that failed first if any fails, or naming the ranks still
    running when ``timeout_s`` passes (they are killed).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ditmoe_ranks_") as out_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, port, out_dir, timeout_s, args),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        out = Path(out_dir)
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(out.glob("rank*.err")):  # peers of a failed rank would wait in a collective: stop them
                time.sleep(0.5)
                break
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        # the rank that failed first holds the cause; its peers' errors (a collective cut short) came after
        errors = sorted(out.glob("rank*.err"), key=lambda f: (f.stat().st_mtime_ns, f.name))
        # a rank killed by a signal (the OOM killer, a segfault) leaves no traceback, only its exit code
        silent = [
            r for r, p in enumerate(procs) if r not in hung and p.exitcode and not (out / f"rank{r}.err").exists()
        ]
        died = "; ".join(f"rank{r} died with exit code {procs[r].exitcode}, no traceback" for r in silent)
        if errors:
            then = f" (then {', '.join(f.stem for f in errors[1:])} failed too)" if errors[1:] else ""
            first = f"{died}; of the ranks with a traceback, {errors[0].stem}" if died else errors[0].stem
            raise RankFailure(f"{first} failed first{then}:\n{errors[0].read_text()}")
        if hung:
            raise RankFailure(f"ranks {hung} of {world_size} still running after {timeout_s:.0f} s (hang?)")
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RankFailure(f"ranks {failed} exited with codes {[procs[r].exitcode for r in failed]}")
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
