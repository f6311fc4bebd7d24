"""The tile candidates ``bench_kernels.py --sweep`` times per kernel kind, with what the compiler and earlier GPU
runs said of them, and how it picks the tiles to adopt; ``inspect_kernels.py --candidates`` compiles them for sm_90
without a GPU."""

from __future__ import annotations

GEMM_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages", "TMA")
SWEEP = {
    # kind: (tile keys, candidates; the first is what runs now at XL). A kind that serves several ops is timed on
    # each of them and judged by their summed time. TMA = 1: weight tiles (and A tiles where A is not gathered)
    # through tensor descriptors. From bench/inspect_kernels.py (sm_90): TMA cuts registers (gate/up dX 142 -> 90,
    # dH 120 -> 90), so with 3 stages (96 KiB) two blocks fit on an SM where the pointer-load tiles fit one.
    # The SwiGLU GEMM's BN counts gate and up columns each: its accumulator is [BM, 2*BN], one wgmma 2*BN wide.
    # 128x64 (a 128x128 accumulator): 91 registers, two blocks per SM; 128x128: 183, one block (the shape of the
    # down GEMM's 128x256 tiles). GATHER = 0 permutes x first (timed here with the permute; in the layer the
    # backward then skips its own): A tiles through TMA too. PERSIST = 1 at 128x128: 173 registers, one block per
    # SM, the stores of h, g and u overlapping the next tile's loads. PERSIST = 2 with maxnreg = 128 (a register
    # cap) keeps two persistent blocks per SM at 128x64, one's epilogue beside the other's K loop (8 bytes of
    # spills). Run 6 (H200): those two were the fastest kernels (XL 0.580 and 0.568 ms, G 0.815 and 0.816, against
    # 0.597 and 0.842 now), yet the layer re-timed under them was not faster (XL 2.76 vs 2.74 ms, G 4.16 vs 3.98);
    # dropped: PERSIST = 1 at 128x64 and PERSIST = 2 with 2 stages (0.76-1.10 ms), and stores through TMA (0.61
    # alone, 0.65 persistent). Run 5 (H100, XL; then two accumulators of BN columns) dropped 4 stages, 64x128,
    # gathered pointer loads, 4 warps.
    # WS = 1 (TMA = 2: descriptors made in the kernel; 4 warps, persistent): a producer warp group issuing the TMA
    # loads and two consumer warp groups of 64 rows each, gate and up in two accumulators (see the kernel). From
    # inspect_kernels (sm_90, Triton 3.6 and 3.9): 2 partitions, 161 KiB of shared memory, no spills at 128x64;
    # 128x128 spills 2.8 KB, left out. Untimed as yet.
    "swiglu": (
        (*GEMM_KEYS, "GATHER", "PERSIST", "maxnreg", "WS"),
        [
            (128, 64, 64, 8, 3, 1, 0, 0, None, 0),
            (128, 128, 64, 8, 3, 1, 0, 0, None, 0),
            (128, 128, 64, 8, 3, 1, 0, 1, None, 0),
            (128, 64, 64, 8, 3, 1, 0, 2, 128, 0),
            (128, 64, 64, 4, 3, 2, 0, 1, None, 1),
            (128, 64, 64, 4, 4, 2, 0, 1, None, 1),
        ],
    ),
    # PERSIST = 1: one program per SM loops over the used tiles, and with TMA the compiler flattens tile and K loops
    # into one pipelined loop, so the next tile's loads overlap this tile's epilogue. Pointer loads need ~170
    # registers that way; TMA ~110. Run 4 (H100, XL):
    # 128x256 beat 128x128 with TMA on both the D = 1152 outputs (4.5 tiles wide) and the F = 4608 ones.
    # WS = 1 as in "swiglu": consumers of 64 x 256 (128 accumulator registers each) or 64 x 128; no spills.
    # The down forward's N is D (S 384, XL 1152, G 1408), so 128x256 computes an empty last half tile column: 25%,
    # 10% and 8% of its work. Run 6 at S: 128x128 without TMA 0.052 ms against 0.045; (128, 128, 64, 8, 3, 1, 1)
    # is the same tile through TMA and persistent, as the tiles now are.
    "gmm": (
        (*GEMM_KEYS, "PERSIST", "WS"),
        [
            (128, 256, 64, 8, 3, 1, 1, 0),
            (128, 256, 64, 8, 3, 1, 0, 0),
            (128, 256, 64, 8, 4, 1, 1, 0),
            (256, 128, 64, 8, 3, 1, 1, 0),
            (128, 128, 64, 8, 3, 0, 0, 0),
            (128, 128, 64, 8, 3, 1, 1, 0),
            (128, 256, 64, 4, 3, 2, 1, 1),
            (128, 128, 64, 4, 4, 2, 1, 1),
        ],
    ),
    # (128, 128, 64, 8, 3, 1): the fused SwiGLU backward's own tiles and main loop without its epilogue, so that the
    # fused kernel less this dH is what the epilogue adds. For the gate/up dX at S (N = D = 384) it also leaves no
    # column empty, where 128x256's second tile column is half empty (a quarter of the work for nothing).
    "gmm_dx": (
        (*GEMM_KEYS, "PERSIST", "WS"),
        [
            (128, 256, 64, 8, 3, 1, 0, 0),
            (128, 256, 64, 8, 4, 1, 0, 0),
            (128, 256, 64, 8, 3, 1, 1, 0),
            (256, 128, 64, 8, 3, 1, 0, 0),
            (128, 128, 64, 8, 4, 0, 0, 0),
            (128, 128, 64, 8, 3, 1, 0, 0),
            (128, 256, 64, 4, 3, 2, 1, 1),
            (128, 128, 64, 4, 4, 2, 1, 1),
        ],
    ),
    # GELU experts (upcycled dense DiT): the backward epilogue works in column quarters (121 registers at 128x128, no
    # spills; 102 with TMA); 128x64 fits two blocks per SM.
    "gmm_epi": (
        (*GEMM_KEYS, "GATHER"),
        [(128, 128, 64, 8, 4, 0, 1), (128, 64, 64, 8, 4, 0, 1), (128, 64, 64, 8, 4, 1, 1), (128, 64, 64, 8, 4, 1, 0)],
    ),
    # dW at G walks 1024 rows per expert (XL: 2048), so each tile's pipeline fill and its store of the result weigh
    # twice as much: run 5 (H100) timed 0.77 of dense at G against 0.91-0.94 at XL. 128x256 needs 195 registers
    # (one block per SM: nothing overlaps a tile's store); TMA (whole chunks of rows through descriptors, the last
    # partial one through pointer loads) cuts that to 174, and at 128x128 to 96: two blocks per SM (sm_90).
    # Run 6 (H200): (128, 128, 64, 8, 3, 1) was best at S, XL and G (2-11% below the tiles now), but there the
    # 128x256 gate/up dW still computed its empty last tile column (8-33% of its tiles); it now runs transposed.
    # TMA = 2 (descriptors over each expert's rows, made in the kernel: every chunk through TMA, no pointer-load
    # tail): 154-162 registers at 128x256 against 174 with TMA = 1, 90 at 128x128x64 (sm_90). With it, PERSIST and
    # WS (4 warps): a loading and two computing warp groups, the next tile's loads beside a tile's store, which at
    # G's 1024 rows per expert is what the short K loop leaves exposed; 168 registers, no spills, 98-128 KiB
    # (Triton 3.6 and 3.9). Untimed as yet.
    "dw": (
        ("BO", "BI", "BR", "num_warps", "num_stages", "TMA", "PERSIST", "WS"),
        [
            (128, 256, 32, 8, 4, 0, 0, 0),
            (128, 256, 32, 8, 4, 1, 0, 0),
            (256, 128, 32, 8, 4, 0, 0, 0),
            (128, 128, 32, 8, 4, 0, 0, 0),
            (128, 128, 32, 8, 4, 1, 0, 0),
            (128, 128, 64, 8, 3, 1, 0, 0),
            (128, 256, 32, 8, 4, 2, 0, 0),
            (128, 128, 64, 8, 3, 2, 0, 0),
            (128, 256, 32, 4, 4, 2, 1, 1),
            (128, 128, 64, 4, 3, 2, 1, 1),
        ],
    ),
    # The SwiGLU backward in dH's epilogue (FUSED = 1) or a plain dH + the elementwise pass (FUSED = 0: the other
    # values then do not apply). The epilogue works in column quarters: at 128x128 it needs 128 registers (255 and
    # 700 bytes of spills in one piece, run 2's 0.75 ms), so with TMA and 3 stages two blocks fit per SM. Run 5
    # (H100): 0.54 ms = the plain dH (0.27) plus the epilogue's traffic at copy bandwidth (~0.27): the g/u reads
    # after the K loop do not overlap it. Run 6 (H200) the same: fused 0.504 (XL) and 0.663 ms (G), 128x256 0.500
    # and 0.659, unfused 0.496 and 0.658 (dH 0.27 + the pass 0.23 at 3.9 TB/s). Every other candidate was slower:
    # persistent programs (one or two per SM, or three at 2 stages; 0.51-0.89 ms), epilogue inputs loaded before
    # the K loop (PRE; 0.50-0.87), 128x64 (0.64-0.86), TMA stores (0.73-0.99); dropped. WS = 1 (as in "swiglu"; the
    # epilogue on the whole tile, a consumer holding 64 rows): 128x64 compiles without spills on 3.6 (3.9: 336 bytes),
    # 128x128 spills 0.8-3 KB. PRE = 2 (each quarter's g and u read while the quarter before computes and stores,
    # two quarters' reads in flight instead of one): 137 registers, one block per SM; capped at 128, two blocks and
    # 20-24 bytes of spills (Triton 3.6 / 3.9). PRE = 3 (the quarters as a loop the compiler software-pipelines, each
    # quarter's g and u copied into shared memory two quarters ahead: cp.async, no registers held in flight): 167-177
    # registers at 128x128, one block per SM; 80 at 128x64, three. No spills (3.6 and 3.9). Untimed as yet.
    "swiglu_bwd": (
        (*GEMM_KEYS, "PERSIST", "FUSED", "PRE", "WS", "maxnreg"),
        [
            (128, 128, 64, 8, 3, 1, 0, 1, 0, 0, None),
            (128, 256, 64, 8, 3, 1, 0, 1, 0, 0, None),
            (128, 128, 64, 8, 4, 0, 0, 0, 0, 0, None),
            (128, 64, 64, 4, 3, 2, 1, 1, 0, 1, None),
            (128, 64, 64, 4, 4, 2, 1, 1, 0, 1, None),
            (128, 128, 64, 8, 3, 1, 0, 1, 2, 0, None),
            (128, 128, 64, 8, 3, 1, 0, 1, 2, 0, 128),
            (128, 128, 64, 8, 3, 1, 0, 1, 3, 0, None),
            (128, 64, 64, 8, 3, 1, 0, 1, 3, 0, None),
        ],
    ),
    # The elementwise SwiGLU backward. (128, 32) and (128, 64) read and write in the pattern of the fused epilogue's
    # column quarters at BN = 128 and 256 (128 rows of 64 or 128 bytes each per tensor): set against the wide tiles,
    # they tell how much of the fused kernel's slow epilogue that pattern alone costs.
    "ew": (("BR", "BC", "num_warps"), [(2, 1024, 8), (4, 512, 8), (8, 256, 8), (128, 32, 8), (128, 64, 8)]),
    # BD stays 128: the routing-weight gradient adds one partial dot product per BD columns, so another BD changes
    # its bits and could never be adopted (run 6 timed BD = 256 at XL, G and S: within 2%, and slower at S).
    "rows": (("BT", "BD", "num_warps"), [(16, 128, 4), (8, 128, 4), (32, 128, 4), (16, 128, 8)]),
}


def candidate(keys: tuple, values: tuple) -> dict:
    """A sweep candidate as tile settings; None leaves a setting unset (e.g. no ``maxnreg`` cap)."""
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None}


def adopted(now_ms: float, timed: dict[str, tuple[dict, float, float]]) -> tuple[str, dict]:
    """The tiles to adopt after the whole layer was re-timed ({label: (tiles, layer ms, largest normalised difference
    from the tiles in use)}): the fastest variant that beat the tiles in use (``now_ms``) with the same output and
    gradients bit for bit, else ("tiles now", {}): no overrides. Tiles change speed, never results."""
    better = [(ms, label, tiles) for label, (tiles, ms, diff) in timed.items() if diff == 0.0 and ms < now_ms]
    if not better:
        return "tiles now", {}
    _, label, tiles = min(better, key=lambda b: b[0])
    return label, tiles
