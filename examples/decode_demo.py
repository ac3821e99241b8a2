"""TidalDecode decode-step demo on a built-in default model (no download, runs on CPU or GPU).

The default model is the attention stack of Llama-3-8B (32 layers, 32 query heads, 8 KV heads,
head dim 128) with synthetic KV caches: random keys and values, plus a set of "important" tokens
whose keys align with every layer's queries, the structure TidalDecode relies on (the tokens that
matter persist across layers). One decode step runs twice:

  full   every layer: decode_attention over the whole context
  tidal  layers before the first select layer: decode_attention; select layers: select_attention
         (full attention + top-k positions); every other layer: sparse_attention on those positions

and the demo prints, per layer role, how close the tidal outputs are to full attention, how many of
the important tokens the selection found, and the time of both schedules.
"""
import argparse
import statistics
import time

import torch

import tidal_ext


def build_model(args, generator):
    """Per-layer queries and KV caches with `args.important` planted tokens per sequence."""
    B, Hq, Hkv, D, N, L = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.context, args.layers
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    important = torch.stack([torch.randperm(N - 1, generator=generator)[: args.important] for _ in range(B)])
    layers = []
    for _ in range(L):
        q = torch.randn(B, Hq, D, generator=generator)
        k = torch.randn(B, Hkv, N, D, generator=generator)
        v = torch.randn(B, Hkv, N, D, generator=generator)
        # Important keys point along their group's mean query: scores ~ +sqrt(D)/2 above the noise.
        u = torch.nn.functional.normalize(q.view(B, Hkv, Hq // Hkv, D).mean(2), dim=-1)  # [B, Hkv, D]
        for b in range(B):
            k[b, :, important[b]] += args.strength * D**0.5 * u[b, :, None, :]
        layers.append(tuple(t.to(device=device, dtype=dtype) for t in (q, k, v)))
    return layers, important


def run_full(layers, seq_lens):
    return [tidal_ext.decode_attention(q, k, v, seq_lens) for q, k, v in layers]


def run_tidal(layers, seq_lens, config):
    outs, indices, selections = [], None, []
    for layer, (q, k, v) in enumerate(layers):
        role = config.role(layer)
        if role == "full":
            outs.append(tidal_ext.decode_attention(q, k, v, seq_lens))
        elif role == "select":
            out, indices = tidal_ext.select_attention(q, k, v, seq_lens, config.top_k, config.mode,
                                                      config.sink, config.recent)
            outs.append(out)
            selections.append(indices)
        else:
            outs.append(tidal_ext.sparse_attention(q, k, v, indices, seq_lens))
    return outs, selections


def median_ms(fn, repeats, device):
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--mode", choices=("head", "group"), default="head")
    p.add_argument("--select-layers", type=int, nargs="*", default=[2, 13])
    p.add_argument("--important", type=int, default=64, help="planted important tokens per sequence")
    p.add_argument("--strength", type=float, default=1.0, help="how strongly important keys align")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    config = tidal_ext.TidalConfig(top_k=args.top_k, select_layers=tuple(args.select_layers), mode=args.mode)
    config.validate_for_model(args.layers)
    generator = torch.Generator().manual_seed(args.seed)
    layers, important = build_model(args, generator)
    device = torch.device(args.device)
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device=device)

    print(f"TidalDecode decode-step demo ({device.type}, {args.dtype}): {args.layers} layers, B={args.batch}, "
          f"Hq={args.q_heads}, Hkv={args.kv_heads}, D={args.head_dim}, context {args.context}")
    print(f"config: top_k={config.top_k}, select_layers={config.select_layers}, mode={config.mode}; "
          f"{args.important} planted important tokens per sequence\n")

    full = run_full(layers, seq_lens)
    tidal, selections = run_tidal(layers, seq_lens, config)

    print(f"{'role':<8}{'layers':>8}{'min cos':>10}{'mean cos':>10}{'max |diff|':>12}")
    for role in ("full", "select", "sparse"):
        ids = [i for i in range(args.layers) if config.role(i) == role]
        if not ids:
            continue
        cos = [torch.nn.functional.cosine_similarity(tidal[i].float().flatten(1), full[i].float().flatten(1)).min().item()
               for i in ids]
        diff = max((tidal[i].float() - full[i].float()).abs().max().item() for i in ids)
        print(f"{role:<8}{len(ids):>8}{min(cos):>10.4f}{statistics.mean(cos):>10.4f}{diff:>12.2e}")

    for n, indices in enumerate(selections):
        # Share of the planted tokens in each selection row (a row per query head or KV head).
        recall = torch.stack([torch.isin(indices[b], important[b].to(indices.device)).sum(-1).float()
                              for b in range(args.batch)]) / args.important
        print(f"select layer {config.select_layers[n]}: planted tokens kept per {args.mode} row: "
              f"mean {100 * recall.mean().item():.1f}%, worst {100 * recall.min().item():.1f}%")

    ms_full = median_ms(lambda: run_full(layers, seq_lens), args.repeats, device)
    ms_tidal = median_ms(lambda: run_tidal(layers, seq_lens, config), args.repeats, device)
    print(f"\nattention time per decode step: full {ms_full:.2f} ms, tidal {ms_tidal:.2f} ms "
          f"({ms_full / ms_tidal:.2f}x), median of {args.repeats}")


if __name__ == "__main__":
    main()
