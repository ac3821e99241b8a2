"""Shared helpers of the python tests: reference loading, input builders, baselines, checks."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_reference():
    """tidal_ext/reference.py loaded by path: the reference is pure PyTorch and must be testable
    without the compiled operator library (importing the tidal_ext package loads it)."""
    name = "_tidal_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tidal_ext", "reference.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


ref = load_reference()

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAME = {v: k for k, v in DTYPES.items()}


def skip_unsupported(device, dtype):
    """CUDA kernels support fp16/bf16 only (DESIGN.md section 3)."""
    if device == "cuda" and dtype == torch.float32:
        import pytest
        pytest.skip("float32 is CPU-only on CUDA")


def floor_for(dtype: torch.dtype) -> float:
    """Additive floor of the accuracy criterion err_op <= 2 * err_baseline + floor.

    The baseline (plain PyTorch SDPA in the same dtype) can be exact or nearly so by luck on small
    cases (e.g. seq_len 1: the output is v itself), which would make 2 * err_baseline ~ 0 and
    reject a kernel whose only difference is a different but equally valid rounding order. The floor
    sits well below one unit of the dtype's output rounding (fp32 eps 1.2e-7 * sqrt-growth;
    fp16 eps 9.8e-4, bf16 eps 7.8e-3) so it cannot hide a real error.
    """
    return 1e-6 if dtype == torch.float32 else 1e-4


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute norm when ref is all zero). NaN stays NaN."""
    out = out.detach().to("cpu", torch.float64)
    ref64 = ref64.detach().to("cpu", torch.float64)
    num = torch.linalg.vector_norm(out - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    return num / den if den > 0 else num


def assert_accurate(out, ref64, base, dtype, what: str):
    """err(out) <= 2 * err(baseline) + floor, plus: no NaN where the reference is finite."""
    out_c = out.detach().cpu().double()
    ref_c = ref64.detach().cpu().double()
    bad = torch.isfinite(ref_c) & ~torch.isfinite(out_c)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite outputs where the reference is finite " \
                          f"(first at {bad.nonzero()[0].tolist()})"
    e_op = rel_err(out, ref64)
    e_base = rel_err(base, ref64)
    bound = 2 * e_base + floor_for(dtype)
    assert e_op <= bound, f"{what}: err {e_op:.3e} > 2 * baseline err {e_base:.3e} + floor = {bound:.3e}"
    return e_op, e_base


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view for bit-exact comparison (NaN == NaN)."""
    int_of = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().cpu().contiguous().view(int_of[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{what}: {int(diff.sum())} elements changed (first at {diff.nonzero()[0].tolist()})"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
LAYOUTS = ("contig", "sliced", "bshd")


def make_cache(B, Hkv, N, D, dtype, layout, device, pad=5):
    """A [B, Hkv, N, D] cache (last dim contiguous) and the buffer it is a view of.

    contig: a plain tensor. sliced: big[1:1+B, :, pad:pad+N, :] of a bigger [B+2, Hkv, N+2*pad+1, D]
    buffer. bshd: the transposed view of a [B, N, Hkv, D] buffer (vLLM/FlashInfer-like layout).
    The whole buffer is random, so regions outside the view are finite garbage.
    """
    if layout == "contig":
        buf = torch.randn(B, Hkv, N, D).to(dtype).to(device)
        view = buf
    elif layout == "sliced":
        buf = torch.randn(B + 2, Hkv, N + 2 * pad + 1, D).to(dtype).to(device)
        view = buf[1:1 + B, :, pad:pad + N, :]
    elif layout == "bshd":
        buf = torch.randn(B, N, Hkv, D).to(dtype).to(device)
        view = buf.transpose(1, 2)
    else:
        raise ValueError(layout)
    assert view.shape == (B, Hkv, N, D) and view.stride(3) == 1
    return view, buf


def make_q(B, Hq, D, dtype, device, strided=False):
    """q [B, Hq, D]; strided: a non-contiguous view ([Hq, B, D] buffer permuted)."""
    if strided:
        return torch.randn(Hq, B, D).to(dtype).to(device).transpose(0, 1)
    return torch.randn(B, Hq, D).to(dtype).to(device)


def lens_tensor(lens: Optional[Sequence[int]], device):
    return None if lens is None else torch.tensor(list(lens), dtype=torch.int32, device=device)


def lens_list(lens, B, N):
    return [N] * B if lens is None else list(lens)


def poison_beyond(cache: torch.Tensor, lens, value=float("nan")):
    """Fill positions >= seq_len of every row with `value` (in place); returns cache."""
    B, _, N, _ = cache.shape
    for b, L in enumerate(lens_list(lens, B, N)):
        cache[b, :, L:] = value
    return cache


def expand_kv(t: torch.Tensor, G: int) -> torch.Tensor:
    return t.repeat_interleave(G, dim=1)


# ------------------------------------------------------------------------------------------------
# baselines: plain PyTorch SDPA on the native-dtype inputs with a boolean mask
# ------------------------------------------------------------------------------------------------
def _sdpa(q4, k, v, mask, scale):
    """q4 [B,Hq,S,D]; k/v [B,Hkv,N,D]; mask bool [B,Hq,S,N]. Fully masked rows -> 0."""
    G = q4.shape[1] // k.shape[1]
    kk, vv = expand_kv(k, G), expand_kv(v, G)
    out = F.scaled_dot_product_attention(q4, kk, vv, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


def baseline_decode(q, k_cache, v_cache, lens, scale=None):
    B, Hq, D = q.shape
    N = k_cache.shape[2]
    L = torch.tensor(lens_list(lens, B, N), device=q.device)
    mask = torch.arange(N, device=q.device)[None, :] < L[:, None]  # [B, N]
    mask = mask[:, None, None, :].expand(B, Hq, 1, N)
    return _sdpa(q[:, :, None, :], k_cache, v_cache, mask, scale)[:, :, 0]


def indices_mask(indices, lens, B, Hq, Hkv, N, device):
    """Bool [B, Hq, N]: which positions each query head attends through `indices` (valid only).

    A set mask cannot express duplicate listings; callers use it only for duplicate-free indices.
    """
    G = Hq // Hkv
    idx = indices.to(device=device, dtype=torch.long)
    if idx.shape[1] != Hq:
        idx = idx.repeat_interleave(G, dim=1)
    L = torch.tensor(lens_list(lens, B, N), device=device)
    valid = (idx >= 0) & (idx < L[:, None, None])
    mask = torch.zeros(B, Hq, N + 1, dtype=torch.bool, device=device)
    mask.scatter_(2, torch.where(valid, idx, torch.full_like(idx, N)), True)
    return mask[:, :, :N]


def baseline_sparse(q, k_cache, v_cache, indices, lens, scale=None):
    B, Hq, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    mask = indices_mask(indices, lens, B, Hq, Hkv, N, q.device)[:, :, None, :]
    return _sdpa(q[:, :, None, :], k_cache, v_cache, mask, scale)[:, :, 0]


def baseline_correct(q, k_cache_after, v_cache_after, start, scale=None):
    B, Hq, S, D = q.shape
    N = k_cache_after.shape[2]
    st = start.to(device=q.device, dtype=torch.long)
    limit = st[:, None] + torch.arange(S, device=q.device)[None, :]       # [B, S]
    mask = torch.arange(N, device=q.device)[None, None, :] <= limit[:, :, None]  # [B, S, N]
    mask = mask[:, None].expand(B, Hq, S, N)
    return _sdpa(q, k_cache_after, v_cache_after, mask, scale)


# ------------------------------------------------------------------------------------------------
# selection check (tie-aware)
# ------------------------------------------------------------------------------------------------
def check_selection(idx_op, idx_ref, scores, lens, top_k, sink, recent, rel_tol, what=""):
    """Compares kernel indices with reference indices, allowing swaps among near-tied scores.

    Per row: int32, shape equal; the same number of valid entries; strictly ascending valid
    positions in [0, L) followed by -1 only; every forced position present; every position in the
    symmetric difference has a reference score within rel_tol * (1 + |cutoff|) of the cutoff (the
    lowest reference score among the reference's selected non-forced positions).
    """
    assert idx_op.dtype == torch.int32, f"{what}: indices dtype {idx_op.dtype}"
    assert idx_op.shape == idx_ref.shape, f"{what}: indices shape {tuple(idx_op.shape)} vs {tuple(idx_ref.shape)}"
    idx_op = idx_op.cpu().long()
    idx_ref = idx_ref.cpu().long()
    scores = scores.cpu()
    B, H, K = idx_op.shape
    N = scores.shape[2]
    for b, L in enumerate(lens_list(lens, B, N)):
        forced = ref.forced_positions(L, top_k, sink, recent) if L > top_k else torch.arange(L)
        forced_set = set(forced.tolist())
        for h in range(H):
            where = f"{what} row b={b} h={h} (L={L}, top_k={top_k}, sink={sink}, recent={recent})"
            row, rrow = idx_op[b, h], idx_ref[b, h]
            n_op, n_ref = int((row >= 0).sum()), int((rrow >= 0).sum())
            assert n_op == n_ref == min(L, top_k), f"{where}: {n_op} valid entries, expected {n_ref}: {row.tolist()}"
            head, tail = row[:n_op], row[n_op:]
            assert (tail == -1).all(), f"{where}: padding is not all -1 after the valid entries: {row.tolist()}"
            assert ((head >= 0) & (head < L)).all(), f"{where}: position out of [0, L): {row.tolist()}"
            assert (head[1:] > head[:-1]).all(), f"{where}: not strictly ascending: {row.tolist()}"
            got, exp = set(head.tolist()), set(rrow[:n_ref].tolist())
            missing = forced_set - got
            assert not missing, f"{where}: forced positions {sorted(missing)} missing"
            diff = got ^ exp
            if not diff:
                continue
            free = sorted(exp - forced_set)
            assert free, f"{where}: differs {sorted(diff)} though every selected position is forced"
            s = scores[b, h]
            cutoff = s[free].min().item()
            tol = rel_tol * (1 + abs(cutoff))
            for p in diff:
                sp = s[p].item()
                assert abs(sp - cutoff) <= tol, (
                    f"{where}: position {p} {'extra' if p in got else 'missing'} with score {sp:.6g}, "
                    f"cutoff {cutoff:.6g} (tol {tol:.2g})")


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    D: int
    dtype: str
    mode: str
    sink: int
    recent: int
    layout: str
    N: int
    top_k: int
    lens: Optional[tuple]  # None: seq_lens=None
    S: int = 3             # correct_kv_attention chunk length
    q_strided: bool = False
    v_layout: Optional[str] = None  # None: same as layout

    @property
    def v_layout_(self):
        return self.v_layout or self.layout

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def id(self):
        lens = "none" if self.lens is None else ",".join(map(str, self.lens))
        sr = f"s{self.sink}r{self.recent}"
        qs = "-qstrided" if self.q_strided else ""
        vl = f"+v{self.v_layout}" if self.v_layout and self.v_layout != self.layout else ""
        return (f"B{self.B}-h{self.Hq}x{self.Hkv}-d{self.D}-{self.dtype}-{self.mode}-{sr}-"
                f"{self.layout}{vl}{qs}-N{self.N}-k{self.top_k}-L[{lens}]")


def _case(B, heads, D, dtype, mode, sink_recent, layout, N, top_k, lens, S=3, q_strided=False, v_layout=None):
    """lens: symbols resolved against top_k and N: '1', 'lt' (< top_k), 'eq' (== top_k),
    'gt' (top_k + 1), 'N' (the capacity, >> top_k), 'N-1', '0' (padding slot); None = seq_lens None."""
    sym = {"0": 0, "1": 1, "lt": max(2, top_k // 2 + 1), "eq": top_k, "gt": top_k + 1, "N": N, "N-1": N - 1}
    lv = None if lens is None else tuple(sym[x] for x in lens)
    return Case(B, heads[0], heads[1], D, dtype, mode, sink_recent[0], sink_recent[1], layout, N, top_k, lv,
                S, q_strided, v_layout)


# A structured subset of the cartesian product (every value of every axis appears; GQA shapes meet
# both modes and every dtype; lengths 1, < top_k, == top_k, == top_k + 1, >> top_k, 0, unequal
# within a batch and seq_lens None).
SWEEP: List[Case] = [
    _case(1, (4, 4), 64, "f32", "head", (0, 0), "contig", 256, 32, ["N"], S=1),
    _case(1, (8, 2), 128, "f16", "group", (0, 0), "sliced", 300, 64, ["eq"], S=4),
    _case(1, (9, 3), 64, "bf16", "head", (4, 8), "bshd", 200, 32, ["lt"], S=2, q_strided=True),
    _case(1, (32, 8), 128, "f32", "group", (2, 0), "contig", 600, 128, ["N"], S=5),
    _case(1, (4, 4), 128, "bf16", "group", (0, 6), "sliced", 512, 64, ["1"], S=1),
    _case(1, (8, 2), 64, "f32", "head", (4, 4), "bshd", 400, 16, ["N"], S=7),
    _case(1, (9, 3), 128, "f16", "group", (3, 5), "contig", 128, 128, ["N"], S=3),
    _case(1, (32, 8), 64, "f16", "head", (0, 0), "sliced", 64, 16, None, S=2),
    _case(1, (8, 2), 128, "bf16", "head", (0, 1), "contig", 256, 32, ["gt"], S=1),
    _case(3, (4, 4), 64, "f16", "head", (2, 2), "contig", 300, 32, ["1", "lt", "N"], S=3),
    _case(3, (8, 2), 64, "bf16", "group", (0, 0), "bshd", 256, 64, ["N", "eq", "gt"], S=2, q_strided=True),
    _case(3, (9, 3), 128, "f32", "group", (4, 0), "sliced", 400, 32, ["gt", "1", "N"], S=4),
    _case(3, (32, 8), 64, "bf16", "head", (0, 8), "bshd", 256, 64, ["eq", "N", "lt"], S=1),
    _case(3, (4, 4), 128, "f32", "group", (1, 1), "bshd", 200, 16, ["0", "N", "eq"], S=6),
    _case(3, (8, 2), 128, "f32", "head", (0, 0), "contig", 128, 32, None, S=8),
    _case(3, (9, 3), 64, "f16", "head", (0, 4), "bshd", 600, 128, ["N", "0", "lt"], S=2),
    _case(3, (32, 8), 128, "f16", "group", (8, 8), "sliced", 300, 64, ["lt", "gt", "1"], S=3),
    _case(3, (4, 4), 64, "bf16", "head", (0, 0), "sliced", 96, 16, ["N", "N-1", "1"], S=5),
    _case(3, (32, 8), 128, "bf16", "group", (0, 16), "contig", 512, 128, ["N", "eq", "0"], S=4),
    _case(3, (8, 2), 64, "f32", "group", (5, 3), "contig", 160, 16, ["N", "N-1", "gt"], S=2, q_strided=True),
]



def _grid():
    """Every (heads, dtype, mode) combination once, the other axes rotating (k and v caches in
    different layouts, so a kernel mixing up their strides shows)."""
    heads = [(4, 4), (8, 2), (9, 3), (32, 8)]
    budgets = [(0, 0), (2, 0), (0, 3), (4, 4), (1, 1)]
    lens_b1 = [["N"], ["lt"], ["eq"], ["gt"], ["1"]]
    lens_b3 = [["N", "lt", "1"], ["eq", "0", "N"], ["gt", "N", "eq"], ["1", "N-1", "lt"]]
    out, i = [], 0
    for h in heads:
        for dtype in ("f32", "f16", "bf16"):
            for mode in ("head", "group"):
                B = (1, 3)[(i + i // 6) % 2]  # both batch sizes meet both modes
                top_k = (16, 24, 48)[i % 3]
                N = top_k * (4 + i % 4)
                lens = lens_b1[i % 5] if B == 1 else lens_b3[i % 4]
                out.append(_case(B, h, (64, 128)[(i // 2) % 2], dtype, mode, budgets[i % 5], LAYOUTS[i % 3], N,
                                 top_k, lens, S=1 + i % 6, q_strided=i % 4 == 1, v_layout=LAYOUTS[(i + 1) % 3]))
                i += 1
    return out


SWEEP += _grid()

# Bigger shapes (N ~ 2K, Llama-like heads), marked slow (deselect with -m "not slow").
SLOW_SWEEP: List[Case] = [
    _case(3, (32, 8), 128, "bf16", "head", (4, 16), "bshd", 2048, 256, ["N", "N-1", "lt"], S=16),
    _case(3, (32, 8), 128, "f16", "group", (0, 0), "sliced", 2048, 512, ["N", "eq", "1"], S=8),
    _case(1, (32, 32), 64, "f32", "head", (0, 0), "contig", 2000, 2048, ["N"], S=4),
]
