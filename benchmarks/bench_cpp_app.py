"""Runs the C++ decode app (examples/cpp_decode, built by scripts/examples.sh) at Llama-3-8B
attention shapes (32 layers, Hq=32, Hkv=8, D=128, bf16, top_k 2048, select layers 2 and 13) and
collects ms/token of full attention vs TidalDecode into one JSON:
    python benchmarks/bench_cpp_app.py --out benchmarks/results/cpp_app_h200.json
Rows: B x N in --shapes, projections off (attention only) and on, CUDA-graph replays and eager
steps, head mode (and group mode for attention only). No Python runs inside the timed app."""
import argparse
import datetime
import json
import os
import subprocess
import tempfile

import torch

from bench_ops import card_name

APP = os.path.join("build", "examples", "cpp_decode", "tidal_decode")


def run(args, extra):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [APP, "--device", "cuda", "--dtype", "bfloat16", "--prefill", "random", "--top-k", "2048",
           "--select-layers", "2,13", "--steps", str(args.steps), "--warmup", "3", "--json", path] + extra
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(path) as f:
        row = json.load(f)
    os.unlink(path)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x32768,1x131072")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        B, N = map(int, shape.split("x"))
        for projections in ("off", "on"):
            for graph in (True, False):
                modes = ("head", "group") if projections == "off" and graph else ("head",)
                for mode in modes:
                    extra = ["--batch", str(B), "--context", str(N), "--projections", projections, "--mode", mode]
                    r = run(args, extra + (["--cuda-graph"] if graph else []))
                    rows.append({"B": B, "N": N, "mode": mode, "projections": projections == "on",
                                 "cuda_graph": graph, "ms_full": r["ms_full"], "ms_tidal": r["ms_tidal"],
                                 "speedup": r["ms_full"] / r["ms_tidal"]})
    result = {"card": card_name(), "device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
              "torch": torch.__version__, "layers": 32, "Hq": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16",
              "top_k": 2048, "select_layers": [2, 13], "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nC++ app, {result['device']}: ms/token full -> tidal (32 layers, bf16, k=2048)")
    for r in rows:
        print(f"  {r['B']}x{r['N'] // 1024}K {r['mode']:<5} proj {'on ' if r['projections'] else 'off'} "
              f"{'graph' if r['cuda_graph'] else 'eager'}: {r['ms_full']:.3f} -> {r['ms_tidal']:.3f} ms "
              f"({r['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
