"""The MoE layer shapes the benchmarks run: DiT-MoE S, XL and G (and a tiny one), as (D hidden, F expert, E
experts); F = 4 D as in DiT-MoE's experts (mlp_ratio 4)."""

SHAPES = {"S": (384, 1536, 8), "XL": (1152, 4608, 8), "G": (1408, 5632, 16), "tiny": (64, 256, 8)}
