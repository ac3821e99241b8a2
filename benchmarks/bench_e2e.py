"""End-to-end decode speed of a whole model: full attention vs TidalDecode, ms/token under CUDA graphs.

The model is HuggingFace's LlamaForCausalLM built from the Llama-3-8B config (32 layers, hidden 4096,
Hq=32, Hkv=8, D=128, vocab 128256) with random bf16 weights (speed does not depend on weight values).
A StaticCache is filled with random K/V up to N tokens, then --steps greedy decode steps run, each a
replay of one captured CUDA graph of the decode step: embedding, the 32 HF decoder layers (the
model's own modules and its attention interface: "tidal" for ours), final norm, LM head, argmax. The
step advances the cache length, the positions and the input token on the device, so the replays
are 128 consecutive tokens. The step calls the decoder layers directly, without HF's mask builder:
no sequence is padded, the tidal attention takes lengths from position_ids.

Attention variants, all in one process on one card:
  full_tidal   every layer decode_attention (TidalConfig with no select layers)
  full_cudnn   cuDNN SDPA over the first N + steps cache rows (the last step's length: at most
               steps / N more rows than exact, 0.4% at 32K, the baseline's cost slightly overstated)
  tidal        top_k in --top-k, select layers (2, 13), head and group mode
speedup = full_cudnn ms / tidal ms (also vs full_tidal). floor_ms = (weights read per token + KV
bytes that must be read) / measured copy bandwidth: full reads every layer's cache; tidal reads the
full and select layers' caches and, on each sparse layer, the distinct rows its indices name.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h200.json     (on the GPU machine)
    python benchmarks/bench_e2e.py --device cpu --tiny --shapes 1x256 --steps 4   (a CPU smoke run)
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tidal_ext  # noqa: E402
import tidal_ext.hf  # noqa: E402
from bench_ops import add_sweep_args, capture_graph, card_name, copy_tbps, parse_shapes, unique_rows  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SELECT_LAYERS = (2, 13)
CUDNN = "bench_cudnn"
FULL_ROWS = {"n": 0}  # cache rows the cuDNN baseline attends (set per shape)


def cudnn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full-attention baseline: SDPA (cuDNN on CUDA) over the first FULL_ROWS["n"] cache rows."""
    n = FULL_ROWS["n"]
    backends = [SDPBackend.CUDNN_ATTENTION] if query.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


AttentionInterface.register(CUDNN, cudnn_attention)


def _rms_norm(h, weight, eps: float):
    """LlamaRMSNorm's math (variance in float32)."""
    x = h.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def pre_attention(h, ln, wq, wk, wv, cos, sin, eps: float, hq: int, hkv: int):
    """input_layernorm, q/k/v projections and rope of one decoder layer (LlamaAttention's math)."""
    x = _rms_norm(h, ln, eps)
    q = F.linear(x, wq).unflatten(-1, (hq, -1)).transpose(1, 2)
    k = F.linear(x, wk).unflatten(-1, (hkv, -1)).transpose(1, 2)
    v = F.linear(x, wv).unflatten(-1, (hkv, -1)).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def post_attention(h, o, wo, ln, w_gate, w_up, w_down, eps: float):
    """o_proj + residual, post_attention_layernorm, the SwiGLU MLP + residual."""
    h = h + F.linear(o, wo)
    x = _rms_norm(h, ln, eps)
    return h + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class Decoder:
    """A model, its StaticCache filled to N tokens, and one decode step over static input tensors.

    step "hf": the model's decoder layers as they are (eager modules, ~40 small kernels a layer
    besides attention). step "fused": the same math with each layer's pre- and post-attention parts
    as two torch.compile'd functions (inductor fuses norms, rope, SiLU and residuals), the cache
    update and the attention function (the model's attention interface) in between: what a
    compiled deployment runs. Both are captured whole in one CUDA graph."""

    def __init__(self, model, B, N, steps, fused=False, compile=True):
        self.model, self.B, self.N, self.fused = model, B, N, fused
        self.pre = torch.compile(pre_attention, dynamic=False) if compile else pre_attention
        self.post = torch.compile(post_attention, dynamic=False) if compile else post_attention
        dev = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=N + steps + 1)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        with torch.no_grad():  # one token allocates the cache layers; then random K/V fill N rows
            model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, use_cache=True)
        for layer in self.cache.layers:
            layer.keys.normal_()
            layer.values.normal_()

    def reset(self):
        """Back to N cached tokens: the next step writes position N."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.N)
        self.pos.fill_(self.N)
        self.ids.fill_(1)

    @torch.no_grad()
    def step(self):
        m = self.model.model
        h = m.embed_tokens(self.ids)
        rope = m.rotary_emb(h, position_ids=self.pos)
        for layer in m.layers:
            if self.fused:
                h = self.fused_layer(layer, h, rope)
            else:
                h = layer(h, attention_mask=None, position_ids=self.pos, past_key_values=self.cache, use_cache=True,
                          position_embeddings=rope)
        logits = self.model.lm_head(m.norm(h))
        self.ids.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return logits

    def fused_layer(self, layer, h, rope):
        attn, mlp, cfg = layer.self_attn, layer.mlp, self.model.config
        eps = layer.input_layernorm.variance_epsilon
        q, k, v = self.pre(h, layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight,
                           attn.v_proj.weight, *rope, eps, cfg.num_attention_heads, cfg.num_key_value_heads)
        keys, values = self.cache.update(k, v, attn.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS[cfg._attn_implementation]
        o, _ = attention(attn, q, keys, values, None, scaling=attn.scaling, position_ids=self.pos)
        return self.post(h, o.flatten(-2), attn.o_proj.weight, layer.post_attention_layernorm.weight,
                         mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, eps)

    def ms_per_token(self, steps, graph):
        """Mean ms per decode step over `steps` consecutive tokens (graph replays on CUDA)."""
        cuda = self.model.device.type == "cuda"
        self.reset()
        for _ in range(2):  # warm-up outside the capture (cuDNN plans, allocator)
            self.step()
        run = self.step
        if graph and cuda:
            run = capture_graph(self.step, warmup=1).replay
            self.reset()
            for _ in range(3):
                run()
        self.reset()
        tokens = []
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
            tokens.append(self.ids.clone())
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        return ms, torch.cat(tokens, 1)


KERNEL_GROUPS = (("tidal attention", ("attention_split", "merge_splits")), ("tidal top-k", ("topk_",)),
                 ("cuDNN attention", ("cudnn", "fmha", "flash")), ("GEMM", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet")))


def kernel_breakdown(dec, steps=4):
    """GPU time per decode step by kernel group (eager steps under torch.profiler; the kernels are
    the ones the graph replays)."""
    from torch.profiler import ProfilerActivity, profile
    dec.reset()
    dec.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize()
    groups, kernels = {}, 0
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other (norms, rope, copies, ...)")
        groups[group] = groups.get(group, 0.0) + e.self_device_time_total / 1e3 / steps
        kernels += e.count
    return {"ms_per_step": groups, "kernels_per_step": kernels / steps}


def use(model, variant, top_k=None, mode=None):
    if variant == "full_cudnn":
        model.set_attn_implementation(CUDNN)
    else:
        config = tidal_ext.TidalConfig(top_k=top_k, select_layers=SELECT_LAYERS, mode=mode) if variant == "tidal" \
            else tidal_ext.TidalConfig(select_layers=())
        tidal_ext.hf.enable(model, config)


def floor_ms(cfg, B, N, bw, variant, top_k=None, indices=None):
    """Bytes a decode step must read (weights, the embedding table aside, plus KV) / copy bandwidth."""
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    weights = 2 * (cfg.num_hidden_layers * (2 * cfg.hidden_size * (cfg.num_attention_heads + Hkv) * D
                                            + 3 * cfg.hidden_size * cfg.intermediate_size)
                   + cfg.vocab_size * cfg.hidden_size)
    row = 2 * D * 2  # K and V, bf16
    full_layer = B * Hkv * N * row
    if variant != "tidal":
        kv = L * full_layer
    else:
        dense = sum(1 for layer in range(L) if layer <= SELECT_LAYERS[0] or layer in SELECT_LAYERS)
        sparse_rows = unique_rows(indices, cfg.num_attention_heads, Hkv) if indices is not None else B * Hkv * min(top_k, N)
        kv = dense * full_layer + (L - dense) * sparse_rows * row
    return (weights + kv) / (bw * 1e12) * 1e3


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    headline = "fused" if any(r["step"] == "fused" for r in result["rows"]) else "hf"
    for ax, B in zip(axes, sorted({r["B"] for r in result["rows"]})[:2]):
        rows = [r for r in result["rows"] if r["B"] == B and r["step"] == headline]
        Ns = sorted({r["N"] for r in rows})
        first = [next(r for r in rows if r["N"] == n) for n in Ns]
        ax.plot([n // 1024 for n in Ns], [r["ms_full"] for r in first], "k-o", label="full (cuDNN SDPA)")
        ax.plot([n // 1024 for n in Ns], [r["ms_full_tidal"] for r in first], "k--o", label="full (decode_attention)")
        for key in sorted({(r["top_k"], r["mode"]) for r in rows}):
            sel = [next(r for r in rows if r["N"] == n and (r["top_k"], r["mode"]) == key) for n in Ns]
            ax.plot([n // 1024 for n in Ns], [r["ms_tidal"] for r in sel], marker="o", label=f"tidal k={key[0]} {key[1]}")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("ms / token (CUDA graph)")
        ax.set_title(f"Llama-3-8B arch, batch {B}, {result['card']}, step {headline}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_args(p, "2048,4096")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a small random Llama (smoke runs)")
    p.add_argument("--no-graph", action="store_true", help="eager steps instead of graph replays")
    p.add_argument("--steps-kinds", default="fused,hf", help='decode steps timed: "fused" and/or "hf" (see Decoder)')
    p.add_argument("--no-compile", action="store_true", help="the fused step's parts uncompiled")
    p.add_argument("--profile", default="1x131072,4x131072",
                   help="shapes whose k=2048 group rows get a kernel-time breakdown (torch.profiler)")
    p.add_argument("--out", default=None, help="JSON path (a PNG plot is written beside it)")
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = parse_shapes(args.shapes)
    cfg = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B), max_position_embeddings=max(n for _, n in shapes)
                      + args.steps + 8)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    bw = copy_tbps() if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, copy {bw:.2f} TB/s; model {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")

    rows = []
    profile_shapes = parse_shapes(args.profile)
    for B, N in shapes:
        if device.type == "cuda":  # 4x128K needs ~80 GB of cache: halve B where it would not fit
            need = 2 * cfg.num_hidden_layers * B * cfg.num_key_value_heads * (N + args.steps) * cfg.head_dim * 2
            if need > 0.85 * torch.cuda.mem_get_info()[0]:
                print(f"{B}x{N}: cache needs {need / 2**30:.0f} GiB, running {B // 2}x{N} instead")
                B //= 2
        dec = Decoder(model, B, N, args.steps, compile=not args.no_compile)
        FULL_ROWS["n"] = N + args.steps
        for kind in args.steps_kinds.split(","):
            dec.fused = kind == "fused"
            use(model, "full_cudnn")
            ms_full, _ = dec.ms_per_token(args.steps, not args.no_graph)
            use(model, "full_tidal")
            ms_full_tidal, _ = dec.ms_per_token(args.steps, not args.no_graph)
            print(f"== {B}x{N} step {kind}: full cuDNN {ms_full:.3f} ms/token, full decode_attention {ms_full_tidal:.3f}")
            for top_k in map(int, args.top_k.split(",")):
                for mode in args.modes.split(","):
                    use(model, "tidal", top_k, mode)
                    ms, _ = dec.ms_per_token(args.steps, not args.no_graph)
                    idx = model.tidal_state.indices
                    row = {"B": B, "N": N, "top_k": top_k, "mode": mode, "step": kind, "ms_tidal": ms,
                           "ms_full": ms_full, "ms_full_tidal": ms_full_tidal, "speedup": ms_full / ms,
                           "speedup_vs_full_tidal": ms_full_tidal / ms,
                           "floor_ms": floor_ms(cfg, B, N, bw, "tidal", top_k, idx),
                           "floor_full_ms": floor_ms(cfg, B, N, bw, "full")}
                    rows.append(row)
                    if device.type == "cuda" and (top_k, mode) == (2048, "group") and (B, N) in profile_shapes:
                        try:  # evidence only: a profiler failure must not lose the timings
                            row["profile"] = kernel_breakdown(dec)
                            use(model, "full_cudnn")
                            row["profile_full"] = kernel_breakdown(dec)
                        except Exception as e:
                            row["profile"] = f"profiler failed: {e}"
                        print(f"   profile (ms/step): tidal {row['profile']}, full {row['profile_full']}")
                    print(f"   tidal k={top_k} {mode:<5} {ms:.3f} ms/token  x{row['speedup']:.2f} vs cuDNN "
                          f"(x{row['speedup_vs_full_tidal']:.2f} vs decode_attention); floor {row['floor_ms']:.3f} "
                          f"ms, full floor {row['floor_full_ms']:.3f} ms")
        del dec
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {"card": card_name() if device.type == "cuda" else "cpu", "device": name,
              "date": str(datetime.date.today()), "torch": torch.__version__, "copy_tbps": bw,
              "model": "Llama-3-8B architecture, random weights" if not args.tiny else "tiny random Llama",
              "dtype": str(dtype).replace("torch.", ""), "select_layers": list(SELECT_LAYERS), "steps": args.steps,
              "cuda_graph": not args.no_graph and device.type == "cuda", "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        try:
            plot(result, os.path.splitext(args.out)[0] + ".png")
        except ImportError:
            print("(matplotlib missing: no plot)")
    print(f"\ne2e summary ({name}; ms/token, {'CUDA graph' if result['cuda_graph'] else 'eager'}; speedup = full cuDNN / tidal)")
    print(f"{'step':>6}{'BxN':>9}{'k':>6}{'mode':>7}{'tidal':>9}{'full':>9}{'x':>7}{'floor':>9}{'full floor':>11}")
    for r in rows:
        print(f"{r['step']:>6}{str(r['B']) + 'x' + str(r['N'] // 1024) + 'K':>9}{r['top_k']:>6}{r['mode']:>7}{r['ms_tidal']:9.3f}"
              f"{r['ms_full']:9.3f}{r['speedup']:7.2f}{r['floor_ms']:9.3f}{r['floor_full_ms']:11.3f}")


if __name__ == "__main__":
    main()
