"""torch.ops.tidal.* against tidal_ext/reference.py (float64) over the parametrized sweep.

Accuracy: err = ||out - ref64|| / ||ref64||; the baseline is plain PyTorch in the same dtype
(F.scaled_dot_product_attention on the native-dtype inputs with a boolean mask of the same attended
set); require err_op <= 2 * err_baseline + floor (see _util.floor_for for the floor).

Never-read checks: cache positions an op must not read hold NaN (>= seq_len; not listed in
indices; after a query's causal limit; the parts of a bigger buffer outside a sliced cache view), so
any read shows up as a non-finite output where the reference is finite.
"""

import pytest
import torch

import tidal_ext  # noqa: F401  (registers torch.ops.tidal)
from _util import (SLOW_SWEEP, SWEEP, DTYPES, assert_accurate, assert_bit_equal, baseline_correct,
                   baseline_decode, check_selection, expand_kv, indices_mask, lens_list, lens_tensor,
                   make_cache, make_q, poison_beyond, ref, rel_err, skip_unsupported)

OPS = torch.ops.tidal
NAN = float("nan")

CASES = [pytest.param(c, id=c.id) for c in SWEEP] + [
    pytest.param(c, id=c.id, marks=pytest.mark.slow) for c in SLOW_SWEEP]


def sel_tol(dtype):
    """Relative score tolerance of the tie-aware index check (kernel: fp32 scores; ref: fp64)."""
    return 1e-5 if dtype == torch.float32 else 1e-3


def make_inputs(case, device):
    """q and NaN-framed caches (everything of the buffer outside the view is NaN)."""
    dt = case.torch_dtype
    q = make_q(case.B, case.Hq, case.D, dt, device, strided=case.q_strided)
    caches = []
    for layout in (case.layout, case.v_layout_):
        view, buf = make_cache(case.B, case.Hkv, case.N, case.D, dt, layout, device)
        inside = view.clone()
        buf.fill_(NAN)
        view.copy_(inside)
        caches.append((view, buf))
    (k, kbuf), (v, vbuf) = caches
    return q, k, v, lens_tensor(case.lens, device), kbuf, vbuf


def assert_out_layout(out, q, shape):
    assert out.shape == shape, f"out shape {tuple(out.shape)}, expected {shape}"
    assert out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()


def assert_zero_rows(out, case):
    for b, L in enumerate(lens_list(case.lens, case.B, case.N)):
        if L == 0:
            assert (out[b] == 0).all(), f"batch row {b} has seq_len 0 but a nonzero output"


# --------------------------------------------------------------------------------------------------
# decode_attention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_decode_attention(case, device):
    skip_unsupported(device, case.torch_dtype)
    q, k, v, sl, _, _ = make_inputs(case, device)
    base = baseline_decode(q, k, v, case.lens)
    poison_beyond(k, case.lens)
    poison_beyond(v, case.lens)
    out = OPS.decode_attention(q, k, v, sl)
    assert_out_layout(out, q, (case.B, case.Hq, case.D))
    ref64 = ref.decode_attention(q, k, v, sl)
    assert_accurate(out, ref64, base, case.torch_dtype, "decode_attention")
    assert_zero_rows(out, case)
    assert torch.equal(out, OPS.decode_attention(q, k, v, sl)), "not deterministic"


# --------------------------------------------------------------------------------------------------
# select_attention
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_select_attention(case, device):
    skip_unsupported(device, case.torch_dtype)
    q, k, v, sl, _, _ = make_inputs(case, device)
    base = baseline_decode(q, k, v, case.lens)
    poison_beyond(k, case.lens)
    poison_beyond(v, case.lens)
    out, idx = OPS.select_attention(q, k, v, sl, case.top_k, case.mode, case.sink, case.recent)
    assert_out_layout(out, q, (case.B, case.Hq, case.D))
    hsel = case.Hq if case.mode == "head" else case.Hkv
    assert idx.shape == (case.B, hsel, case.top_k) and idx.device == q.device and idx.is_contiguous()

    dec = OPS.decode_attention(q, k, v, sl)
    assert torch.equal(out, dec), "select_attention output differs from decode_attention (bitwise)"

    ref_out, ref_idx = ref.select_attention(q, k, v, sl, case.top_k, case.mode, case.sink, case.recent)
    assert_accurate(out, ref_out, base, case.torch_dtype, "select_attention")
    assert_zero_rows(out, case)
    scores = ref.selection_scores(q, k, sl, case.mode)
    check_selection(idx, ref_idx, scores, case.lens, case.top_k, case.sink, case.recent,
                    sel_tol(case.torch_dtype), what=case.id)


@pytest.mark.parametrize("mode", ["head", "group"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_select_exact_ties(dtype, mode, device):
    """Integer-valued q, k: scores have many exact ties, resolved toward the lower position."""
    dt = DTYPES[dtype]
    skip_unsupported(device, dt)
    B, Hq, Hkv, D, N, top_k = 2, 8, 2 if mode == "group" else 8, 64, 96, 12
    q = torch.randint(-1, 2, (B, Hq, D)).to(dt).to(device)
    k = torch.randint(-1, 2, (B, Hkv, N, D)).to(dt).to(device)
    v = torch.randn(B, Hkv, N, D).to(dt).to(device)
    sl = torch.tensor([N, 50], dtype=torch.int32, device=device)
    _, idx = OPS.select_attention(q, k, v, sl, top_k, mode, 1, 2, 1.0)
    _, ref_idx = ref.select_attention(q, k, v, sl, top_k, mode, 1, 2, 1.0)
    if mode == "head":  # integer scores are exact in fp32: the tie-break must match exactly
        assert torch.equal(idx.cpu(), ref_idx.cpu()), f"kernel {idx.tolist()} vs ref {ref_idx.tolist()}"
    else:  # group scores go through logsumexp: rounding may reorder near-ties
        check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, mode, 1.0), [N, 50], top_k, 1, 2, 1e-5)


def test_select_nan_score_ranks_first(device):
    dt = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 4, 64).to(dt).to(device)
    k = torch.randn(1, 4, 50, 64).to(dt).to(device)
    v = torch.randn(1, 4, 50, 64).to(dt).to(device)
    k[0, :, 17] = NAN
    _, idx = OPS.select_attention(q, k, v, None, 5, "head")
    for h in range(4):
        assert 17 in idx[0, h].tolist() and 49 in idx[0, h].tolist(), idx[0, h].tolist()


def test_select_top_k_one_is_newest(device):
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(*s).to(dt).to(device) for s in ((3, 8, 64), (3, 2, 40, 64), (3, 2, 40, 64)))
    sl = torch.tensor([40, 1, 0], dtype=torch.int32, device=device)
    for mode, H in (("head", 8), ("group", 2)):
        _, idx = OPS.select_attention(q, k, v, sl, 1, mode)
        assert idx.shape == (3, H, 1)
        assert idx[:, :, 0].tolist() == [[39] * H, [0] * H, [-1] * H]


def test_select_default_arguments(device):
    dt = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(*s).to(dt).to(device) for s in ((2, 4, 64), (2, 2, 100, 64), (2, 2, 100, 64)))
    out, idx = OPS.select_attention(q, k, v)  # top_k 2048, head mode, seq_lens None
    assert idx.shape == (2, 4, 2048)
    expected = torch.full((2048,), -1, dtype=torch.int32)
    expected[:100] = torch.arange(100, dtype=torch.int32)
    assert (idx.cpu() == expected).all()
    assert torch.equal(out, OPS.decode_attention(q, k, v))


# --------------------------------------------------------------------------------------------------
# sparse_attention
# --------------------------------------------------------------------------------------------------
def baseline_sparse_native(q, k, v, idx, lens, scale=None):
    """Plain PyTorch in q's dtype: gather the listed valid keys per query head, masked SDPA.
    (Duplicates count once per listing, like the op.)"""
    B, Hq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = idx.to(q.device).long()
    if rows.shape[1] != Hq:
        rows = rows.repeat_interleave(G, 1)
    L = torch.tensor(lens_list(lens, B, N), device=q.device)
    valid = (rows >= 0) & (rows < L[:, None, None])
    safe = torch.where(valid, rows, torch.zeros_like(rows))
    kk = torch.gather(expand_kv(k, G), 2, safe[..., None].expand(-1, -1, -1, D))
    vv = torch.gather(expand_kv(v, G), 2, safe[..., None].expand(-1, -1, -1, D))
    kk = torch.where(valid[..., None], kk, torch.zeros_like(kk))
    vv = torch.where(valid[..., None], vv, torch.zeros_like(vv))
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=valid[:, :, None],
                                                         scale=scale)[:, :, 0]
    return torch.where(valid.any(-1)[..., None], out, torch.zeros_like(out))


def poison_unlisted(cache, idx, lens, Hq):
    """NaN at every position no query head of the KV group lists validly (in place)."""
    B, Hkv, N, _ = cache.shape
    listed = indices_mask(idx, lens, B, Hq, Hkv, N, cache.device).view(B, Hkv, Hq // Hkv, N).any(2)
    cache.copy_(torch.where(listed[..., None], cache, torch.full_like(cache, NAN)))


def _check_sparse(q, k, v, idx, sl, case, what):
    """sparse_attention with NaN at every unlisted position, against the reference; returns out."""
    base = baseline_sparse_native(q, k, v, idx, case.lens)
    poison_unlisted(k, idx, case.lens, case.Hq)
    poison_unlisted(v, idx, case.lens, case.Hq)
    out = OPS.sparse_attention(q, k, v, idx, sl)
    assert_out_layout(out, q, (case.B, case.Hq, case.D))
    assert_accurate(out, ref.sparse_attention(q, k, v, idx, sl), base, case.torch_dtype, what)
    return out


@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_selected(case, device):
    """Indices as select_attention defines them (from the reference), NaN at every other position."""
    skip_unsupported(device, case.torch_dtype)
    q, k, v, sl, _, _ = make_inputs(case, device)
    _, idx = ref.select_attention(q, k, v, sl, case.top_k, case.mode, case.sink, case.recent)
    out = _check_sparse(q, k, v, idx.to(device), sl, case, "sparse_attention")
    assert_zero_rows(out, case)


@pytest.mark.parametrize("case", CASES)
def test_sparse_attention_random_indices(case, device):
    """Unsorted indices with -1, negative, >= seq_len, >= N and huge entries, and duplicates;
    Hsel alternates between the op's two row layouts (Hq for head mode cases, Hkv for group)."""
    skip_unsupported(device, case.torch_dtype)
    q, k, v, sl, _, _ = make_inputs(case, device)
    hsel = case.Hq if case.mode == "head" else case.Hkv
    K = case.top_k
    idx = torch.randint(0, case.N, (case.B, hsel, K), dtype=torch.int32)
    junk = torch.rand(case.B, hsel, K) < 0.25
    idx[junk] = torch.tensor([-1, -7, case.N, case.N + 3, 1 << 30], dtype=torch.int32)[
        torch.randint(0, 5, (int(junk.sum()),))]
    idx[..., -1] = idx[..., 0]  # a duplicate
    _check_sparse(q, k, v, idx.to(device), sl, case, "sparse_attention(random indices)")


@pytest.mark.parametrize("case", CASES)
def test_sparse_with_full_budget_equals_decode(case, device):
    """select_attention with top_k >= seq_len lists every valid token; sparse over it == decode."""
    skip_unsupported(device, case.torch_dtype)
    q, k, v, sl, _, _ = make_inputs(case, device)
    poison_beyond(k, case.lens)
    poison_beyond(v, case.lens)
    _, idx = OPS.select_attention(q, k, v, sl, case.N, case.mode)
    for b, L in enumerate(lens_list(case.lens, case.B, case.N)):
        expected = torch.full((case.N,), -1, dtype=torch.int32)
        expected[:L] = torch.arange(L, dtype=torch.int32)
        assert (idx[b].cpu() == expected).all(), f"batch row {b}: indices are not 0..{L - 1} then -1"
    sp = OPS.sparse_attention(q, k, v, idx, sl)
    dec = OPS.decode_attention(q, k, v, sl)
    eps = torch.finfo(case.torch_dtype).eps
    tol = max(4 * eps, 1e-5)
    err = rel_err(sp, dec)
    assert err <= tol, f"sparse(all) vs decode: rel err {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------------------------------
# correct_kv_attention
# --------------------------------------------------------------------------------------------------
def _fresh_rows(case, device, hf_layout):
    """q [B,Hq,S,D], k, v [B,Hkv,S,D]; hf_layout: transposed views of [B,S,H,D] buffers."""
    dt, B, S, D = case.torch_dtype, case.B, case.S, case.D
    def make(H):
        if hf_layout:
            return torch.randn(B, S, H, D).to(dt).to(device).transpose(1, 2)
        return torch.randn(B, H, S, D).to(dt).to(device)
    return make(case.Hq), make(case.Hkv), make(case.Hkv)


def _starts(case):
    """Per-row start: the chunk ends at the row's length (clamped into [0, N - S])."""
    return [min(max(L - case.S, 0), case.N - case.S) for L in lens_list(case.lens, case.B, case.N)]


@pytest.mark.parametrize("case", CASES)
def test_correct_kv_attention(case, device):
    skip_unsupported(device, case.torch_dtype)
    B, S = case.B, case.S
    q, kn, vn = _fresh_rows(case, device, hf_layout=case.q_strided or case.layout == "bshd")
    _, k, v, _, kbuf, vbuf = make_inputs(case, device)
    starts = _starts(case)
    st = torch.tensor(starts, dtype=torch.int32, device=device)

    # clean caches for the baseline: old rows before start, the fresh rows, zeros beyond
    k_clean, v_clean = k.clone(), v.clone()
    for b, s0 in enumerate(starts):
        for cache, clean, new in ((k, k_clean, kn), (v, v_clean, vn)):
            clean[b, :, s0:s0 + S] = new[b]
            clean[b, :, s0 + S:] = 0
            cache[b, :, s0:] = NAN  # rows to be written (so written before read) and beyond (never read)
    # what the whole buffers must hold afterwards (the NaN framing outside the view included)
    k_expected, v_expected = kbuf.clone(), vbuf.clone()
    for exp_buf, buf, view, new in ((k_expected, kbuf, k, kn), (v_expected, vbuf, v, vn)):
        exp_view = _view_like(exp_buf, buf, view)
        for b, s0 in enumerate(starts):
            exp_view[b, :, s0:s0 + S] = new[b]

    base = baseline_correct(q, k_clean, v_clean, st)
    ref64 = ref.correct_kv_attention(q, kn, vn, k.clone(), v.clone(), st)

    out = OPS.correct_kv_attention(q, kn, vn, k, v, st)
    assert_out_layout(out, q, (B, case.Hq, S, case.D))
    assert_accurate(out, ref64, base, case.torch_dtype, "correct_kv_attention")
    assert_bit_equal(kbuf, k_expected, "k_cache buffer after correct_kv_attention")
    assert_bit_equal(vbuf, v_expected, "v_cache buffer after correct_kv_attention")


def _view_like(new_buf, buf, view):
    """The view of new_buf that `view` is of buf (same strides and offset; both buffers contiguous)."""
    assert buf.is_contiguous() and new_buf.is_contiguous()
    return new_buf.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset())


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_correct_kv_then_decode(dtype, device):
    """Writing the last S rows and reading query S-1 equals decode_attention at seq_len start+S."""
    dt = DTYPES[dtype]
    skip_unsupported(device, dt)
    B, Hq, Hkv, D, N, S = 2, 8, 2, 128, 64, 4
    q = torch.randn(B, Hq, S, D).to(dt).to(device)
    kn, vn = (torch.randn(B, Hkv, S, D).to(dt).to(device) for _ in range(2))
    k, v = (torch.randn(B, Hkv, N, D).to(dt).to(device) for _ in range(2))
    st = torch.tensor([10, 60], dtype=torch.int32, device=device)
    out = OPS.correct_kv_attention(q, kn, vn, k, v, st)
    dec = OPS.decode_attention(q[:, :, S - 1].contiguous(), k, v, st + S)
    eps = torch.finfo(dt).eps
    assert rel_err(out[:, :, S - 1], dec) <= max(4 * eps, 1e-5)


# --------------------------------------------------------------------------------------------------
# other head dims, explicit scale
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [32, 96, 256])
def test_other_head_dims(D, device):
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, Hq, Hkv, N, top_k = 2, 4, 2, 80, 16
    q = torch.randn(B, Hq, D).to(dt).to(device)
    k, v = (torch.randn(B, Hkv, N, D).to(dt).to(device) for _ in range(2))
    sl = torch.tensor([80, 33], dtype=torch.int32, device=device)
    base = baseline_decode(q, k, v, [80, 33])
    out, idx = OPS.select_attention(q, k, v, sl, top_k, "group", 1, 1)
    ref_out, ref_idx = ref.select_attention(q, k, v, sl, top_k, "group", 1, 1)
    assert_accurate(out, ref_out, base, dt, f"select_attention D={D}")
    check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, "group"), [80, 33], top_k, 1, 1, sel_tol(dt))
    sp = OPS.sparse_attention(q, k, v, ref_idx.to(device), sl)
    assert_accurate(sp, ref.sparse_attention(q, k, v, ref_idx, sl), baseline_sparse_native(q, k, v, ref_idx, [80, 33]),
                    dt, f"sparse_attention D={D}")


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_explicit_scale(scale, device):
    dt = torch.float16 if device == "cuda" else torch.float32
    B, Hq, Hkv, D, N, S = 2, 8, 4, 64, 50, 3
    q = torch.randn(B, Hq, D).to(dt).to(device)
    k, v = (torch.randn(B, Hkv, N, D).to(dt).to(device) for _ in range(2))
    sl = torch.tensor([50, 20], dtype=torch.int32, device=device)
    base = baseline_decode(q, k, v, [50, 20], scale=scale)
    ref_out = ref.decode_attention(q, k, v, sl, scale)
    assert_accurate(OPS.decode_attention(q, k, v, sl, scale), ref_out, base, dt, "decode scale")
    out, idx = OPS.select_attention(q, k, v, sl, 8, "group", 0, 0, scale)
    assert_accurate(out, ref_out, base, dt, "select scale")
    _, ref_idx = ref.select_attention(q, k, v, sl, 8, "group", 0, 0, scale)
    check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, "group", scale), [50, 20], 8, 0, 0, sel_tol(dt))
    sp = OPS.sparse_attention(q, k, v, ref_idx.to(device), sl, scale)
    assert_accurate(sp, ref.sparse_attention(q, k, v, ref_idx, sl, scale),
                    baseline_sparse_native(q, k, v, ref_idx, [50, 20], scale), dt, "sparse scale")
    qc = torch.randn(B, Hq, S, D).to(dt).to(device)
    kn, vn = (torch.randn(B, Hkv, S, D).to(dt).to(device) for _ in range(2))
    st = torch.tensor([5, 47], dtype=torch.int32, device=device)
    k2, v2 = k.clone(), v.clone()
    ref_c = ref.correct_kv_attention(qc, kn, vn, k2, v2, st, scale)
    base_c = baseline_correct(qc, k2, v2, st, scale)
    assert_accurate(OPS.correct_kv_attention(qc, kn, vn, k, v, st, scale), ref_c, base_c, dt, "correct scale")



# --------------------------------------------------------------------------------------------------
# numerics and layout robustness
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_large_scores_are_stable(dtype, device):
    """Scores up to ~+-150 (exp overflows fp32 without max subtraction); softmax nearly one-hot."""
    dt = DTYPES[dtype]
    skip_unsupported(device, dt)
    B, Hq, Hkv, D, N, S, top_k = 2, 8, 2, 128, 200, 4, 32
    q = (torch.randn(B, Hq, D) * 40).to(dt).to(device)
    k, v = (torch.randn(B, Hkv, N, D).to(dt).to(device) for _ in range(2))
    sl = torch.tensor([200, 77], dtype=torch.int32, device=device)
    lens = [200, 77]
    base = baseline_decode(q, k, v, lens)
    out, idx = OPS.select_attention(q, k, v, sl, top_k, "group", 2, 2)
    ref_out, ref_idx = ref.select_attention(q, k, v, sl, top_k, "group", 2, 2)
    assert_accurate(out, ref_out, base, dt, "select_attention(large scores)")
    check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, "group"), lens, top_k, 2, 2, sel_tol(dt))
    sp = OPS.sparse_attention(q, k, v, ref_idx.to(device), sl)
    assert_accurate(sp, ref.sparse_attention(q, k, v, ref_idx, sl), baseline_sparse_native(q, k, v, ref_idx, lens),
                    dt, "sparse_attention(large scores)")
    qc = (torch.randn(B, Hq, S, D) * 40).to(dt).to(device)
    kn, vn = (torch.randn(B, Hkv, S, D).to(dt).to(device) for _ in range(2))
    st = torch.tensor([0, 150], dtype=torch.int32, device=device)
    k2, v2 = k.clone(), v.clone()
    ref_c = ref.correct_kv_attention(qc, kn, vn, k2, v2, st)
    assert_accurate(OPS.correct_kv_attention(qc, kn, vn, k, v, st), ref_c, baseline_correct(qc, k2, v2, st), dt,
                    "correct_kv_attention(large scores)")


def _last_dim_strided(t):
    big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), NAN, dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def test_q_with_strided_last_dim(device):
    """ops.h: q has any strides (also a non-unit last-dim stride); correct_kv's fresh k/v too."""
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, Hq, Hkv, D, N, S = 2, 8, 2, 64, 60, 3
    q = torch.randn(B, Hq, D).to(dt).to(device)
    qs = _last_dim_strided(q)
    k, v = (torch.randn(B, Hkv, N, D).to(dt).to(device) for _ in range(2))
    sl = torch.tensor([60, 20], dtype=torch.int32, device=device)
    assert torch.equal(OPS.decode_attention(qs, k, v, sl), OPS.decode_attention(q, k, v, sl))
    o1, i1 = OPS.select_attention(qs, k, v, sl, 8, "group", 1, 1)
    o2, i2 = OPS.select_attention(q, k, v, sl, 8, "group", 1, 1)
    assert torch.equal(o1, o2) and torch.equal(i1, i2)
    assert torch.equal(OPS.sparse_attention(qs, k, v, i1, sl), OPS.sparse_attention(q, k, v, i1, sl))
    qc = torch.randn(B, Hq, S, D).to(dt).to(device)
    kn, vn = (torch.randn(B, Hkv, S, D).to(dt).to(device) for _ in range(2))
    st = torch.tensor([4, 57], dtype=torch.int32, device=device)
    ka, va, kb, vb = k.clone(), v.clone(), k.clone(), v.clone()
    out_a = OPS.correct_kv_attention(qc, kn, vn, ka, va, st)
    out_b = OPS.correct_kv_attention(_last_dim_strided(qc), _last_dim_strided(kn), _last_dim_strided(vn), kb, vb, st)
    assert torch.equal(out_a, out_b) and torch.equal(ka, kb) and torch.equal(va, vb)


def test_cpu_results_do_not_depend_on_thread_count():
    B, Hq, Hkv, D, N, S = 3, 32, 8, 128, 300, 5
    q = torch.randn(B, Hq, D).to(torch.bfloat16)
    k, v = (torch.randn(B, Hkv, N, D).to(torch.bfloat16) for _ in range(2))
    sl = torch.tensor([300, 1, 129], dtype=torch.int32)
    qc = torch.randn(B, Hq, S, D).to(torch.bfloat16)
    kn, vn = (torch.randn(B, Hkv, S, D).to(torch.bfloat16) for _ in range(2))
    st = torch.tensor([0, 100, 295], dtype=torch.int32)

    def run():
        res = [OPS.decode_attention(q, k, v, sl), *OPS.select_attention(q, k, v, sl, 64, "head", 2, 4),
               *OPS.select_attention(q, k, v, sl, 64, "group")]
        res.append(OPS.sparse_attention(q, k, v, res[2], sl))
        kk, vv = k.clone(), v.clone()
        res += [OPS.correct_kv_attention(qc, kn, vn, kk, vv, st), kk, vv]
        return res

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, n))
        many = run()
    finally:
        torch.set_num_threads(n)
    for i, (a, b) in enumerate(zip(one, many)):
        assert torch.equal(a, b), f"result {i} differs between 1 and {max(2, n)} threads"
