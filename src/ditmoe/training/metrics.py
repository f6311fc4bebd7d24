"""Training telemetry: routing statistics accumulated over a log interval, written to console, jsonl and wandb."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from ditmoe.analysis.heatmap import utilisation_heatmap
from ditmoe.analysis.routing import RoutingAccumulator


class MetricsLogger:
    """One call per log interval: a console line, a JSON line in ``metrics.jsonl``, and wandb when enabled."""

    def __init__(
        self,
        out_dir: Path,
        *,
        use_wandb: bool,
        project: str,
        run_name: str,
        config: dict,
        resume_id=None,
        enabled: bool = True,
        start_step: int = 0,
    ):
        """``enabled=False`` (ranks other than 0): ``log`` does nothing. ``start_step``: the step training goes on
        from; records of later steps in ``metrics.jsonl`` (logged before a crash, to be logged again) are dropped."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.wandb_run = None
        self.jsonl = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        # steps logged after the checkpoint, before a crash: logged again to the file, not to wandb (its run already
        # holds them, and a step below its last one would break the run's monotonic steps)
        self._wandb_after = _drop_records_after(path, start_step)
        self.jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
        if use_wandb:
            import wandb

            offline = not os.environ.get("WANDB_MODE") and not wandb_credentials()
            if offline:
                tqdm.write(
                    f"wandb: no API key (WANDB_API_KEY, or `wandb login`): logging offline under {self.out_dir}/wandb; "
                    "`wandb sync` uploads it later"
                )
            self.wandb_run = wandb.init(
                project=project,
                name=run_name,
                config=config,
                dir=str(self.out_dir),
                id=resume_id,
                resume="allow",
                mode="offline" if offline else None,
            )

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, step: int, scalars: dict, routing: RoutingAccumulator | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        if routing is not None:
            record.update(routing.summary())
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        brief = "  ".join(f"{k}={_fmt(v)}" for k, v in record.items() if "/layer" not in k)
        tqdm.write(brief)
        if self.wandb_run is not None and step > self._wandb_after:
            payload = dict(record)
            if routing is not None and routing.steps:
                import wandb

                png = utilisation_heatmap(routing.load_fractions(), self.out_dir / "utilisation_latest.png")
                payload["moe/utilisation_heatmap"] = wandb.Image(str(png))
            self.wandb_run.log(payload, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_credentials() -> bool:
    """Whether wandb will find an API key: in the environment, or for its host in the netrc file that
    ``wandb login`` writes (``NETRC`` or ~/.netrc). Without one, an online run would stop to ask for it."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _drop_records_after(path: Path, step: int) -> int:
    """Rewrite ``path`` (a temporary file, then a rename) without the records of steps after ``step``, nor a line
    cut short by a crash; return the last step it held (0 if none)."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    steps = [_record_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps, strict=True) if s <= step]
    if len(keep) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return max((int(s) for s in steps if s != float("inf")), default=0)


def _record_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; infinity for one that is not a whole record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
