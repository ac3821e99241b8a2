"""Pure-PyTorch reference of the four ``tidal`` operators.

Written from the operator semantics (``include/tidal/ops.h``), not from any kernel, and meant to
be read: one batch row at a time, vectorized over heads and tokens. Every function upcasts its
inputs to ``compute_dtype`` (float64 by default), does all math in it and returns the result in
``compute_dtype`` so tests can measure the error of a kernel against it. Indices are int32.

Shapes (as the ops): B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv query heads share KV
head ``h // G``), D head dim, N cache capacity.

    q                [B, Hq, D]          one decode query per sequence
    k_cache/v_cache  [B, Hkv, N, D]      any strides
    seq_lens         int [B] or None     tokens 0..seq_lens[b]-1 are valid (None: N everywhere)
    scale            None -> 1/sqrt(D)

The reference never touches cache positions an operator must not read (positions >= seq_len,
positions not listed in ``indices``, positions after a query's causal limit), so tests can fill
those with NaN and still compare against it.

This module only needs torch; it does not load the compiled operator library.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "decode_attention",
    "select_attention",
    "sparse_attention",
    "correct_kv_attention",
    "selection_scores",
    "forced_positions",
    "select_indices",
    "MAX_TOP_K",
]

# Largest top_k the ops accept (tidal::kMaxTopK).
MAX_TOP_K = 1 << 20


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _resolve_scale(scale: Optional[float], D: int) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
    if q.dim() not in (3, 4) or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"reference: bad shapes q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
            f"v_cache {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    _, Hkv, N, Dk = k_cache.shape
    if k_cache.shape[0] != B or Dk != D or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"reference: q {tuple(q.shape)} does not match k_cache {tuple(k_cache.shape)}")
    return B, Hq, Hkv, N, D


def _lengths(seq_lens: Optional[torch.Tensor], B: int, N: int) -> list:
    """seq_lens as a Python list of ints (None -> N for every row)."""
    if seq_lens is None:
        return [N] * B
    lens = [int(x) for x in seq_lens.reshape(-1).tolist()]
    if len(lens) != B or any(L < 0 or L > N for L in lens):
        raise ValueError(f"reference: seq_lens {lens} must have {B} entries in [0, {N}]")
    return lens


def _per_query_head(cache_rows: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """[Hkv, L, D] cache rows of one sequence -> [Hq, L, D]: query head h sees KV head h // G."""
    return cache_rows.to(dtype).repeat_interleave(G, dim=0)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention per head. q [H, D], k/v [H, L, D], valid bool [H, L] (None: all valid).

    Rows without any valid key give zeros. Invalid keys/values must already be finite (callers
    replace them) so that they cannot leak NaN into the result.
    """
    s = scale * torch.einsum("hd,hld->hl", q, k)
    if valid is None:
        p = torch.softmax(s, dim=-1)
    else:
        s = s.masked_fill(~valid, -math.inf)
        p = torch.softmax(s, dim=-1)
        p = torch.where(valid.any(dim=-1, keepdim=True), p, torch.zeros_like(p))
    return torch.einsum("hl,hld->hd", p, v)


def _check_budget(top_k: int, sink: int, recent: int, mode: str) -> None:
    if mode not in ("head", "group"):
        raise ValueError(f"reference: mode must be 'head' or 'group', got {mode!r}")
    if top_k < 1 or top_k > MAX_TOP_K:
        raise ValueError(f"reference: top_k must be in [1, {MAX_TOP_K}], got {top_k}")
    if sink < 0 or recent < 0 or sink + max(recent, 1) > top_k:
        raise ValueError(f"reference: need sink, recent >= 0 and sink + max(recent, 1) <= top_k, "
                         f"got sink={sink}, recent={recent}, top_k={top_k}")


# ----------------------------------------------------------------------------------------------
# decode_attention
# ----------------------------------------------------------------------------------------------
def decode_attention(q, k_cache, v_cache, seq_lens=None, scale=None, *,
                     compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full attention of q [B, Hq, D] over tokens 0..seq_lens[b]-1 -> [B, Hq, D] (compute_dtype).

    A row with seq_len 0 gives zeros.
    """
    B, Hq, Hkv, N, D = _shapes(q, k_cache, v_cache)
    G = Hq // Hkv
    scale = _resolve_scale(scale, D)
    out = torch.zeros((B, Hq, D), dtype=compute_dtype, device=q.device)
    for b, L in enumerate(_lengths(seq_lens, B, N)):
        if L == 0:
            continue
        k = _per_query_head(k_cache[b, :, :L], G, compute_dtype)  # [Hq, L, D]
        v = _per_query_head(v_cache[b, :, :L], G, compute_dtype)
        out[b] = _attend(q[b].to(compute_dtype), k, v, scale)
    return out


# ----------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------
def selection_scores(q, k_cache, seq_lens=None, mode: str = "head", scale=None, *,
                     compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The scores select_attention ranks tokens by -> [B, Hsel, N] (compute_dtype).

    head  (Hsel = Hq):  s_h(t) = scale * q_h . k_t
    group (Hsel = Hkv): for KV head g, max over its query heads h of s_h(t) - logsumexp_t' s_h(t')
                        (t' over the valid tokens): the largest log-probability any head of the
                        group gives token t.
    Positions >= seq_len are -inf.
    """
    if mode not in ("head", "group"):
        raise ValueError(f"reference: mode must be 'head' or 'group', got {mode!r}")
    B, Hq, Hkv, N, D = _shapes(q, k_cache, k_cache)
    G = Hq // Hkv
    scale = _resolve_scale(scale, D)
    Hsel = Hq if mode == "head" else Hkv
    scores = torch.full((B, Hsel, N), -math.inf, dtype=compute_dtype, device=q.device)
    for b, L in enumerate(_lengths(seq_lens, B, N)):
        if L == 0:
            continue
        k = _per_query_head(k_cache[b, :, :L], G, compute_dtype)  # [Hq, L, D]
        s = scale * torch.einsum("hd,hld->hl", q[b].to(compute_dtype), k)  # [Hq, L]
        if mode == "head":
            scores[b, :, :L] = s
        else:
            log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
            scores[b, :, :L] = log_p.view(Hkv, G, L).amax(dim=1)
    return scores


def forced_positions(L: int, top_k: int, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """Positions always selected for a sequence of length L > top_k (ascending, int64).

    The newest token L-1, the first `sink` tokens and the last `recent` tokens. (When L <= top_k
    every valid token is selected anyway.)
    """
    forced = torch.zeros(L, dtype=torch.bool)
    if L > 0:
        forced[L - 1] = True
        forced[: min(sink, L)] = True
        if recent > 0:
            forced[max(L - recent, 0):] = True
    return forced.nonzero().flatten()


def _rank_descending(s: torch.Tensor) -> torch.Tensor:
    """Per row of s [H, C]: column order by descending score; NaN first; ties keep column order."""
    is_nan = torch.isnan(s)
    by_value = torch.argsort(torch.where(is_nan, torch.zeros_like(s), s), dim=1, descending=True,
                             stable=True)
    nan_first = torch.argsort(is_nan.gather(1, by_value).to(torch.int8), dim=1, descending=True,
                              stable=True)
    return by_value.gather(1, nan_first)


def _select_row(scores: torch.Tensor, L: int, top_k: int, sink: int, recent: int) -> torch.Tensor:
    """Indices [H, top_k] (int64, -1 padded) of one sequence from its scores [H, >= L]."""
    H = scores.shape[0]
    idx = torch.full((H, top_k), -1, dtype=torch.long)
    if L <= top_k:  # every valid token (also covers L == 0: all -1)
        idx[:, :L] = torch.arange(L)
        return idx
    forced = forced_positions(L, top_k, sink, recent)
    is_forced = torch.zeros(L, dtype=torch.bool)
    is_forced[forced] = True
    candidates = (~is_forced).nonzero().flatten()  # ascending, so ties prefer lower positions
    budget = top_k - forced.numel()
    order = _rank_descending(scores[:, candidates])[:, :budget]
    chosen = candidates[order]  # [H, budget]
    selected = torch.cat([forced.expand(H, -1), chosen], dim=1)
    return selected.sort(dim=1).values


def select_indices(scores: torch.Tensor, seq_lens=None, top_k: int = 2048, sink: int = 0,
                   recent: int = 0) -> torch.Tensor:
    """Top-k selection from precomputed scores [B, Hsel, N] -> int32 [B, Hsel, top_k]."""
    _check_budget(top_k, sink, recent, "head")
    B, H, N = scores.shape
    device = scores.device
    scores = scores.cpu()
    out = torch.empty((B, H, top_k), dtype=torch.int32)
    for b, L in enumerate(_lengths(seq_lens, B, N)):
        out[b] = _select_row(scores[b, :, :L], L, top_k, sink, recent).to(torch.int32)
    return out.to(device)


def select_attention(q, k_cache, v_cache, seq_lens=None, top_k: int = 2048, mode: str = "head",
                     sink: int = 0, recent: int = 0, scale=None, *,
                     compute_dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(decode_attention output, indices int32 [B, Hsel, top_k]).

    Per sequence of length L and per selection row (query head in "head" mode, KV head in
    "group" mode; scores as in `selection_scores`):
      * L <= top_k: every valid token 0..L-1.
      * otherwise: the forced tokens (newest L-1, first `sink`, last `recent`), counted inside the
        budget, plus the highest-scoring other valid tokens up to top_k in total; equal scores
        prefer the lower position, NaN ranks above every number.
    Rows are sorted ascending, unused slots are -1 at the end; seq_len 0 gives all -1.
    """
    _check_budget(top_k, sink, recent, mode)
    out = decode_attention(q, k_cache, v_cache, seq_lens, scale, compute_dtype=compute_dtype)
    scores = selection_scores(q, k_cache, seq_lens, mode, scale, compute_dtype=compute_dtype)
    return out, select_indices(scores, seq_lens, top_k, sink, recent)


# ----------------------------------------------------------------------------------------------
# sparse_attention
# ----------------------------------------------------------------------------------------------
def sparse_attention(q, k_cache, v_cache, indices, seq_lens=None, scale=None, *,
                     compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Attention of q over exactly the positions listed in indices [B, Hsel, K] -> [B, Hq, D].

    Hsel == Hq: query head h uses row h; Hsel == Hkv: query head h uses row h // G. Entries < 0
    or >= seq_len are skipped (never read); a position listed twice counts twice. A row with no
    valid entry gives zeros.
    """
    B, Hq, Hkv, N, D = _shapes(q, k_cache, v_cache)
    G = Hq // Hkv
    scale = _resolve_scale(scale, D)
    if indices.dim() != 3 or indices.shape[0] != B or indices.shape[1] not in (Hq, Hkv):
        raise ValueError(f"reference: indices {tuple(indices.shape)} must be [B, Hq or Hkv, K]")
    heads = torch.arange(Hq, device=q.device)
    kv_head = heads // G                                       # KV head of each query head
    row = heads if indices.shape[1] == Hq else kv_head         # index row of each query head
    out = torch.zeros((B, Hq, D), dtype=compute_dtype, device=q.device)
    for b, L in enumerate(_lengths(seq_lens, B, N)):
        if L == 0:
            continue
        pos = indices[b].to(torch.long)[row]                   # [Hq, K]
        valid = (pos >= 0) & (pos < L)
        safe = torch.where(valid, pos, torch.zeros_like(pos))  # position 0 exists since L > 0
        k = k_cache[b][kv_head[:, None], safe].to(compute_dtype)  # [Hq, K, D]
        v = v_cache[b][kv_head[:, None], safe].to(compute_dtype)
        zero = torch.zeros((), dtype=compute_dtype, device=q.device)
        k = torch.where(valid[..., None], k, zero)  # what a kernel must never read is never used
        v = torch.where(valid[..., None], v, zero)
        out[b] = _attend(q[b].to(compute_dtype), k, v, scale, valid)
    return out


# ----------------------------------------------------------------------------------------------
# correct_kv_attention
# ----------------------------------------------------------------------------------------------
def correct_kv_attention(q, k, v, k_cache, v_cache, start, scale=None, *,
                         compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """KV-cache correction / chunked-prefill step; mutates k_cache and v_cache like the op.

    q [B, Hq, S, D]; k, v [B, Hkv, S, D]; start int [B]. Writes k, v into the caches at positions
    start[b]..start[b]+S-1 (in the caches' dtype), then query i attends causally to positions
    0..start[b]+i of the updated cache. Returns [B, Hq, S, D] in compute_dtype.
    """
    B, Hq, Hkv, N, D = _shapes(q, k_cache, v_cache)
    S = q.shape[2]
    G = Hq // Hkv
    scale = _resolve_scale(scale, D)
    if k.shape != (B, Hkv, S, D) or v.shape != k.shape:
        raise ValueError(f"reference: k {tuple(k.shape)}, v {tuple(v.shape)} must be {(B, Hkv, S, D)}")
    starts = [int(x) for x in start.reshape(-1).tolist()]
    if len(starts) != B or any(st < 0 or st + S > N for st in starts):
        raise ValueError(f"reference: start {starts} must have {B} entries with 0 <= start, start + {S} <= {N}")

    with torch.no_grad():
        for b, st in enumerate(starts):  # 1) write the fresh rows
            k_cache[b, :, st:st + S] = k[b]
            v_cache[b, :, st:st + S] = v[b]

    out = torch.zeros((B, Hq, S, D), dtype=compute_dtype, device=q.device)
    for b, st in enumerate(starts):  # 2) causal attention over the updated cache
        T = st + S  # positions 0..st+S-1 are the only ones any query of this row may read
        kk = _per_query_head(k_cache[b, :, :T], G, compute_dtype)  # [Hq, T, D]
        vv = _per_query_head(v_cache[b, :, :T], G, compute_dtype)
        s = scale * torch.einsum("hsd,htd->hst", q[b].to(compute_dtype), kk)  # [Hq, S, T]
        limit = st + torch.arange(S, device=q.device)                           # query i sees 0..st+i
        allowed = torch.arange(T, device=q.device)[None, :] <= limit[:, None]   # [S, T]
        p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
        out[b] = torch.einsum("hst,htd->hsd", p, vv)
    return out
