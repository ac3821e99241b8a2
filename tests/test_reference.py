"""Tests of tidal_ext/reference.py itself (no compiled ops needed).

The attention outputs are checked against F.scaled_dot_product_attention in float64 with boolean
masks; the selection rules against hand-checkable cases and a brute-force Python ranking.
"""

import math

import pytest
import torch

from _util import (SWEEP, baseline_correct, baseline_decode, expand_kv, indices_mask, load_reference,
                   make_cache, poison_beyond, rel_err)

ref = load_reference()
F64 = torch.float64

ATTN_SHAPES = [  # B, Hq, Hkv, D, N, lens (None: seq_lens None)
    pytest.param(1, 4, 4, 64, 50, None, id="B1-h4x4-N50-none"),
    pytest.param(3, 8, 2, 64, 70, (70, 1, 33), id="B3-h8x2-N70-L70,1,33"),
    pytest.param(3, 9, 3, 128, 40, (0, 40, 17), id="B3-h9x3-N40-L0,40,17"),
    pytest.param(2, 32, 8, 128, 90, (5, 90), id="B2-h32x8-N90-L5,90"),
]


def _lens(lens, device="cpu"):
    return None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)


def _qkv(B, Hq, Hkv, D, N, layout="contig"):
    q = torch.randn(B, Hq, D, dtype=F64)
    k, _ = make_cache(B, Hkv, N, D, F64, layout, "cpu")
    v, _ = make_cache(B, Hkv, N, D, F64, layout, "cpu")
    return q, k, v


# --------------------------------------------------------------------------------------------------
# attention outputs vs SDPA (float64)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contig", "sliced", "bshd"])
@pytest.mark.parametrize("B,Hq,Hkv,D,N,lens", ATTN_SHAPES)
def test_decode_matches_sdpa(B, Hq, Hkv, D, N, lens, layout):
    q, k, v = _qkv(B, Hq, Hkv, D, N, layout)
    out = ref.decode_attention(q, k, v, _lens(lens))
    assert out.dtype == F64 and out.shape == (B, Hq, D)
    assert rel_err(out, baseline_decode(q, k, v, lens)) < 1e-12
    for b, L in enumerate(lens or [N] * B):
        if L == 0:
            assert (out[b] == 0).all()


def test_decode_scale_and_compute_dtype():
    q, k, v = _qkv(2, 4, 2, 64, 30)
    out = ref.decode_attention(q, k, v, None, 0.3)
    assert rel_err(out, baseline_decode(q, k, v, None, scale=0.3)) < 1e-12
    assert rel_err(out, ref.decode_attention(q, k, v)) > 1e-3  # the scale matters
    out32 = ref.decode_attention(q.half(), k.half(), v.half(), compute_dtype=torch.float32)
    assert out32.dtype == torch.float32


def test_decode_never_reads_beyond_seq_len():
    q, k, v = _qkv(3, 8, 2, 64, 40)
    lens = (1, 17, 40)
    clean = ref.decode_attention(q, k, v, _lens(lens))
    poison_beyond(k, lens)
    poison_beyond(v, lens)
    assert torch.equal(ref.decode_attention(q, k, v, _lens(lens)), clean)


@pytest.mark.parametrize("mode", ["head", "group"])
def test_select_output_is_decode_output(mode):
    q, k, v = _qkv(3, 8, 2, 64, 60)
    lens = _lens((60, 3, 0))
    out, idx = ref.select_attention(q, k, v, lens, top_k=8, mode=mode, sink=1, recent=2)
    assert torch.equal(out, ref.decode_attention(q, k, v, lens))
    assert idx.dtype == torch.int32 and idx.shape == (3, 8 if mode == "head" else 2, 8)


def _random_indices(B, H, K, N, lens, duplicates):
    """Indices with -1, out-of-range entries (>= seq_len, >= N, large, negative) and duplicates."""
    idx = torch.randint(-2, N + 4, (B, H, K), dtype=torch.int32)
    idx[..., 0] = -1
    idx[..., 1] = 1 << 30
    if not duplicates:  # a distinct set per row (a permutation prefix), still with junk entries
        for b in range(B):
            for h in range(H):
                perm = torch.randperm(N + 6)[:K].to(torch.int32) - 3
                idx[b, h] = perm
    return idx


def _baseline_sparse64(q, k, v, idx, lens):
    """Float64 gather + masked SDPA: each listed valid entry is one key (duplicates count twice)."""
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = idx.long() if idx.shape[1] == Hq else idx.long().repeat_interleave(G, 1)  # [B, Hq, K]
    L = torch.tensor(lens or [N] * B)
    valid = (rows >= 0) & (rows < L[:, None, None])
    safe = torch.where(valid, rows, torch.zeros_like(rows))
    kk = torch.gather(expand_kv(k, G), 2, safe[..., None].expand(-1, -1, -1, D))
    vv = torch.gather(expand_kv(v, G), 2, safe[..., None].expand(-1, -1, -1, D))
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=valid[:, :, None])
    return torch.where(valid.any(-1)[..., None], out[:, :, 0], torch.zeros_like(out[:, :, 0]))


@pytest.mark.parametrize("hsel", ["Hq", "Hkv"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("B,Hq,Hkv,D,N,lens", ATTN_SHAPES)
def test_sparse_matches_masked_sdpa(B, Hq, Hkv, D, N, lens, duplicates, hsel):
    q, k, v = _qkv(B, Hq, Hkv, D, N, "sliced")
    H = Hq if hsel == "Hq" else Hkv
    idx = _random_indices(B, H, 12, N, lens, duplicates)
    out = ref.sparse_attention(q, k, v, idx, _lens(lens))
    assert out.dtype == F64 and out.shape == (B, Hq, D)
    assert rel_err(out, _baseline_sparse64(q, k, v, idx, lens)) < 1e-12
    if not duplicates:  # a set: the boolean-mask baseline agrees too
        mask = indices_mask(idx, lens, B, Hq, Hkv, N, "cpu")
        sd = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], expand_kv(k, Hq // Hkv),
                                                              expand_kv(v, Hq // Hkv), attn_mask=mask[:, :, None])
        sd = torch.where(mask.any(-1)[..., None], sd[:, :, 0], torch.zeros_like(sd[:, :, 0]))
        assert rel_err(out, sd) < 1e-12


def test_sparse_duplicate_counts_twice():
    q, k, v = _qkv(1, 1, 1, 64, 10)
    once = ref.sparse_attention(q, k, v, torch.tensor([[[2, 5]]], dtype=torch.int32))
    twice = ref.sparse_attention(q, k, v, torch.tensor([[[2, 5, 5, -1]]], dtype=torch.int32))
    s = (q[0, 0] @ k[0, 0].T) / 8.0
    w2, w5 = math.exp(s[2]), 2 * math.exp(s[5])
    expected = (w2 * v[0, 0, 2] + w5 * v[0, 0, 5]) / (w2 + w5)
    assert torch.allclose(twice[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(once, twice)


def test_sparse_never_reads_unlisted_positions():
    q, k, v = _qkv(2, 4, 2, 64, 30)
    lens = (30, 9)
    idx = torch.tensor([[[0, 3, -1, 29], [7, 3, 40, -5]], [[8, 9, 12, 0], [1, 2, 3, 4]]], dtype=torch.int32)
    clean = ref.sparse_attention(q, k, v, idx, _lens(lens))
    listed = indices_mask(idx, lens, 2, 4, 2, 30, "cpu").view(2, 2, 2, 30).any(2)  # per KV head
    k[~listed] = float("nan")
    v[~listed] = float("nan")
    out = ref.sparse_attention(q, k, v, idx, _lens(lens))
    assert torch.isfinite(out).all() and torch.equal(out, clean)


def test_sparse_all_invalid_row_gives_zeros():
    q, k, v = _qkv(2, 2, 2, 64, 8)
    idx = torch.tensor([[[-1, -1], [8, 100]], [[0, 1], [-3, 7]]], dtype=torch.int32)
    out = ref.sparse_attention(q, k, v, idx, _lens((8, 5)))
    assert (out[0] == 0).all() and (out[1, 1] == 0).all() and (out[1, 0] != 0).any()


def test_sparse_full_listing_equals_decode():
    q, k, v = _qkv(3, 8, 2, 64, 50)
    lens = (50, 1, 20)
    idx = torch.arange(50, dtype=torch.int32).flip(0).expand(3, 2, 50).contiguous()  # unsorted
    assert rel_err(ref.sparse_attention(q, k, v, idx, _lens(lens)), ref.decode_attention(q, k, v, _lens(lens))) < 1e-13


# --------------------------------------------------------------------------------------------------
# correct_kv_attention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,Hq,Hkv,D,N,S,start", [
    pytest.param(1, 4, 4, 64, 20, 1, (19,), id="S1-end"),
    pytest.param(2, 8, 2, 64, 30, 5, (0, 12), id="S5-start0"),
    pytest.param(3, 9, 3, 128, 40, 8, (32, 3, 17), id="S8-GQA"),
])
def test_correct_kv_matches_sdpa(B, Hq, Hkv, D, N, S, start):
    q = torch.randn(B, Hq, S, D, dtype=F64)
    kn, vn = torch.randn(B, Hkv, S, D, dtype=F64), torch.randn(B, Hkv, S, D, dtype=F64)
    k, kbuf = make_cache(B, Hkv, N, D, F64, "sliced", "cpu")
    v, vbuf = make_cache(B, Hkv, N, D, F64, "sliced", "cpu")
    st = torch.tensor(start, dtype=torch.int32)
    k_expected, v_expected = k.clone(), v.clone()
    for b, s0 in enumerate(start):
        k_expected[b, :, s0:s0 + S] = kn[b]
        v_expected[b, :, s0:s0 + S] = vn[b]
        k[b, :, s0:] = float("nan")  # overwritten or never read
        v[b, :, s0:] = float("nan")
    kbuf_before = kbuf.clone()
    out = ref.correct_kv_attention(q, kn, vn, k, v, st)
    assert out.dtype == F64 and out.shape == (B, Hq, S, D) and torch.isfinite(out).all()
    base = baseline_correct(q, torch.nan_to_num(k, nan=0.0), torch.nan_to_num(v, nan=0.0), st)
    assert rel_err(out, base) < 1e-12
    for b, s0 in enumerate(start):
        assert torch.equal(k[b, :, :s0 + S], k_expected[b, :, :s0 + S])
        assert torch.equal(v[b, :, :s0 + S], v_expected[b, :, :s0 + S])
        assert torch.isnan(k[b, :, s0 + S:]).all()  # beyond the written rows: untouched
    # nothing outside the view moved
    kbuf_before[1:1 + B, :, 5:5 + N] = k
    assert torch.equal(torch.nan_to_num(kbuf, nan=7.0), torch.nan_to_num(kbuf_before, nan=7.0))


def test_correct_kv_last_query_equals_decode():
    """With S rows written at start, query S-1 sees exactly seq_len start+S: decode_attention."""
    B, Hq, Hkv, D, N, S = 2, 8, 4, 64, 25, 4
    q = torch.randn(B, Hq, S, D, dtype=F64)
    kn, vn = torch.randn(B, Hkv, S, D, dtype=F64), torch.randn(B, Hkv, S, D, dtype=F64)
    k, v = torch.randn(B, Hkv, N, D, dtype=F64), torch.randn(B, Hkv, N, D, dtype=F64)
    st = torch.tensor([3, 21], dtype=torch.int32)
    out = ref.correct_kv_attention(q, kn, vn, k, v, st)
    for i in range(S):
        dec = ref.decode_attention(q[:, :, i], k, v, (st + i + 1).to(torch.int32))
        assert rel_err(out[:, :, i], dec) < 1e-13


# --------------------------------------------------------------------------------------------------
# selection rules: hand-checkable cases
# --------------------------------------------------------------------------------------------------
def _scored_cache(scores_per_head):
    """q, k, v with scale 1 so that s_h(t) = scores_per_head[h][t] exactly (Hq heads, 1 KV head)."""
    s = torch.tensor(scores_per_head, dtype=F64)  # [Hq, L]
    Hq, L = s.shape
    D = 64
    q = torch.zeros(1, Hq, D, dtype=F64)
    k = torch.zeros(1, 1, L, D, dtype=F64)
    for h in range(Hq):
        q[0, h, h] = 1.0
        k[0, 0, :, h] = s[h]
    v = torch.randn(1, 1, L, D, dtype=F64)
    return q, k, v


def _sel(scores_per_head, top_k, mode="head", sink=0, recent=0, seq_len=None):
    q, k, v = _scored_cache(scores_per_head)
    lens = None if seq_len is None else torch.tensor([seq_len], dtype=torch.int32)
    _, idx = ref.select_attention(q, k, v, lens, top_k=top_k, mode=mode, sink=sink, recent=recent, scale=1.0)
    return idx[0].tolist()


VALS = [[5.0, 1.0, 4.0, 2.0, 3.0, 0.0]]


def test_select_newest_forced_then_best():
    assert _sel(VALS, 3) == [[0, 2, 5]]  # newest 5 (score 0) forced, then scores 5 and 4


def test_select_sink_and_recent():
    # forced {0} (sink 1) and {4, 5} (recent 2); one slot left: best of 1..3 is 2
    assert _sel(VALS, 4, sink=1, recent=2) == [[0, 2, 4, 5]]
    # recent 1 is the newest token only
    assert _sel(VALS, 3, recent=1) == [[0, 2, 5]]
    # forced tokens fill the whole budget
    assert _sel([[9.0] * 10], 4, sink=2, recent=2) == [[0, 1, 8, 9]]
    assert _sel([[0.0, 9.0, 9.0, 9.0, 9.0, 0.0, 0.0]], 3, sink=2, recent=1) == [[0, 1, 6]]


def test_select_ties_prefer_lower_position():
    assert _sel([[1.0] * 6], 3) == [[0, 1, 5]]
    assert _sel([[0.0, 2.0, 1.0, 2.0, 2.0, 0.0]], 3) == [[1, 3, 5]]


def test_select_nan_ranks_first():
    # a NaN key ranks above every number (the attention output then is NaN, as it must)
    assert _sel([[5.0, 1.0, 4.0, float("nan"), 3.0, 0.0]], 3) == [[0, 3, 5]]
    assert _sel([[float("inf"), 1.0, float("nan"), 2.0]], 2) == [[2, 3]]


def test_select_short_sequences_take_everything():
    assert _sel(VALS, 6) == [[0, 1, 2, 3, 4, 5]]                       # L == top_k
    assert _sel(VALS, 8, sink=2, recent=3) == [[0, 1, 2, 3, 4, 5, -1, -1]]  # L < top_k, -1 last
    assert _sel(VALS, 4, seq_len=3) == [[0, 1, 2, -1]]                  # seq_lens < N
    assert _sel(VALS, 2, seq_len=3) == [[0, 2]]                         # newest of the valid ones
    assert _sel(VALS, 1, seq_len=1) == [[0]]
    assert _sel(VALS, 1) == [[5]]                                       # top_k 1: newest only


def test_select_seq_len_zero_and_empty_cache():
    q, k, v = _scored_cache(VALS)
    out, idx = ref.select_attention(q, k, v, torch.tensor([0], dtype=torch.int32), top_k=4)
    assert (out == 0).all() and (idx == -1).all()
    out, idx = ref.select_attention(q, k[:, :, :0], v[:, :, :0], None, top_k=4, mode="group")
    assert (out == 0).all() and (idx == -1).all() and idx.shape == (1, 1, 4)


def test_group_score_is_max_log_probability():
    # head 0 is high everywhere (flat after softmax), head 1 peaks at 2. Raw max would pick 1 then
    # 0 (tie 0/2/3 at 10, lower position); the max log-probability picks 2 then 1.
    s = [[10.0, 11.0, 10.0, 10.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0]]
    assert _sel(s, 3, mode="group") == [[1, 2, 4]]
    q, k, v = _scored_cache(s)
    sc = ref.selection_scores(q, k, None, "group", 1.0)
    st = torch.tensor(s, dtype=F64)
    expected = (st - torch.logsumexp(st, -1, keepdim=True)).amax(0)
    assert sc.shape == (1, 1, 5) and torch.allclose(sc[0, 0], expected, rtol=0, atol=1e-15)
    assert _sel(s, 3, mode="head") == [[0, 1, 4], [0, 2, 4]]


def test_selection_scores_shapes_and_masking():
    q, k, v = _qkv(2, 8, 2, 64, 20)
    lens = torch.tensor([20, 7], dtype=torch.int32)
    for mode, H in (("head", 8), ("group", 2)):
        sc = ref.selection_scores(q, k, lens, mode)
        assert sc.shape == (2, H, 20) and sc.dtype == F64
        assert torch.isinf(sc[1, :, 7:]).all() and (sc[1, :, 7:] < 0).all()
        assert torch.isfinite(sc[1, :, :7]).all() and torch.isfinite(sc[0]).all()
    head = ref.selection_scores(q, k, lens, "head")
    assert torch.allclose(head[0], torch.einsum("hd,hnd->hn", q[0], k[0].repeat_interleave(4, 0)) / 8.0)
    # group score: explicit loops over heads / tokens
    grp = ref.selection_scores(q, k, lens, "group")
    for g in range(2):
        for t in range(7):
            best = -math.inf
            for h in range(4 * g, 4 * g + 4):
                sh = [float(q[1, h] @ k[1, g, u]) / 8.0 for u in range(7)]
                lse = math.log(sum(math.exp(x) for x in sh))
                best = max(best, sh[t] - lse)
            assert abs(grp[1, g, t].item() - best) < 1e-12


def test_head_and_group_agree_without_gqa():
    """With Hq == Hkv the group score is a per-head monotone shift of the head score."""
    q, k, v = _qkv(2, 4, 4, 64, 100)
    lens = torch.tensor([100, 60], dtype=torch.int32)
    _, ih = ref.select_attention(q, k, v, lens, top_k=20, mode="head", sink=2, recent=3)
    _, ig = ref.select_attention(q, k, v, lens, top_k=20, mode="group", sink=2, recent=3)
    assert torch.equal(ih, ig)


def _brute_force(scores_row, L, top_k, sink, recent):
    if L <= top_k:
        return list(range(L)) + [-1] * (top_k - L)
    forced = {L - 1} | set(range(min(sink, L))) | set(range(max(L - recent, 0), L))
    others = [t for t in range(L) if t not in forced]
    key = lambda t: (0 if math.isnan(scores_row[t]) else 1, -scores_row[t] if not math.isnan(scores_row[t]) else 0, t)
    chosen = sorted(others, key=key)[: top_k - len(forced)]
    return sorted(forced | set(chosen))


@pytest.mark.parametrize("mode", ["head", "group"])
@pytest.mark.parametrize("sink,recent", [(0, 0), (3, 0), (0, 4), (2, 5)])
def test_selection_matches_brute_force(mode, sink, recent):
    B, Hq, Hkv, D, N, top_k = 3, 6, 2, 64, 80, 12
    q, k, v = _qkv(B, Hq, Hkv, D, N)
    k = (k * 2).round() / 2  # coarse values: many exact ties in head mode
    q = (q * 2).round() / 2
    lens = torch.tensor([80, 12, 30], dtype=torch.int32)
    if mode == "head":
        k[0, 0, 10] = float("nan")  # NaN score for query heads 0..2 at position 10
    _, idx = ref.select_attention(q, k, v, lens, top_k=top_k, mode=mode, sink=sink, recent=recent)
    sc = ref.selection_scores(q, k, lens, mode)
    for b in range(B):
        for h in range(idx.shape[1]):
            assert idx[b, h].tolist() == _brute_force(sc[b, h].tolist(), int(lens[b]), top_k, sink, recent)
    if mode == "head":
        assert all(10 in idx[0, h].tolist() for h in range(3))


def test_reference_rejects_bad_budget():
    q, k, v = _qkv(1, 2, 2, 64, 10)
    for kw in (dict(top_k=0), dict(top_k=4, sink=4), dict(top_k=4, sink=2, recent=3), dict(sink=-1),
               dict(recent=-1), dict(mode="heads"), dict(top_k=(1 << 20) + 1)):
        with pytest.raises(ValueError):
            ref.select_attention(q, k, v, **kw)


def test_sweep_ids_are_unique_and_cover_every_axis():
    ids = [c.id for c in SWEEP]
    assert len(set(ids)) == len(ids)
    axes = {
        "B": {1, 3}, "heads": {(4, 4), (8, 2), (9, 3), (32, 8)}, "D": {64, 128},
        "dtype": {"f32", "f16", "bf16"}, "mode": {"head", "group"}, "layout": {"contig", "sliced", "bshd"},
    }
    assert {c.B for c in SWEEP} == axes["B"]
    assert {(c.Hq, c.Hkv) for c in SWEEP} == axes["heads"]
    assert {c.D for c in SWEEP} == axes["D"]
    assert {c.dtype for c in SWEEP} == axes["dtype"]
    assert {c.mode for c in SWEEP} == axes["mode"]
    assert {c.layout for c in SWEEP} == axes["layout"]
    assert any(c.sink == c.recent == 0 for c in SWEEP) and any(c.sink > 0 for c in SWEEP)
    assert any(c.recent > 0 for c in SWEEP)
    lens = [(L, c) for c in SWEEP for L in (c.lens or [c.N] * c.B)]
    assert any(L == 1 for L, _ in lens) and any(L == 0 for L, _ in lens)
    assert any(1 < L < c.top_k for L, c in lens) and any(L == c.top_k for L, c in lens)
    assert any(L >= 4 * c.top_k for L, c in lens)
    assert any(c.lens is not None and len(set(c.lens)) == c.B == 3 for c in SWEEP)
    assert any(c.lens is None for c in SWEEP)
