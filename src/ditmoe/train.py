"""``python -m ditmoe.train [train flags]``: the training entry for launchers.

    deepspeed --num_gpus 8 --module ditmoe.train --preset imagenet256-XL-8E2A --ep-size 8 --out runs/xl
    torchrun --nproc-per-node 8 -m ditmoe.train ...
    srun python -m ditmoe.train ...            (see slurm/)
Same flags as ``ditmoe train``. Exit codes: 0 done, 2 bad configuration, 1 aborted, 75 saved on a stop signal
(requeue me).
"""

from __future__ import annotations

import sys

from ditmoe.cli import main


def run(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:  # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
        if skip:
            skip = False
        elif a == "--local_rank":
            skip = True
        elif not a.startswith("--local_rank="):
            kept.append(a)
    return main(["train", *kept])


if __name__ == "__main__":
    sys.exit(run())
