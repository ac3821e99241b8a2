"""A few calls of each op at one shape, for `ncu` (the kernels' own times and counters):
    ncu --print-summary per-kernel python3 benchmarks/profile_ops.py --B 1 --N 131072
"""
import argparse

import torch

import tidal_ext

p = argparse.ArgumentParser()
p.add_argument("--B", type=int, default=1)
p.add_argument("--N", type=int, default=131072)
p.add_argument("--top-k", type=int, default=2048)
p.add_argument("--calls", type=int, default=3)
args = p.parse_args()
q = torch.randn(args.B, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(args.B, 8, args.N, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lens = torch.full((args.B,), args.N, dtype=torch.int32, device="cuda")
for _ in range(args.calls):
    tidal_ext.decode_attention(q, k, v, lens)
    for mode in ("head", "group"):
        _, idx = tidal_ext.select_attention(q, k, v, lens, args.top_k, mode)
        tidal_ext.sparse_attention(q, k, v, idx, lens)
torch.cuda.synchronize()
