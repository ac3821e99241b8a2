"""TorchScript deployment of a TidalDecode decoder: script and save it here, run it from C++ (run.cpp).

A small Llama-like decoder stack (per layer x = x + attn(rmsnorm(x)), q/k/v/o projections, rotary
embedding) whose attention calls torch.ops.tidal.* as the shared DecodeContext
(torch.classes.tidal.DecodeContext) says: full, select (stores the chosen positions in the context)
or sparse (reads them). The module is scripted with torch.jit.script and saved as model.pt.

Then this script runs a generation with the saved module, exactly as run.cpp will:

    ctx.begin_prefill(prompt_lens); model.prefill(prompt, k_caches, v_caches, ctx)
    every step: ctx.begin_step(); model(x_t, k_caches, v_caches, ctx)
                if ctx.correction_due(): model.correct(last S inputs, k_caches, v_caches, ctx)

and saves the inputs, the schedule and every output (prefill output, each step's output, the final
caches and selection) in data.pt: a scripted module holding them as attributes, which C++ reads
with torch::jit::load. run.cpp must reproduce every tensor bit for bit (same kernels, same inputs).

    python examples/torchscript/export.py --out build/examples/torchscript
"""
import argparse
import os
from typing import Dict, List, Optional

import torch

import tidal_ext  # noqa: F401  (registers torch.ops.tidal.* and torch.classes.tidal.*)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden, bias=False)


class TidalDecoder(torch.nn.Module):
    """Decoder stack over caller-owned KV caches (one [B, Hkv, N, D] pair per layer)."""

    def __init__(self, num_layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 rope_theta: float = 500000.0):
        super().__init__()
        self.num_layers = num_layers
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.layers = torch.nn.ModuleList(
            [Attention(hidden, heads, kv_heads, head_dim) for _ in range(num_layers)])
        inv_freq = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float())

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Llama rotary embedding of x [B, H, T, D] at positions pos [B, T] (rotate_half)."""
        angles = pos.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat([angles, angles], -1).unsqueeze(1)  # [B, 1, T, D]
        xf = x.float()
        half = self.head_dim // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
        return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)

    def _chunk(self, x: torch.Tensor, start: torch.Tensor, k_caches: List[torch.Tensor],
               v_caches: List[torch.Tensor]) -> torch.Tensor:
        """T tokens per sequence at positions start[b] + t: written into the caches, causal full
        attention (the prefill and the KV-cache correction path)."""
        B, T = x.shape[0], x.shape[1]
        pos = start.long().unsqueeze(1) + torch.arange(T, device=x.device).unsqueeze(0)
        i = 0
        for layer in self.layers:
            h = rms_norm(x)
            q = self.rope(layer.q_proj(h).view(B, T, self.heads, self.head_dim).transpose(1, 2), pos)
            k = self.rope(layer.k_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2), pos)
            v = layer.v_proj(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            o = torch.ops.tidal.correct_kv_attention(q, k, v, k_caches[i], v_caches[i], start, None)
            x = x + layer.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
            i += 1
        return x

    @torch.jit.export
    def prefill(self, x: torch.Tensor, k_caches: List[torch.Tensor], v_caches: List[torch.Tensor],
                ctx: torch.classes.tidal.DecodeContext) -> torch.Tensor:
        """Prompt x [B, T, hidden] (right-padded; real lengths in ctx) -> [B, T, hidden]."""
        start = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
        return self._chunk(x, start, k_caches, v_caches)

    @torch.jit.export
    def correct(self, x: torch.Tensor, k_caches: List[torch.Tensor], v_caches: List[torch.Tensor],
                ctx: torch.classes.tidal.DecodeContext) -> torch.Tensor:
        """KV-cache correction: the last S tokens' inputs x [B, S, hidden] again, full attention."""
        return self._chunk(x, ctx.correction_start(x.shape[1]), k_caches, v_caches)

    def forward(self, x: torch.Tensor, k_caches: List[torch.Tensor], v_caches: List[torch.Tensor],
                ctx: torch.classes.tidal.DecodeContext) -> torch.Tensor:
        """One decode step (after ctx.begin_step()): x [B, hidden] -> [B, hidden]."""
        B = x.shape[0]
        lens = ctx.seq_lens()
        pos = ctx.positions()
        pos2 = pos.long().unsqueeze(1)  # [B, 1]
        slot = pos.long().view(B, 1, 1, 1).expand(B, self.kv_heads, 1, self.head_dim)
        i = 0
        for layer in self.layers:
            h = rms_norm(x).unsqueeze(1)
            q = self.rope(layer.q_proj(h).view(B, 1, self.heads, self.head_dim).transpose(1, 2), pos2)
            k = self.rope(layer.k_proj(h).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2), pos2)
            v = layer.v_proj(h).view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            # the new token's K/V at its own position in each sequence (device indices, no sync)
            k_caches[i].scatter_(2, slot, k)
            v_caches[i].scatter_(2, slot, v)
            q = q.squeeze(2)
            role = ctx.role(i)
            if role == "full":
                o = torch.ops.tidal.decode_attention(q, k_caches[i], v_caches[i], lens, None)
            elif role == "select":
                o, indices = torch.ops.tidal.select_attention(
                    q, k_caches[i], v_caches[i], lens, ctx.top_k(), ctx.mode(), ctx.sink(), ctx.recent(), None)
                ctx.set_indices(indices)
            else:
                o = torch.ops.tidal.sparse_attention(q, k_caches[i], v_caches[i], ctx.indices(), lens, None)
            x = x + layer.o_proj(o.reshape(B, self.heads * self.head_dim))
            i += 1
        return x

    @torch.jit.export
    def make_context(self, top_k: int, select_layers: List[int], mode: str, sink: int, recent: int,
                     correction_stride: int) -> torch.classes.tidal.DecodeContext:
        """A DecodeContext for this model, built inside TorchScript (a C++ caller needs no tidal header)."""
        config = torch.classes.tidal.TidalConfig(top_k, select_layers, mode, sink, recent, correction_stride)
        return torch.classes.tidal.DecodeContext(config, self.num_layers)


class Blob(torch.nn.Module):
    """Tensors and settings as attributes of a scripted module: readable from C++ with torch::jit::load."""

    def __init__(self, tensors: Dict[str, torch.Tensor], ints: Dict[str, int], int_lists: Dict[str, List[int]],
                 strings: Dict[str, str]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous())
        for table in (ints, int_lists, strings):
            for name, value in table.items():
                setattr(self, name, value)

    def forward(self) -> int:
        return 0


def generate(model, ctx, prompt, prompt_lens, xs, k_caches, v_caches, correction_stride: int):
    """The decode loop of run.cpp: prefill, then one step per row of xs [steps, B, hidden]."""
    ctx.begin_prefill(prompt_lens)
    prefill_out = model.prefill(prompt, k_caches, v_caches, ctx)
    outs = []
    for t in range(xs.shape[0]):
        ctx.begin_step()
        outs.append(model(xs[t], k_caches, v_caches, ctx))
        if ctx.correction_due():
            S = correction_stride
            model.correct(xs[t - S + 1:t + 1].transpose(0, 1), k_caches, v_caches, ctx)
    return prefill_out, torch.stack(outs)


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="build/examples/torchscript", help="folder for model.pt and data.pt")
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--context", type=int, default=1536, help="prompt length (the longest sequence)")
    p.add_argument("--batch", type=int, default=2, help="sequence b has context - 37*b prompt tokens")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--select-layers", default="1,3")
    p.add_argument("--mode", default="head", choices=["head", "group"])
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=8)
    p.add_argument("--correction-stride", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    # One thread here and in ts_run (it reads num_threads from data.pt): many-threaded BLAS may
    # split a GEMM's reduction differently from one run to the next (seen on a 16-core machine),
    # and the check is bit equality.
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    select_layers = [int(s) for s in args.select_layers.split(",") if s]
    os.makedirs(args.out, exist_ok=True)

    # 1. Script and save the model (random weights, scaled so attention is not uniform).
    model = TidalDecoder(args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim)
    with torch.no_grad():
        for layer in model.layers:
            layer.q_proj.weight.mul_(4.0)
            layer.k_proj.weight.mul_(4.0)
    model = model.to(dtype).eval()
    model_path = os.path.join(args.out, "model.pt")
    torch.jit.script(model).save(model_path)

    # 2. A generation with the saved module, as C++ will run it.
    loaded = torch.jit.load(model_path)
    B, T, H = args.batch, args.context, args.hidden
    capacity = T + args.steps
    prompt = torch.randn(B, T, H, dtype=dtype)
    prompt_lens = torch.tensor([T - 37 * b for b in range(B)], dtype=torch.int32)
    xs = torch.randn(args.steps, B, H, dtype=dtype)
    k_caches = [torch.zeros(B, args.kv_heads, capacity, args.head_dim, dtype=dtype) for _ in range(args.layers)]
    v_caches = [torch.zeros_like(k) for k in k_caches]
    config = tidal_ext.TidalConfig(top_k=args.top_k, select_layers=tuple(select_layers), mode=args.mode,
                                   sink=args.sink, recent=args.recent, correction_stride=args.correction_stride)
    ctx = tidal_ext.DecodeContext(config, args.layers)
    with torch.no_grad():
        prefill_out, outs = generate(loaded, ctx, prompt, prompt_lens, xs, k_caches, v_caches,
                                     args.correction_stride)
    indices = ctx.indices() if ctx.has_indices() else torch.empty(0, dtype=torch.int32)
    roles = [ctx.role(i) for i in range(args.layers)]

    # 3. Inputs and expected outputs for C++.
    blob = Blob(
        tensors=dict(prompt=prompt, prompt_lens=prompt_lens, xs=xs, expected_prefill=prefill_out,
                     expected_steps=outs, expected_k_caches=torch.stack(k_caches),
                     expected_v_caches=torch.stack(v_caches), expected_indices=indices),
        ints=dict(num_layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim, capacity=capacity,
                  top_k=args.top_k, sink=args.sink, recent=args.recent, correction_stride=args.correction_stride,
                  num_threads=torch.get_num_threads()),
        int_lists=dict(select_layers=select_layers),
        strings=dict(mode=args.mode),
    )
    data_path = os.path.join(args.out, "data.pt")
    torch.jit.script(blob).save(data_path)

    print(f"export: {model_path} ({args.layers} layers, roles during decode: {', '.join(roles)}), "
          f"{data_path} (B={B}, prompt lengths {prompt_lens.tolist()}, {args.steps} steps, "
          f"top_k {args.top_k}, correction every {args.correction_stride} steps, {args.dtype})")


if __name__ == "__main__":
    main()
