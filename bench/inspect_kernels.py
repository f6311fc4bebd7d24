"""What the compiler makes of our MoE kernels for an NVIDIA GPU (Hopper unless told), on any machine (no GPU needed).

    python bench/inspect_kernels.py                  # XL shapes, bf16, sm_90a
    python bench/inspect_kernels.py --shape G --dump /tmp/ir   # also write each kernel's TTGIR and PTX
    python bench/inspect_kernels.py --set swiglu.TMA=1 --set gmm.BN=128   # try other tile settings
    python bench/inspect_kernels.py --check          # exit 1 unless every GEMM uses wgmma, pipelined, and fits
    python bench/inspect_kernels.py --arch 80        # the tiles an A100 gets (no TMA, no wgmma)
    python bench/inspect_kernels.py --arch 100 --check   # B200: the Hopper tiles, tcgen05 MMAs
    python bench/inspect_kernels.py --candidates swiglu,swiglu_bwd   # each sweep candidate of these kinds
    python bench/inspect_kernels.py --shape S --experts 256 --ops routing   # the routing kernels at 256 experts

The layer's forward and backward run once with every kernel launch intercepted (nothing executes); each launch is
compiled ahead of time for the target with the argument specialisation the JIT applies on a GPU (Triton's own
specialisation function: 16-byte divisible pointers and integers, integers equal to 1 as constants). Per kernel it
reports what decides its speed before any timing: registers per thread and spilled bytes (from ptxas), shared
memory, resident blocks per SM, the target's tensor-core MMA instructions (wgmma on sm_90, tcgen05.mma on
sm_100-sm_110, mma.sync elsewhere), asynchronous copies (cp.async, TMA loads and stores in the PTX),
whether the main loop is software-pipelined, and 16-byte vector loads. A static check between GPU sessions; it
times nothing. The installed Triton compiles (GPU hosts may run another version).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from arguments import require_at_least  # noqa: E402  (bench/, the script's folder)
from shapes import SHAPES  # noqa: E402  (bench/, the script's folder)
from sweep_candidates import SWEEP, candidate  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from ditmoe_kernels import tiles  # noqa: E402
from ditmoe_kernels import triton_ops as ops  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--shape", default="XL", choices=["G", "S", "XL"])
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--top-k", type=int, default=2)
ap.add_argument("--experts", type=int, help="experts per layer instead of the shape's (e.g. 256: routing at many)")
ap.add_argument("--ops", metavar="OPS", help="comma list of the ops to compile (e.g. routing), instead of all")
ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
ap.add_argument("--dump", help="folder for each kernel's TTGIR and PTX")
ap.add_argument(
    "--check",
    action="store_true",
    help="exit 1 unless every kernel fits the target's shared memory per block and every GEMM kernel is pipelined "
    "and uses the target's tensor-core MMA instruction",
)
ap.add_argument("--set", action="append", default=[], metavar="KIND.KEY=INT", help="override one tile setting")
ap.add_argument(
    "--candidates", metavar="KINDS", help="compile each tile candidate bench_kernels.py --sweep times for these kinds"
)
args = ap.parse_args()
# the ops whose kernels a sweep candidate of each kind sets (as bench_kernels.py times them)
KIND_OPS = {
    "swiglu": ["gate/up fwd"],
    "swiglu_bwd": ["down dX: dH", "swiglu bwd pass"],
    "gmm_dx": ["gate/up dX"],
    "dw": ["down dW", "gate/up dW"],
    "gmm": ["down fwd"],
    "gmm_epi": ["gelu fc1 fwd", "gelu fc2 dX"],
    "ew": ["swiglu bwd pass"],
    "rows": ["permute", "unpermute", "unpermute bwd"],
}
# other kinds' settings under which a kind's ops launch at all: the elementwise pass runs only beside a plain dH
KIND_NEEDS = {"ew": {"swiglu_bwd": {"FUSED": 0}}}
OPS = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
require_at_least(ap, args, tokens=1, top_k=1)
if args.experts is not None and args.experts < args.top_k:
    ap.error(f"--experts {args.experts}: fewer experts than --top-k {args.top_k}")
KINDS = [k.strip() for k in (args.candidates or "").split(",") if k.strip()]
if unknown := sorted(set(KINDS) - set(SWEEP)):
    ap.error(f"--candidates: no sweep candidates for {unknown} (kinds: {', '.join(SWEEP)})")
ops.common.arch = lambda: args.arch  # the tile table of the target, not of this machine
# the tensor-core MMA a GEMM should compile to: wgmma on Hopper, tcgen05 (accumulators in tensor memory) on datacenter
# Blackwell, the warp-level mma.sync elsewhere (Ampere, Ada, and consumer Blackwell sm_120, which has neither)
MMA = "wgmma" if 90 <= args.arch < 100 else "tcgen05.mma" if 100 <= args.arch < 120 else "mma.sync"
MMA_PTX = "wgmma.mma_async" if MMA == "wgmma" else MMA  # the PTX instruction, counted per kernel


def candidate_tiles(given: dict, kind: str, values: tuple) -> dict:
    """The overrides one sweep candidate of ``kind`` compiles under: ``given`` (``--set``), what the kind's ops
    need to launch (``KIND_NEEDS``), then the candidate's settings."""
    out = {k: dict(cfg) for k, cfg in given.items()}
    for k, cfg in {**KIND_NEEDS.get(kind, {}), kind: candidate(SWEEP[kind][0], values)}.items():
        out[k] = {**out.get(k, {}), **cfg}
    return out


def overrides() -> dict:
    """``--set`` values as ``tile_overrides`` keyword arguments: {kind: {key: int}}."""
    out: dict = {}
    for item in args.set:
        m = re.fullmatch(r"(\w+)\.(\w+)=(-?\d+)", item)
        if not m:
            ap.error(f"--set {item!r}: expected KIND.KEY=INT, e.g. swiglu.TMA=1")
        kind, key, value = m.group(1), m.group(2), int(m.group(3))
        try:
            ops.check_tiles({kind: {key: value}})
        except ValueError as exc:
            ap.error(f"--set {item!r}: {exc}")
        out.setdefault(kind, {})[key] = value
    return out


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **opts)`` records the launch instead of running it."""

    def __init__(self, name: str, fn: triton.runtime.jit.JITFunction, launches: list, label: list):
        self.name, self.fn, self.launches, self.label = name, fn, launches, label

    def __getitem__(self, grid):
        def launch(*a, **kw):
            self.launches.append((self.label[0], self.name, self.fn, a, kw))

        return launch


def specialise(fn, a: tuple) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, from Triton's own specialisation of these argument values."""
    sig, const, attrs = {}, {}, {}
    for i, (p, v) in enumerate(zip(fn.params, a, strict=True)):
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
            continue
        ty, key = native_specialize_impl(CUDABackend, v, False, True, True)
        sig[p.name] = ty
        if ty == "constexpr":
            const[p.name] = key
        elif isinstance(key, str) and CUDABackend.parse_attr(key):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return sig, const, attrs


def ptxas_report(ptx: str) -> dict:
    """Registers, spill bytes and shared memory from ``ptxas -v`` on the kernel's PTX."""
    ptxas = triton.knobs.nvidia.ptxas_blackwell if args.arch >= 90 else triton.knobs.nvidia.ptxas
    arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
        )
    log = proc.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    return {
        "regs": num(r"Used (\d+) registers"),
        "spill_st": num(r"(\d+) bytes spill stores"),
        "spill_ld": num(r"(\d+) bytes spill loads"),
    }


def record_layer() -> list:
    """Run the SwiGLU and GELU experts' forward and backward pieces once at the shape, recording every launch."""
    launches, label = [], [""]
    modules = [m for name, m in sys.modules.items() if name.startswith(f"{ops.__name__}.")]  # its kernel modules
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, Recorder):  # an earlier call's: record into this call's list
                obj.launches, obj.label = launches, label
            elif isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(module, name, Recorder(name, obj, launches, label))
    ops.common.check_device = lambda t: None  # CPU tensors stand in for CUDA ones: only shapes, strides, dtypes matter
    ops.checks.check_ids = lambda *a: None  # the routing kernels are recorded, not run: their id flag says nothing
    ops.common.persistent_programs = lambda device, per_sm: per_sm * 132  # an H100's SMs (the grid is not compiled in)
    D, F, E = SHAPES[args.shape]
    E = args.experts or E
    T, K = args.tokens, args.top_k
    R = T * K
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    empty = lambda *s: torch.empty(*s, dtype=dt)  # noqa: E731
    x, Wgu, Wd, probs, dy = empty(T, D), empty(E, 2 * F, D), empty(E, D, F), empty(T, K), empty(R, D)
    W1 = empty(E, F, D)  # the GELU experts' fc1
    experts = torch.arange(T * K).reshape(T, K) % E

    def step(name, fn, *a, **kw):
        label[0] = name
        return fn(*a, **kw)

    plan = step("routing", ops.routing_plan, experts, E)
    meta = ops.plan_meta(plan)
    a, gather = step("permute", ops._expert_input, x, meta, "swiglu")  # launches only with swiglu.GATHER=0
    h, g, u = step("gate/up fwd", ops._gmm_swiglu, a, Wgu, meta, gather=gather)
    step("gate/up fwd (no grad)", ops._gmm_swiglu, a, Wgu, meta, gather=gather, save=False)  # sampling: h alone
    y = step("down fwd", ops._gmm, h, Wd, meta, transpose_w=True)
    step("unpermute", ops._gather, y, meta, probs)
    step("unpermute bwd", ops._scatter, x, meta, probs, y)
    if ops.common.config("swiglu_bwd", dt).get("FUSED", 0):
        dgu, hb = step("down dX: dH", ops._dh_swiglu_bwd, dy, Wd, g, u, meta)  # + SwiGLU backward epilogue
        step("down dX: dH (h kept)", ops._dh_swiglu_bwd, dy, Wd, g, u, meta, save=False)  # KEEP_H: no h written
    else:
        dh = step("down dX: dH", ops._gmm, dy, Wd, meta, transpose_w=False)
        dgu, hb = step("swiglu bwd pass", ops._swiglu_bwd, dh, g, u)
        step("swiglu bwd pass (h kept)", ops._swiglu_bwd, dh, g, u, save=False)
    step("down dW", ops._gmm_dw, dy, hb, meta)
    xp = step("permute", ops._scatter, x, meta)
    step("gate/up dW", ops._gmm_dw, dgu, xp, meta)
    step("gate/up dX", ops._gmm, dgu, Wgu, meta, transpose_w=False)
    a, gather = step("permute", ops._expert_input, x, meta, "gmm_epi")
    step("gelu fc1 fwd", ops._gmm, a, W1, meta, transpose_w=True, gather=gather, bias=empty(E, F), epi=ops.EPI_GELU)
    b1 = empty(E, F)
    step(
        "gelu fc1 fwd (no grad)",
        ops._gmm,
        a,
        W1,
        meta,
        transpose_w=True,
        gather=gather,
        bias=b1,
        epi=ops.EPI_GELU,
        save=False,
    )
    step("gelu fc2 dX", ops._gmm, dy, Wd, meta, transpose_w=False, epi=ops.EPI_GELU_BWD, x0=g)
    step("gelu dW+db", ops._gmm_dw, dy, hb, meta, with_db=True)
    return launches


def sm_limits(cc: int) -> tuple[int, int, int]:
    """(shared memory bytes per SM, the most one block may use, warps per SM) of compute capability ``cc`` x 10:
    A100 and Orin; consumer Ampere, Ada and Blackwell; Hopper and datacenter Blackwell."""
    if cc in (80, 87):
        return 164 * 1024, 163 * 1024, 64
    if cc in (86, 89) or cc >= 120:
        return 100 * 1024, 99 * 1024, 48
    return 228 * 1024, 227 * 1024, 64


SMEM_PER_SM, SMEM_PER_BLOCK, WARPS_PER_SM = sm_limits(args.arch)


def blocks_per_sm(regs: int | None, smem_bytes: int, warps: int) -> int | None:
    """Resident blocks per SM of the target: 64K registers (allocated per warp in units of 256), its shared memory
    (1 KiB reserved per block) and warps, 32 blocks at most."""
    if regs is None:
        return None
    regs_per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (regs_per_warp * warps), SMEM_PER_SM // (smem_bytes + 1024), WARPS_PER_SM // warps, 32)


def inspect(fn, a, kw, dump_name):
    sig, const, attrs = specialise(fn, a)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    opts = {k: kw[k] for k in tiles.LAUNCH_OPTIONS if k in kw}  # kw: what common.launch_opts passed
    k = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=opts)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for ext, text in (("ttgir", ttgir), ("ptx", ptx)):
            with open(os.path.join(args.dump, f"{dump_name}.{ext}"), "w") as f:
                f.write(text)
    pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir or "async_tma" in ttgir
    report = ptxas_report(ptx)
    return {
        **report,
        "smem_kib": k.metadata.shared / 1024,
        "blocks": blocks_per_sm(report["regs"], k.metadata.shared, k.metadata.num_warps),
        "mma": ptx.count(MMA_PTX),
        "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared", ptx)),  # global -> shared
        "tma_st": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global", ptx)),  # shared -> global
        "pipelined": pipelined,
        "v4_loads": len(re.findall(r"ld\.global(\.[a-z0-9]+)*\.v4", ptx)),
        # warp specialization: the partitions the tile loop was split into besides the default (loading) one
        "ws": len(re.findall(r"^\s*partition\d+\(", ttgir, re.M)),
        "tiles": "x".join(str(const[n]) for n in ("BM", "BN", "BK", "BO", "BI", "BR", "BT", "BD", "BC") if n in const),
        **opts,
    }


def arg_key(v) -> str:
    """What of an argument decides the compiled kernel: dtypes and block shapes, not tensor contents."""
    if isinstance(v, torch.Tensor):
        return str(v.dtype)
    if isinstance(v, TensorDescriptor):
        return f"desc{v.block_shape}{v.base.dtype}"
    return repr(v)


def problems(rows) -> list[str]:
    """Kernels that need more shared memory than a block of the target may have (they would not launch), and GEMM
    kernels without the target's tensor-core MMA or whose main loop is not software-pipelined."""
    out = [
        f"{label}: {name} needs {r['smem_kib']:.0f} KiB of shared memory, sm_{args.arch} allows "
        f"{SMEM_PER_BLOCK // 1024} KiB per block"
        for label, name, r in rows
        if r["smem_kib"] * 1024 > SMEM_PER_BLOCK
    ]
    return out + [
        f"{label}: {name} {f'has no {MMA}' if not r['mma'] else 'is not pipelined'}"
        for label, name, r in rows
        if "gmm" in name and not (r["mma"] and r["pipelined"])
    ]


HEADER = (
    f"| kernel | tile | warps | stages | regs | spill st/ld B | smem KiB | blocks/SM | {MMA} | cp.async | TMA loads "
    "| TMA stores | pipelined | v4 loads | WS partitions |"
)


def cells(name: str, r: dict) -> str:
    """The table cells of one compiled kernel, from its name on (see HEADER)."""
    return (
        f"{name} | {r['tiles']} | {r.get('num_warps', '')} | {r.get('num_stages', '')} | {r['regs']} "
        f"| {r['spill_st']}/{r['spill_ld']} | {r['smem_kib']:.0f} | {r['blocks']} | {r['mma']} | {r['cp_async']} "
        f"| {r['tma']} | {r['tma_st']} | {'yes' if r['pipelined'] else 'no'} | {r['v4_loads']} | {r['ws']} |"
    )


def compile_layer(tile_kinds: dict, labels: list[str] | None = None) -> list:
    """(op, kernel, report) for every distinct kernel launch of the layer under these tiles (of the ops in
    ``labels``, or all)."""
    with ops.tile_overrides(**tile_kinds):
        launches = record_layer()
    rows, seen = [], set()
    for label, name, fn, a, kw in launches:
        key = (name, tuple(arg_key(v) for v in a), str(kw))
        if key in seen or (labels is not None and label not in labels):
            continue
        seen.add(key)
        rows.append((label, name, inspect(fn, a, kw, f"{len(rows):02d}-{name}")))
        print(f"compiled {label}: {name}", file=sys.stderr)
    return rows


def main():
    print(
        f"triton {triton.__version__}, sm_{args.arch}, {args.shape} {args.dtype}, {args.tokens} tokens, "
        f"top-{args.top_k}{f', {args.experts} experts' if args.experts else ''}",
        file=sys.stderr,
    )
    if KINDS:  # one table per kind: a row per candidate and kernel it sets
        bad = []
        for kind in KINDS:
            keys, values = SWEEP[kind]
            print(f"\n{kind}: {', '.join(keys)}\n\n| candidate | op | {HEADER[2:]}")
            print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
            for v in values:
                try:
                    rows = compile_layer(candidate_tiles(overrides(), kind, v), KIND_OPS[kind])
                except Exception as exc:  # a candidate the compiler refuses is a finding, not the end of the list
                    print(f"| {v} | | {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |" + " |" * 13)
                    bad.append(f"{kind} {v}: {type(exc).__name__}")
                    continue
                if not rows:  # none of the kind's ops launched: nothing of this candidate was compiled
                    bad.append(f"{kind} {v}: no launch of {', '.join(KIND_OPS[kind])}")
                for label, name, r in rows:
                    if name != "_block_table_kernel":  # the same for every candidate
                        print(f"| {v} | {label} | {cells(name, r)}")
                bad += [f"{kind} {v}: {problem}" for problem in problems(rows)]
        if args.check and bad:
            sys.exit("check failed:\n" + "\n".join(bad))
        return
    if OPS:
        with ops.tile_overrides(**overrides()):
            recorded = dict.fromkeys(launch[0] for launch in record_layer())
        if unknown := [op for op in OPS if op not in recorded]:
            ap.error(f"--ops: no launches of {', '.join(unknown)} (ops: {', '.join(recorded)})")
    rows = compile_layer(overrides(), OPS)
    print(f"\n| op | {HEADER[2:]}")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for label, name, r in rows:
        print(f"| {label} | {cells(name, r)}")
    if args.check and (bad := problems(rows)):
        sys.exit("check failed:\n" + "\n".join(bad))


if __name__ == "__main__":
    main()
