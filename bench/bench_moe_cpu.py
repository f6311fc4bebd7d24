"""MoE layer forward+backward on CPU: our reference dispatch vs the official algorithm (naive loop).

Shapes of DiT-MoE-S/2-8E2A at 256px: 8 images x 256 tokens = 2048 tokens, D=384, 8 SwiGLU experts (F=1536), top-2,
plus the shared expert (F=768). Each variant runs in its own subprocess so its peak memory (VmHWM, reset through
/proc/self/clear_refs) is its own.

FLOPs per forward: routed 2 * (T*K) * 3 * D * F = 2 * 4096 * 3 * 384 * 1536 = 14.5 GFLOP, shared 2 * T * 3 * D * 768 =
3.6 GFLOP; backward ~2x forward -> ~54 GFLOP per fwd+bwd.

    python bench/bench_moe_cpu.py [--iters 5] [--tokens 2048] [--out DIR]   # writes DIR/cpu-moe-<YYYY-MM-DD>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from arguments import require_at_least  # bench/, the script's folder

D, E, K = 384, 8, 2


def naive_official(layer, x_TD):
    """The official training algorithm: repeat every token K times, run each expert on a boolean mask."""
    probs = layer.router(x_TD).float().softmax(-1)
    w_TK, idx_TK = torch.topk(probs, K, dim=-1)
    x_rep = x_TD.repeat_interleave(K, dim=0)
    y_rep = torch.empty_like(x_rep)
    flat = idx_TK.reshape(-1)
    ex = layer.experts
    for e in range(E):
        mask = flat == e
        xe = x_rep[mask]
        gate, up = ex.gate_up_proj[e].chunk(2)
        y_rep[mask] = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), ex.down_proj[e])
    out = (y_rep.view(-1, K, D) * w_TK.unsqueeze(-1).to(y_rep.dtype)).sum(1)
    return out + layer.shared_expert(x_TD)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(variant: str, tokens: int, iters: int) -> dict:
    from ditmoe.config import MoEConfig
    from ditmoe.models.moe import MoEFeedForward

    torch.manual_seed(0)
    layer = MoEFeedForward(D, MoEConfig(num_experts=E, top_k=K, backend="torch"))
    x = torch.randn(1, tokens, D, requires_grad=True)
    fn = (lambda: layer(x).out_BLD) if variant == "ours" else (lambda: naive_official(layer, x[0]))
    fn().sum().backward()  # warm-up
    layer.zero_grad(set_to_none=True)
    x.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    peak = _rss_kib("VmHWM") - base
    best = sorted(times)[len(times) // 2]
    return {"variant": variant, "median_s": best, "tokens_per_s": tokens / best, "peak_extra_mib": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5, help="timed steps per variant (after one untimed)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of the JSON result")
    ap.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    require_at_least(ap, args, iters=1, tokens=1)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.iters)))
        return
    rows = []
    for variant in ("naive", "ours"):
        cmd = [sys.executable, __file__, "--variant", variant, "--iters", str(args.iters), "--tokens", str(args.tokens)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    naive, ours = rows
    print(f"MoE layer fwd+bwd, CPU ({torch.get_num_threads()} threads), T={args.tokens} D={D} E={E} K={K}\n")
    print("| path | median s | tokens/s | peak extra MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_extra_mib']:.0f} |")
    speedup = naive["median_s"] / ours["median_s"]
    memory = ours["peak_extra_mib"] / naive["peak_extra_mib"]
    print(f"\nours vs naive: {speedup:.2f}x the speed, {memory:.2f}x the peak memory")
    out = Path(args.out) / f"cpu-moe-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens": args.tokens,
        "D": D,
        "E": E,
        "K": K,
        "iters": args.iters,
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
