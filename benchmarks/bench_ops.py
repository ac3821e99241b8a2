"""Op-level benchmark of the tidal CUDA kernels against full-attention SDPA, on one card, one process.

For every B x N (Llama-3-8B attention shapes: Hq=32, Hkv=8, D=128, bf16, all sequences full):
  decode_attention              vs SDPA (cuDNN, flash) on the exact length
  select_attention (k, mode)    vs SDPA, and vs a naive PyTorch select (SDPA + q.K^T + torch.topk)
  sparse_attention (k, mode)    vs SDPA, and vs a naive PyTorch gather + attend
plus a 32-layer attention step (layers 0,1 decode; 2 and 13 select; the rest sparse) vs 32 x SDPA,
all timed as CUDA-graph replays (what a graph-captured decode step sees; per-call host overhead
gone), with the eager per-call time recorded too. Times: CUDA events, warm-up, median (of three
captures' medians, each capture with its own buffers: see graph_ms); inputs rotate so that L2
(50-60 MB) cannot serve a call's reads: at least twice its size is read between two calls that read
the same rows (rotation(): more cache buffers for the step and sparse_attention, which where they
are still too few also rotates disjoint index sets, disjoint_index_sets()). floor_ms = bytes that
must be read / measured copy bandwidth (a device-to-device copy, counting bytes read + written).
With --floors (the folder where gather_floor.cu, stream_floor.cu and step_floor.cu wrote their
JSON, as gpu_check.sh does), each B = 1 step also gets floor_bound and step_floor_bound: its speedup
if every layer ran at the floor of its reads and did nothing else (the layers' floors added up, and
such a step timed as one graph), and step_merge_floor_bound: the fastest such graph that also
combines what its layers split over CTAs (a merge kernel behind every split layer; with sparse
layers read one CTA an index row, behind the dense layers only).

    python benchmarks/bench_ops.py --out benchmarks/results/ops_h100.json [--floors $OUT]
"""
import argparse
import datetime
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tidal_ext

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
GRAPH_CALLS = 24  # the fewest calls of an op timed in one graph (see bench_shape.timed)


def card_name():
    name = torch.cuda.get_device_name()
    for tag in ("H200", "H100", "A100", "L40S", "L4"):
        if tag in name:
            return tag.lower()
    return name.replace(" ", "_").lower()


def copy_tbps():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda i: y.copy_(x), 1, iters=20)
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def time_ms(fn, n_rot, iters=30, warmup=5):
    """Median of per-call CUDA-event times; call i uses rotation slot i % n_rot."""
    for i in range(warmup):
        fn(i % n_rot)
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n_rot)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(fn, warmup=2):
    """A CUDA graph of fn(), after `warmup` calls on a side stream (allocator, cuDNN plans)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_ms(fn, iters=20, captures=3):
    """Time of replaying a CUDA graph of fn() (launch gaps removed): the median over `captures` graphs,
    each captured with its own memory (all held until the end), of each graph's median replay time.
    One capture's time moved by up to about 1.5% from one process to the next on one H100 (select at
    1x32K, k=2048: 1.173-1.190x cuDNN's time over four processes), so one capture is one sample."""
    graphs = [capture_graph(fn) for _ in range(captures)]
    return statistics.median(time_ms(lambda i: g.replay(), 1, iters=iters, warmup=3) for g in graphs)


def sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def naive_select(q, k, v, top_k):
    out = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    B = q.shape[0]
    s = torch.matmul(q.view(B, HKV, HQ // HKV, D), k.transpose(-1, -2)) * D**-0.5
    return out, s.view(B, HQ, -1).topk(top_k, dim=-1).indices


def naive_sparse(q, k, v, idx):
    B, H, K = idx.shape
    b = torch.arange(B, device=q.device)[:, None, None]
    kvh = (torch.arange(H, device=q.device) // (H // HKV))[None, :, None] if H == HQ else \
        torch.arange(H, device=q.device)[None, :, None]
    ks, vs = k[b, kvh, idx.long()], v[b, kvh, idx.long()]  # [B, H, K, D]
    if H != HQ:
        ks, vs = ks.repeat_interleave(HQ // H, 1), vs.repeat_interleave(HQ // H, 1)
    p = torch.softmax(torch.einsum("bhd,bhkd->bhk", q.float(), ks.float()) * D**-0.5, -1)
    return torch.einsum("bhk,bhkd->bhd", p, vs.float()).to(q.dtype)


def unique_rows(idx, hq=HQ, hkv=HKV):
    """Distinct (b, kv head, position) rows an index tensor makes a kernel read."""
    B, H, K = idx.shape
    per_kv = idx.reshape(B, hkv, -1) if H == hq else idx
    return sum(torch.unique(per_kv[b, g]).numel() - int((per_kv[b, g] < 0).any())
               for b in range(B) for g in range(hkv))


def l2_bytes():
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)


def rotation(bytes_per_call, least=3):
    """How many calls (each reading bytes_per_call of its own) to rotate through so that, between two
    calls reading the same rows, the others read at least twice the L2 size: L2 cannot serve the
    repeat (streaming loads, which the kernels use, leave L2 first)."""
    return max(least, math.ceil(2 * l2_bytes() / bytes_per_call) + 1)


def disjoint_index_sets(n, B, rows, N, k, device="cuda"):
    """n index tensors [B, rows, k] of sorted random positions (what select_attention gives on random
    data), pairwise disjoint in each (batch row, index row): calls that rotate through them over one
    cache read no row twice (n * k <= N)."""
    perm = torch.rand(B, rows, N, device=device).argsort(-1)[..., : n * k].view(B, rows, n, k)
    return [perm[:, :, j].sort(-1).values.to(torch.int32).contiguous() for j in range(n)]


def step_slots(B, n_rot):
    """Cache buffers the 32-layer step rotates through (layer l reads buffer l % slots), at least
    n_rot: enough that a sparse layer finds none of its rows in L2 from the layer `slots` before it,
    which read the same rows of the same buffer (group mode reads the fewest, B x Hkv x 2048 rows).
    sparse_attention's timing rotates them too."""
    return rotation(B * HKV * 2048 * 2 * D * 2, n_rot)


def bench_shape(B, N, top_ks, modes, bw, rows, step_rows, n_rot):
    print(f"== B={B} N={N}")
    slots = step_slots(B, n_rot)  # the step and sparse_attention rotate them all, the other ops n_rot
    bufs = [tuple(torch.randn(s, device="cuda", dtype=DTYPE) for s in ((B, HQ, D), (B, HKV, N, D), (B, HKV, N, D)))
            for _ in range(slots)]
    lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * B * HKV * N * D * 2
    floor_full = kv_bytes / (bw * 1e12) * 1e3

    def timed(fn, calls=n_rot):
        """(graph-replay ms, eager ms) per call of fn(c), c = 0 .. calls - 1 in turn; None where the
        backend refuses. A graph holds at least GRAPH_CALLS calls (the rotation repeated), so the
        replay's own start is spread thin alike for an op and its baseline."""
        n = calls * math.ceil(GRAPH_CALLS / calls)
        try:
            eager = time_ms(fn, calls)
            return graph_ms(lambda: [fn(c % calls) for c in range(n)]) / n, eager
        except RuntimeError as e:  # a backend that does not take these shapes
            print(f"  (skipped: {str(e).splitlines()[0][:100]})")
            return None, None

    cudnn, cudnn_eager = timed(lambda i: sdpa(*bufs[i], SDPBackend.CUDNN_ATTENTION))
    flash, flash_eager = timed(lambda i: sdpa(*bufs[i], SDPBackend.FLASH_ATTENTION))
    full_ref = cudnn if cudnn is not None else flash

    def add(op, fn, top_k=None, mode=None, naive=None, floor=floor_full, calls=n_rot):
        ms, eager = timed(fn, calls)
        rows.append({"op": op, "B": B, "N": N, "top_k": top_k, "mode": mode, "ms": ms, "cudnn_ms": cudnn,
                     "flash_ms": flash, "naive_ms": naive, "speedup_vs_cudnn": full_ref / ms,
                     "floor_ms": floor, "frac_of_floor": floor / ms, "eager_ms": eager,
                     "cudnn_eager_ms": cudnn_eager, "flash_eager_ms": flash_eager})
        print(f"  {op:<8} k={str(top_k):<5} {str(mode):<6} {ms:8.4f} ms  sdpa {full_ref:.4f} ms  "
              f"x{full_ref / ms:6.2f}  floor {floor:.4f} ms ({100 * floor / ms:5.1f}%)  eager {eager:.4f} ms"
              + (f"  naive {naive:.4f} ms" if naive else ""))

    add("decode", lambda i: tidal_ext.decode_attention(*bufs[i], lens))
    for top_k in top_ks:
        naive_sel = timed(lambda i: naive_select(*bufs[i], top_k))[0]
        for mode in modes:
            add("select", lambda i: tidal_ext.select_attention(*bufs[i], lens, top_k, mode), top_k, mode, naive_sel)
            # sparse: call c reads buffer c % slots at index set c // slots, the sets disjoint, so no
            # call reads a row that another read in the last 2 x L2 bytes (select's indices of n_rot
            # buffers would repeat every n_rot calls, whose rows fit L2 in group mode).
            sel_rows = HQ if mode == "head" else HKV
            row_bytes = unique_rows(disjoint_index_sets(1, B, sel_rows, N, top_k)[0]) * 2 * D * 2
            n_sets = max(1, min(N // top_k, math.ceil(rotation(row_bytes) / slots)))
            sets = disjoint_index_sets(n_sets, B, sel_rows, N, top_k)
            calls = slots * n_sets
            naive_sp = timed(lambda c: naive_sparse(*bufs[c % slots], sets[c // slots]), calls)[0]
            add("sparse", lambda c: tidal_ext.sparse_attention(*bufs[c % slots], sets[c // slots], lens), top_k,
                mode, naive_sp, floor=row_bytes / (bw * 1e12) * 1e3, calls=calls)

    # 32-layer attention step; layer l reads buffer l % slots, so no layer finds its cache in L2.
    full_backend = SDPBackend.CUDNN_ATTENTION if cudnn is not None else SDPBackend.FLASH_ATTENTION

    def full_step():
        for layer in range(32):
            sdpa(*bufs[layer % slots], full_backend)

    full_ms = graph_ms(full_step)
    for mode in modes:
        config = tidal_ext.TidalConfig(top_k=2048, select_layers=(2, 13), mode=mode)

        def tidal_step():
            idx = None
            for layer in range(32):
                q, k, v = bufs[layer % slots]
                role = config.role(layer)
                if role == "full":
                    tidal_ext.decode_attention(q, k, v, lens)
                elif role == "select":
                    idx = tidal_ext.select_attention(q, k, v, lens, config.top_k, mode)[1]
                else:
                    tidal_ext.sparse_attention(q, k, v, idx, lens)

        ms = graph_ms(tidal_step)
        step_rows.append({"B": B, "N": N, "top_k": 2048, "mode": mode, "ms": ms, "full_ms": full_ms,
                          "speedup": full_ms / ms, "cache_buffers": slots,
                          "dense_layers": sum(config.role(layer) != "sparse" for layer in range(32))})
        print(f"  step32   k=2048  {mode:<6} {ms:8.4f} ms  32x sdpa {full_ms:.4f} ms  x{full_ms / ms:6.2f}"
              f"  ({slots} cache buffers)")
    del bufs
    torch.cuda.empty_cache()


def floor_bounds(step_rows, floors_dir):
    """The step's speedup bound by the floors of its reads alone (B = 1, where they were measured).
    floor_bound: 32 x SDPA / (dense layers x the stream floor of the cache + sparse layers x the
    gather floor of the rows), each floor a kernel timed on its own: benchmarks/stream_floor.cu
    (stream_floor.json: the fastest variant) and gather_floor.cu (gather_floor.json at 128K,
    gather_floor_32k.json at 32K: the fastest launch shape of random rows; head mode: the per-head
    rows or each KV head's distinct rows, the faster). step_floor_bound: 32 x SDPA / the whole step
    of such reads timed as one graph (benchmarks/step_floor.cu, step_floor_<N/1024>k.json: its
    fastest variant), kernel boundaries included; step_merge_floor_bound: the fastest such step
    that also merges whatever its layers split over CTAs, as the ops' split layers do (rows with
    "merge": true: a merge kernel behind every layer, or, where the sparse layers read one CTA an
    index row, behind the dense layers only). Adds them and their inputs to each row they cover."""
    def load(name):
        path = os.path.join(floors_dir, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    stream = load("stream_floor.json")
    gathers = [g for g in (load("gather_floor.json"), load("gather_floor_32k.json")) if g]
    steps = {n: load(f"step_floor_{n // 1024}k.json") for n in {r["N"] for r in step_rows if r["B"] == 1}}
    for r in step_rows:
        if r["B"] != 1:
            continue
        step = steps[r["N"]]
        for merge, key in ((False, "step_floor"), (True, "step_merge_floor")):
            us = [x["us"] for x in (step or {}).get("rows", []) if x["mode"] == r["mode"]
                  and x.get("layers", "all") == "all" and x.get("merge", False) == merge]
            if us:
                r.update({f"{key}_us": min(us), f"{key}_bound": r["full_ms"] * 1e3 / min(us)})
        st = [x["us"] for x in (stream or {}).get("rows", []) if (x["B"], x["N"]) == (r["B"], r["N"])]
        g = next((g for g in gathers if g["N"] == r["N"]), None)
        if not st or g is None:
            continue
        modes = ("head", "head-union") if r["mode"] == "head" else ("group",)
        ga = min(x["us"] for x in g["rows"] if x["pattern"] == "random" and x["mode"] in modes)
        floor_us = r["dense_layers"] * min(st) + (32 - r["dense_layers"]) * ga
        r.update({"stream_floor_us": min(st), "gather_floor_us": ga, "floor_bound": r["full_ms"] * 1e3 / floor_us})


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    shapes = sorted({(r["B"], r["N"]) for r in result["rows"]})
    for ax, op in zip(axes, ("select", "sparse")):
        for mode in ("head", "group"):
            for top_k in sorted({r["top_k"] for r in result["rows"] if r["top_k"]}):
                ys = [next((r["speedup_vs_cudnn"] for r in result["rows"] if r["op"] == op and r["mode"] == mode
                            and r["top_k"] == top_k and (r["B"], r["N"]) == s), None) for s in shapes]
                ax.plot([f"{b}x{n // 1024}K" for b, n in shapes], ys, marker="o", label=f"{mode} k={top_k}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{op}_attention speedup vs full SDPA ({result['card']})")
        ax.set_ylabel("SDPA time / op time")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_sweep_args(p, top_ks):
    """The sweep options both benchmarks take: --shapes (B x N list), --top-k, --modes."""
    p.add_argument("--shapes", default="1x32768,1x131072,8x32768,4x131072")
    p.add_argument("--top-k", default=top_ks)
    p.add_argument("--modes", default="head,group")


def parse_shapes(text):
    """[(B, N)] from "1x32768,4x131072"."""
    return [tuple(map(int, s.split("x"))) for s in text.split(",") if s]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_args(p, "256,2048,4096")
    p.add_argument("--rotate", type=int, default=3, help="cache buffers the single ops rotate through "
                   "(the step: more where L2 could serve its sparse layers, step_slots)")
    p.add_argument("--out", default=None, help="JSON path (a PNG plot is written beside it)")
    p.add_argument("--floors", default=None, help="folder of stream_floor.json, gather_floor*.json and "
                   "step_floor_*k.json: the 32-layer step's bounds by the floors of its reads")
    args = p.parse_args()

    torch.manual_seed(0)
    bw = copy_tbps()
    print(f"card {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw:.2f} TB/s (read+write)")
    rows, step_rows = [], []
    free = torch.cuda.mem_get_info()[0]
    for B, N in parse_shapes(args.shapes):
        need = step_slots(B, args.rotate) * 2 * B * HKV * N * D * 2
        if need > 0.6 * free:  # e.g. 4x128K on an 80 GB card: take 2x128K, as the issue allows
            B = max(1, B // 2)
        bench_shape(B, N, [int(k) for k in args.top_k.split(",")], args.modes.split(","), bw, rows, step_rows,
                    args.rotate)
    if args.floors:
        floor_bounds(step_rows, args.floors)
    result = {"card": card_name(), "device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
              "torch": torch.__version__, "copy_tbps": bw, "dtype": "bfloat16", "Hq": HQ, "Hkv": HKV, "D": D,
              "rows": rows, "step32": step_rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.splitext(args.out)[0] + ".png")

    print("\nsummary (bf16, Hq=32 Hkv=8 D=128; speedup = full SDPA time / op time)")
    print("(graph-replay times; 'eager x' is the same ratio for plain eager calls)")
    print(f"{'op':<8}{'BxN':>10}{'k':>6}{'mode':>7}{'ms':>9}{'sdpa ms':>9}{'x':>7}{'%floor':>8}{'eager x':>9}")
    for r in rows:
        eager_x = (r['cudnn_eager_ms'] or r['flash_eager_ms']) / r['eager_ms']
        print(f"{r['op']:<8}{str(r['B']) + 'x' + str(r['N'] // 1024) + 'K':>10}{str(r['top_k'] or '-'):>6}"
              f"{str(r['mode'] or '-'):>7}{r['ms']:9.4f}{(r['cudnn_ms'] or r['flash_ms']):9.4f}"
              f"{r['speedup_vs_cudnn']:7.2f}{100 * r['frac_of_floor']:8.1f}{eager_x:9.2f}")
    for r in step_rows:
        bound = f"   (bound by the floors of its reads: x{r['floor_bound']:.2f})" if "floor_bound" in r else ""
        if "step_floor_bound" in r:
            bound += f"   (a step of pure reads: {r['step_floor_us']:.1f} us, x{r['step_floor_bound']:.2f})"
        if "step_merge_floor_bound" in r:
            bound += f"   (with the merges its layers need: {r['step_merge_floor_us']:.1f} us, x{r['step_merge_floor_bound']:.2f})"
        print(f"step32  {str(r['B']) + 'x' + str(r['N'] // 1024) + 'K':>10}{2048:>6}{r['mode']:>7}{r['ms']:9.4f}"
              f"{r['full_ms']:9.4f}{r['speedup']:7.2f}{bound}")


if __name__ == "__main__":
    main()
