"""The Triton kernels compile for Hopper (sm_90) on any machine, and every grouped GEMM uses wgmma with a
software-pipelined main loop: ``bench/inspect_kernels.py --check`` for the default tiles, with pointer loads, with TMA,
and with TMA plus the other tile options (x permuted before the first expert GEMM, the SwiGLU backward fused into dH,
persistent programs), and every sweep candidate of the GEMM kinds with warp-specialized ones, dW included (those
split into their partitions). Before Hopper and on Blackwell the target's own tensor-core MMA instead, and every kernel
within the target's shared memory per block."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    try:
        return os.path.exists(triton.knobs.nvidia.ptxas_blackwell.path)
    except Exception:
        return False


def _inspect(*args: str, width: int = 16) -> list[list[str]]:
    """Run ``bench/inspect_kernels.py`` with ``args`` and return the cells of its tables' rows, one per kernel
    (``width`` cells: 17 with ``--candidates``, whose rows start with the candidate)."""
    cmd = [sys.executable, "-W", "ignore", str(REPO / "bench" / "inspect_kernels.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()]
    header = ("op", "candidate")
    return [cells for cells in rows if len(cells) == width and cells[0] not in header and cells[0][:3] != "---"]


def _gemms(rows: list[list[str]]) -> dict[str, list[str]]:
    """{op: cells} of the grouped GEMM kernels in an ``_inspect`` table."""
    return {cells[0]: cells for cells in rows if cells[1].startswith("_gmm")}


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
def test_pre_hopper_tiles_compile_pipelined_without_spills_for_sm80():
    """Before Hopper the bf16 defaults are pointer-load tiles: compiled for sm_80 every grouped GEMM is pipelined
    (cp.async) and none spills, where the Hopper tiles lose their pipelining and spill."""
    gemms = _gemms(_inspect("--check", "--arch", "80"))
    assert {"gate/up fwd", "down fwd", "down dX: dH", "gate/up dX", "down dW", "gate/up dW"} <= set(gemms), gemms
    for op, cells in gemms.items():
        assert cells[6] == "0/0" and int(cells[10]) > 0 and cells[11] == "0", (op, cells)  # spills, cp.async, TMA


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
@pytest.mark.parametrize("arch", [100, 120])
def test_blackwell_gets_tiles_that_fit_it_and_use_its_tensor_cores(arch):
    """Datacenter Blackwell (sm_100: B200, GB200) takes the Hopper tiles and runs every grouped GEMM on tcgen05 MMAs.
    Consumer Blackwell (sm_120: RTX 50 series) has neither wgmma nor tcgen05 and, like Ada, 99 KiB of shared memory
    per block, where the Hopper down forward needs 104 KiB and would not launch: it takes the pre-Hopper tiles, on
    mma.sync. ``--check`` fails on a kernel over the target's shared memory per block or a GEMM without its MMA;
    pipelined and without spills either way. Untimed on both."""
    gemms = _gemms(_inspect("--check", "--arch", str(arch)))
    assert {"gate/up fwd", "down fwd", "down dX: dH", "gate/up dX", "down dW", "gate/up dW"} <= set(gemms), gemms
    for op, cells in gemms.items():
        assert cells[6] == "0/0" and int(cells[9]) > 0 and cells[13] == "yes", (op, cells)  # spills, MMAs, pipelined
    for op in ("gate/up fwd", "down fwd", "down dX: dH", "gate/up dX"):  # Hopper's tiles load these through TMA
        assert (int(gemms[op][11]) > 0) == (arch == 100), (op, gemms[op])


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
@pytest.mark.parametrize("mode", ["pointer-loads", "tma", "tma-options", "tma-prefetch", "defaults"])
def test_gemm_kernels_compile_pipelined_for_sm90(mode):
    """Every mode but "defaults" sets each option explicitly (the bf16 defaults turn several on). "tma-prefetch":
    the fused SwiGLU backward with its epilogue inputs loaded before the K loop (``PRE``; not persistent: with
    ``PERSIST`` too it needs 255 registers and spills 6.6 KB)."""
    cmd = ["--check"]
    tma, prefetch = mode != "pointer-loads", mode == "tma-prefetch"
    options = mode == "tma-options"  # permute first, fused SwiGLU backward, persistent
    if mode != "defaults":
        for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu", "swiglu_bwd", "dw"):
            cmd += ["--set", f"{kind}.TMA={int(tma)}"]
        cmd += ["--set", f"swiglu.GATHER={int(not options)}", "--set", f"gmm_epi.GATHER={int(not options)}"]
        cmd += ["--set", f"swiglu_bwd.FUSED={int(options or prefetch)}"]
        for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu", "swiglu_bwd"):
            cmd += ["--set", f"{kind}.PERSIST={int(options)}"]
        cmd += ["--set", f"swiglu_bwd.PRE={int(prefetch)}", "--set", f"gmm_epi.PRE={int(prefetch)}"]
    table = _inspect(*cmd)
    rows = _gemms(table)
    assert {"gate/up fwd", "down fwd", "down dX: dH", "gate/up dX", "down dW", "gate/up dW"} <= set(rows), rows
    spills = [int(x) for x in rows["down dX: dH"][6].split("/")]
    assert spills == [0, 0], rows["down dX: dH"]
    # the gate/up GEMM takes both halves of its tile in one product per K step, as many wgmma as the down GEMM's
    assert rows["gate/up fwd"][9] == rows["down fwd"][9], (rows["gate/up fwd"], rows["down fwd"])
    if mode == "defaults":
        return
    cp_async = {op: int(cells[10]) for op, cells in rows.items()}
    tma_loads = {op: int(cells[11]) for op, cells in rows.items()}
    for op in ("gate/up fwd", "down fwd", "down dX: dH", "gate/up dX"):  # weights through descriptors iff TMA is on
        assert (tma_loads[op] > 0) == tma, (op, tma_loads[op])
    for op in ("down dW", "gate/up dW"):  # with TMA only an expert's last partial chunk takes pointer loads
        assert (tma_loads[op] > 0) == tma and (cp_async[op] == 0) == tma, (op, tma_loads[op], cp_async[op])
    for op in ("gate/up fwd", "gelu fc1 fwd"):  # a gathered A takes pointer loads; a permuted copy goes through TMA
        assert (cp_async[op] == 0) == options, (op, cp_async[op])
    fused = options or prefetch  # dH's epilogue does the elementwise pass's work
    assert any(cells[0] == "swiglu bwd pass" for cells in table) != fused


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
@pytest.mark.parametrize("experts", [8, 64, 256])
def test_routing_kernels_do_not_spill_at_many_experts(experts):
    """The routing kernels' one-hot blocks shrink as the experts grow, and the scan kernel's expert order compares
    16 experts at a time: at 128 and 256 experts the order in one [E, E] piece spilled (516 B and 11 KB, sm_90)."""
    rows = _inspect("--shape", "S", "--experts", str(experts), "--ops", "routing")
    kernels = {cells[1]: cells for cells in rows}
    assert set(kernels) == {"_route_hist_kernel", "_route_scan_kernel", "_route_rank_kernel"}, kernels
    for name, cells in kernels.items():
        assert cells[6] == "0/0", (experts, name, cells)  # spill stores / loads, bytes


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
def test_maxnreg_caps_the_registers_of_one_kind():
    """``maxnreg`` reaches the compiler: the down forward (kind ``gmm``, 176 registers at its default tiles) stays
    within a cap of 160, while the down dW (kind ``dw``, 195) keeps what it takes. (A cap below what a tile's
    accumulator needs fails to compile: 128x256 wgmma needs at least 154.)"""
    regs = {op: int(cells[5]) for op, cells in _gemms(_inspect("--set", "gmm.maxnreg=160")).items()}
    assert regs["down fwd"] <= 160 < regs["down dW"], regs


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
def test_every_sweep_candidate_of_the_gemm_kernels_compiles_pipelined():
    """``inspect_kernels.py --candidates``: each tile candidate ``bench_kernels.py --sweep`` would time for the
    gate/up GEMM, the SwiGLU backward, the plain forward and dX GEMMs and dW compiles for sm_90 with wgmma and a
    pipelined main loop, each warp-specialized one (``WS``) into a loading and two computing partitions, and each
    fused SwiGLU backward with ``PRE`` = 3 (and TMA) into a pipelined epilogue of cp.async copies, so a GPU run
    does not spend its minutes on candidates the compiler refuses, quietly builds otherwise or cannot launch."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from sweep_candidates import SWEEP
    finally:
        sys.path.remove(str(REPO / "bench"))
    kinds = {
        "swiglu": "gate/up fwd",
        "swiglu_bwd": "down dX: dH",
        "gmm": "down fwd",
        "gmm_dx": "gate/up dX",
        "dw": "gate/up dW",
    }
    rows = _inspect("--candidates", ",".join(kinds), width=17)
    gemms = [cells for cells in rows if cells[2].startswith("_gmm")]
    for kind, op in kinds.items():
        keys, values = SWEEP[kind]
        want = {str(v) for v in values}
        got = {cells[0]: cells for cells in gemms if cells[1] == op and cells[0] in want}
        assert set(got) == want, (kind, sorted(want - set(got)), rows)
        for v in values:
            cfg = dict(zip(keys, v, strict=True))
            assert got[str(v)][16] == ("2" if cfg.get("WS", 0) else "0"), (kind, v, got[str(v)])  # partitions
            if kind == "swiglu_bwd" and cfg["FUSED"] and cfg["TMA"]:  # the K loop through TMA: cp.async is PRE = 3's
                assert (int(got[str(v)][11]) > 0) == (cfg["PRE"] == 3), (v, got[str(v)])
    assert all(int(cells[10]) > 0 and cells[14] == "yes" for cells in gemms), gemms  # wgmma, pipelined
    assert all(float(cells[8]) <= 227 for cells in rows), rows  # KiB of shared memory: each fits a Hopper block


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build has no NVIDIA backend / bundled ptxas")
def test_every_sweep_candidate_of_the_elementwise_pass_compiles():
    """``--candidates ew`` compiles the elementwise SwiGLU backward under each candidate, though the bf16 tiles
    fuse that pass into dH (``swiglu_bwd`` FUSED = 1) and the layer then never launches it: a sweep candidate
    that compiled nothing would pass ``--check`` unseen."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from sweep_candidates import SWEEP
    finally:
        sys.path.remove(str(REPO / "bench"))
    rows = _inspect("--check", "--candidates", "ew", width=17)
    got = {cells[0] for cells in rows if cells[2] == "_swiglu_bwd_kernel"}
    assert got == {str(v) for v in SWEEP["ew"][1]}, rows
