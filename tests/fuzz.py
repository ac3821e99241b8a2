"""Fuzzing the ops against tidal_ext/reference.py: random valid shapes (batch, GQA ratio, head dim,
capacity), per-sequence lengths (0, 1, around top_k, N), budgets (top_k, sink, recent), modes,
cache layouts (contiguous, sliced, [B, N, H, D] transposed), strided q and dtypes, each case run
through the checks of tests/test_ops.py (NaN-framed caches, reference error <= 2x plain PyTorch's,
tie-aware index comparison). tests/test_fuzz.py runs a few hundred cases on CPU (fixed seed);
on the GPU machine (8 processes, each its own seed and share of the cases; the float64 reference
on the host is the slow part):
    python tests/fuzz.py --device cuda --cases 10000 --workers 8 --out $OUT/fuzz.json
"""
import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_ops  # noqa: E402  (its checks take (case, device))
from _util import LAYOUTS, Case  # noqa: E402

CHECKS = (test_ops.test_decode_attention, test_ops.test_select_attention, test_ops.test_sparse_attention_selected,
          test_ops.test_sparse_attention_random_indices, test_ops.test_correct_kv_attention)


def random_case(rng: random.Random, device: str) -> Case:
    dtype = rng.choice(["f16", "bf16"] if device == "cuda" else ["f32", "f16", "bf16"])
    Hkv, G = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 3, 4])
    D = rng.choice([32, 64, 64, 96, 128, 128, 256])
    N = rng.randint(1, 700)
    top_k = rng.randint(1, 96)
    sink = rng.randint(0, min(4, top_k - 1))
    recent = rng.randint(0, top_k - sink)  # sink + max(recent, 1) <= top_k
    B = rng.randint(1, 4)
    lens = None if rng.random() < 0.2 else tuple(
        rng.choice([0, 1, N, rng.randint(0, N), min(N, top_k), min(N, top_k + 1)]) for _ in range(B))
    return Case(B, G * Hkv, Hkv, D, dtype, rng.choice(["head", "group"]), sink, recent, rng.choice(LAYOUTS), N, top_k,
                lens, S=rng.randint(1, min(N, 8)), q_strided=rng.random() < 0.3, v_layout=rng.choice(LAYOUTS))


def run(cases: int, device: str, seed: int = 0, max_seconds: float = float("inf")):
    """(cases run, failures as 'check[case]: error' lines); stops early after max_seconds."""
    rng = random.Random(seed)
    failures = []
    t0 = time.monotonic()
    for i in range(cases):
        if time.monotonic() - t0 > max_seconds:
            return i, failures
        case = random_case(rng, device)
        for check in CHECKS:
            torch.manual_seed(seed * 1_000_003 + i)
            try:
                check(case, device)
            except Exception as e:  # a mismatch or an unexpected error: record it, keep going
                failures.append(f"{check.__name__}[{case.id}]: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return cases, failures


def run_workers(args):
    """(cases run, failure lines, mismatch count) of args.workers child processes (seeds seed + i)."""
    share = -(-args.cases // args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"w{w}.json") for w in range(args.workers)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)))
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--device", args.device, "--cases",
                                   str(min(share, args.cases - w * share)), "--seed", str(args.seed + w),
                                   "--max-seconds", str(args.max_seconds), "--out", out], env=env,
                                  stdout=subprocess.DEVNULL)
                 for w, out in enumerate(outs) if args.cases > w * share]
        for proc in procs:
            proc.wait()
        results = []
        for out in outs[:len(procs)]:
            if not os.path.exists(out):  # a worker that died: its whole share counts as failed
                return sum(r["cases"] for r in results), [f"worker {out} crashed"], 1
            with open(out) as f:
                results.append(json.load(f))
    return (sum(r["cases"] for r in results), [line for r in results for line in r["failures"]],
            sum(r["mismatches"] for r in results))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the cases (seeds seed + i)")
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early (cases run are reported)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.workers > 1:
        n, failures, mismatches = run_workers(args)
    else:
        n, failures = run(args.cases, args.device, args.seed, args.max_seconds)
        mismatches = len(failures)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    card = next((t.lower() for t in ("H200", "H100") if t in name), name)
    result = {"card": card, "device": name, "date": str(datetime.date.today()), "torch": torch.__version__,
              "seed": args.seed, "workers": args.workers, "cases": n, "checks_per_case": len(CHECKS),
              "mismatches": mismatches,
              "failures": failures[:200]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"fuzz on {name}: {n} cases x {len(CHECKS)} checks, {mismatches} mismatches")
    for line in failures[:20]:
        print("  " + line)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
