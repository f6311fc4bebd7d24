"""Stop requests: SIGUSR1 / SIGTERM only set a flag; the ranks agree at a step boundary, save, and exit to requeue.

Saving inside a signal handler can deadlock a collective (Lightning#21406), so the handler does nothing else.
SLURM: ``#SBATCH --signal=B:USR1@120`` asks for a checkpoint two minutes before the time limit; the job script
(slurm/train_16b.sh) requeues when the trainer exits with ``EXIT_REQUEUE`` or leaves ``REQUEUE_MARKER``.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75  # sysexits EX_TEMPFAIL: "saved; run me again"
# Written into the run directory beside the exit code: a launcher that kills the other tasks when one exits non-zero
# (srun --kill-on-bad-exit) reports their SIGTERM, not 75, so job scripts look for this file too.
REQUEUE_MARKER = "REQUEUE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Installs flag-only handlers for ``STOP_SIGNALS``; ``agreed()`` is true on every rank once any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective when distributed: every rank must call it at the same step. A single process decides on the
        host alone, so the step that follows is not held up waiting for the GPU."""
        if not dist.is_initialized():
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: stop requests are the main process's to handle; workers carry on."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
