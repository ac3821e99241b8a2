"""Bad input raises RuntimeError naming the op and the argument ("tidal.<op>: <argument>: expected
X, got Y"); edge inputs with defined results (B = 0, N = 0, seq_len 0 rows) give them.

Value checks (seq_lens outside [0, N], start outside [0, N - S]) read tensor data, which CUDA ops
must not do on the host (no synchronization, CUDA-graph safe; the CUDA kernels clamp instead), so
those cases run on CPU only. CUDA-only cases: float32 (CPU has it), cache rows that are not 16-byte
aligned, and the grid limit B <= 65535. Shape-only cases with huge
dims (N = 2^31, B = 65536) use expand()ed zero-stride tensors: the checks read shapes only,
so nothing big is allocated. Real > 2^31-element offsets are tests/test_large.py.
"""

import pytest
import torch

import tidal_ext  # noqa: F401

OPS = torch.ops.tidal
OP_NAMES = ["decode_attention", "select_attention", "sparse_attention", "correct_kv_attention"]
B, HQ, HKV, D, N, S = 2, 4, 2, 64, 16, 3


def base_args(op, device, dtype=torch.float32):
    """Valid keyword arguments of `op` (small shapes)."""
    r = lambda *s: torch.randn(*s).to(dtype).to(device)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    if op == "correct_kv_attention":
        return dict(q=r(B, HQ, S, D), k=r(B, HKV, S, D), v=r(B, HKV, S, D), k_cache=r(B, HKV, N, D),
                    v_cache=r(B, HKV, N, D), start=i32([0, N - S]))
    a = dict(q=r(B, HQ, D), k_cache=r(B, HKV, N, D), v_cache=r(B, HKV, N, D), seq_lens=i32([N, 5]))
    if op == "select_attention":
        a.update(top_k=8, mode="head", sink=1, recent=2)
    if op == "sparse_attention":
        a["indices"] = torch.randint(-1, N, (B, HQ, 8), dtype=torch.int32, device=device)
    return a


def call(op, args):
    return getattr(OPS, op)(**args)


def strided_last(t):
    """Same values, last-dim stride 2."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def other_dtype(t):
    """A supported float dtype different from t's."""
    return t.to(torch.bfloat16 if t.dtype == torch.float16 else torch.float16)


# (name, mutate(args, device) -> None, argument regex, ops it applies to, only: None | "cpu" | "cuda")
ATTN = ("decode_attention", "select_attention", "sparse_attention")
ALL = tuple(OP_NAMES)


def _set(**kw):
    def f(a, dev):
        for key, fn in kw.items():
            a[key] = fn(a, dev)
    return f


def _resize_caches(b=B, hkv=HKV, n=N, d=D, which=("k_cache", "v_cache")):
    def f(a, dev):
        for key in which:
            a[key] = torch.randn(b, hkv, n, d).to(a[key].dtype).to(dev)
    return f


def _all_heads(hq, hkv, d=D):
    """Consistent shapes everywhere except the property under test."""
    def f(a, dev):
        dt = a["q"].dtype
        sq = (B, hq, S, d) if a["q"].dim() == 4 else (B, hq, d)
        a["q"] = torch.randn(*sq).to(dt).to(dev)
        for key in ("k_cache", "v_cache"):
            a[key] = torch.randn(B, hkv, N, d).to(dt).to(dev)
        for key in ("k", "v"):
            if key in a:
                a[key] = torch.randn(B, hkv, S, d).to(dt).to(dev)
        if "indices" in a:
            a["indices"] = torch.zeros(B, hq, 8, dtype=torch.int32, device=dev)
    return f


def _expand_caches(n=N, b=B):
    """Zero-stride caches [b, HKV, n, D]: any shape, no memory (the checks read shapes only)."""
    def f(a, dev):
        for key in ("k_cache", "v_cache"):
            a[key] = torch.zeros(1, HKV, 1, D, dtype=a[key].dtype, device=dev).expand(b, HKV, n, D)
    return f


def _huge_batch(bb):
    """Every tensor argument with batch bb: zero-stride views, seq_lens/start real zeros."""
    def f(a, dev):
        for key, t in list(a.items()):
            if key in ("seq_lens", "start"):
                a[key] = torch.zeros(bb, dtype=torch.int32, device=dev)
            elif isinstance(t, torch.Tensor):
                a[key] = t[:1].expand(bb, *t.shape[1:])
    return f


def misaligned(t):
    """Same shape and values, the data pointer one element past a 16-byte boundary."""
    view = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)[1:1 + t.numel()].view(t.shape)
    return view.copy_(t)


def padded_rows(t):
    """Same values, row stride D + 4 elements (not a multiple of 8)."""
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 4, dtype=t.dtype, device=t.device)
    big[..., :t.shape[-1]] = t
    return big[..., :t.shape[-1]]


def _floats(dtype):
    return lambda a, d: [a.__setitem__(k, a[k].to(dtype)) for k in ("q", "k_cache", "v_cache", "k", "v") if k in a]


i32 = lambda v, d: torch.tensor(v, dtype=torch.int32, device=d)  # noqa: E731

CASES = [
    # q / caches: dtype
    ("q_float64", _set(q=lambda a, d: a["q"].double()), r"q", ALL, None),
    ("q_int32", _set(q=lambda a, d: a["q"].to(torch.int32)), r"q", ALL, None),
    ("all_float64", lambda a, d: [a.__setitem__(k, a[k].double()) for k in ("q", "k_cache", "v_cache", "k", "v") if k in a],
     r"q", ALL, None),
    ("k_cache_dtype", _set(k_cache=lambda a, d: other_dtype(a["k_cache"])), r"k_cache", ALL, None),
    ("v_cache_dtype", _set(v_cache=lambda a, d: other_dtype(a["v_cache"])), r"v_cache", ALL, None),
    # rank / shape
    ("q_rank_plus1", _set(q=lambda a, d: a["q"].unsqueeze(2)), r"q", ALL, None),
    ("q_rank_minus1", _set(q=lambda a, d: a["q"][0]), r"q", ALL, None),
    ("k_cache_rank3", _set(k_cache=lambda a, d: a["k_cache"][0]), r"k_cache", ALL, None),
    ("v_cache_rank5", _set(v_cache=lambda a, d: a["v_cache"][None]), r"v_cache", ALL, None),
    ("B_mismatch_q_caches", _resize_caches(b=B + 1), r"(k_cache|q)", ALL, None),
    ("D_mismatch_q_caches", _resize_caches(d=128), r"(k_cache|q)", ALL, None),
    ("N_mismatch_k_v", _resize_caches(n=N + 1, which=("v_cache",)), r"(v_cache|k_cache)", ALL, None),
    ("Hkv_mismatch_k_v", _resize_caches(hkv=1, which=("v_cache",)), r"(v_cache|k_cache)", ALL, None),
    ("D_mismatch_k_v", _resize_caches(d=128, which=("v_cache",)), r"(v_cache|k_cache)", ALL, None),
    ("Hq_not_multiple_of_Hkv", _all_heads(6, 4), r"(q|Hq|k_cache)", ALL, None),
    ("head_dim_48", _all_heads(HQ, HKV, d=48), r"(q|head dim|D)", ALL, None),
    ("k_cache_last_dim_strided", _set(k_cache=lambda a, d: strided_last(a["k_cache"])), r"k_cache", ALL, None),
    ("v_cache_last_dim_strided", _set(v_cache=lambda a, d: strided_last(a["v_cache"])), r"v_cache", ALL, None),
    ("scale_nan", _set(scale=lambda a, d: float("nan")), r"scale", ALL, None),
    # seq_lens
    ("seq_lens_int64", _set(seq_lens=lambda a, d: a["seq_lens"].long()), r"seq_lens", ATTN, None),
    ("seq_lens_float", _set(seq_lens=lambda a, d: a["seq_lens"].float()), r"seq_lens", ATTN, None),
    ("seq_lens_too_long", _set(seq_lens=lambda a, d: torch.tensor([N, 5, 5], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, None),
    ("seq_lens_2d", _set(seq_lens=lambda a, d: a["seq_lens"][:, None]), r"seq_lens", ATTN, None),
    ("seq_lens_gt_N", _set(seq_lens=lambda a, d: torch.tensor([N + 1, 5], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, "cpu"),
    ("seq_lens_negative", _set(seq_lens=lambda a, d: torch.tensor([3, -1], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, "cpu"),
    # select_attention budget / mode
    ("top_k_0", _set(top_k=lambda a, d: 0, sink=lambda a, d: 0, recent=lambda a, d: 0), r"top_k",
     ("select_attention",), None),
    ("top_k_negative", _set(top_k=lambda a, d: -5, sink=lambda a, d: 0, recent=lambda a, d: 0), r"top_k",
     ("select_attention",), None),
    ("top_k_over_max", _set(top_k=lambda a, d: (1 << 20) + 1), r"top_k", ("select_attention",), None),
    ("mode_bogus", _set(mode=lambda a, d: "heads"), r"mode", ("select_attention",), None),
    ("mode_empty", _set(mode=lambda a, d: ""), r"mode", ("select_attention",), None),
    ("sink_negative", _set(sink=lambda a, d: -1), r"sink", ("select_attention",), None),
    ("recent_negative", _set(recent=lambda a, d: -1), r"recent", ("select_attention",), None),
    ("sink_fills_budget", _set(top_k=lambda a, d: 4, sink=lambda a, d: 4, recent=lambda a, d: 0),
     r"(sink|recent|top_k)", ("select_attention",), None),
    ("sink_recent_over_budget", _set(top_k=lambda a, d: 4, sink=lambda a, d: 2, recent=lambda a, d: 3),
     r"(sink|recent|top_k)", ("select_attention",), None),
    # sparse_attention indices
    ("indices_int64", _set(indices=lambda a, d: a["indices"].long()), r"indices", ("sparse_attention",), None),
    ("indices_float", _set(indices=lambda a, d: a["indices"].float()), r"indices", ("sparse_attention",), None),
    ("indices_rank2", _set(indices=lambda a, d: a["indices"][0]), r"indices", ("sparse_attention",), None),
    ("indices_rank4", _set(indices=lambda a, d: a["indices"][..., None]), r"indices", ("sparse_attention",), None),
    ("indices_B_mismatch", _set(indices=lambda a, d: torch.zeros(B + 1, HQ, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), None),
    ("indices_Hsel_3", _set(indices=lambda a, d: torch.zeros(B, 3, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), None),
    ("indices_Hsel_1", _set(indices=lambda a, d: torch.zeros(B, 1, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), None),
    # correct_kv_attention
    ("k_S_mismatch", _set(k=lambda a, d: a["k"][:, :, :S - 1]), r"\bk\b", ("correct_kv_attention",), None),
    ("v_shape_mismatch", _set(v=lambda a, d: a["v"][:, :1]), r"\bv\b", ("correct_kv_attention",), None),
    ("k_Hkv_mismatch_cache", _set(k=lambda a, d: torch.randn(B, HKV * 2, S, D).to(a["k"].dtype).to(d)), r"\bk\b",
     ("correct_kv_attention",), None),
    ("k_dtype", _set(k=lambda a, d: other_dtype(a["k"])), r"\bk\b", ("correct_kv_attention",), None),
    ("v_dtype", _set(v=lambda a, d: other_dtype(a["v"])), r"\bv\b", ("correct_kv_attention",), None),
    ("k_rank3", _set(k=lambda a, d: a["k"][0]), r"\bk\b", ("correct_kv_attention",), None),
    ("start_int64", _set(start=lambda a, d: a["start"].long()), r"start", ("correct_kv_attention",), None),
    ("start_float", _set(start=lambda a, d: a["start"].float()), r"start", ("correct_kv_attention",), None),
    ("start_wrong_length", _set(start=lambda a, d: torch.zeros(B + 1, dtype=torch.int32, device=d)), r"start",
     ("correct_kv_attention",), None),
    ("start_2d", _set(start=lambda a, d: a["start"][:, None]), r"start", ("correct_kv_attention",), None),
    ("start_negative", _set(start=lambda a, d: torch.tensor([-1, 0], dtype=torch.int32, device=d)), r"start",
     ("correct_kv_attention",), "cpu"),
    ("start_plus_S_over_N", _set(start=lambda a, d: torch.tensor([0, N - S + 1], dtype=torch.int32, device=d)),
     r"start", ("correct_kv_attention",), "cpu"),
    # ---- added by the issue-7 audit: every argument's dtype/rank/shape on every op
    ("all_float32_on_cuda", _floats(torch.float32), r"q", ALL, "cuda"),
    ("k_cache_float64", _set(k_cache=lambda a, d: a["k_cache"].double()), r"k_cache", ALL, None),
    ("v_cache_int32", _set(v_cache=lambda a, d: a["v_cache"].to(torch.int32)), r"v_cache", ALL, None),
    ("k_cache_rank5", _set(k_cache=lambda a, d: a["k_cache"][None]), r"k_cache", ALL, None),
    ("v_cache_rank3", _set(v_cache=lambda a, d: a["v_cache"][0]), r"v_cache", ALL, None),
    ("Hq_0", _all_heads(0, HKV), r"q", ALL, None),
    ("Hkv_0", _all_heads(HQ, 0), r"k_cache", ALL, None),
    ("head_dim_0", _all_heads(HQ, HKV, d=0), r"(q|head dim)", ALL, None),
    ("head_dim_512", _all_heads(HQ, HKV, d=512), r"(q|head dim)", ALL, None),
    ("N_over_int32", _expand_caches(n=1 << 31), r"k_cache", ALL, None),
    ("scale_inf", _set(scale=lambda a, d: float("inf")), r"scale", ALL, None),
    ("seq_lens_too_short", _set(seq_lens=lambda a, d: i32([N], d)), r"seq_lens", ATTN, None),
    ("seq_lens_0d", _set(seq_lens=lambda a, d: i32(N, d)), r"seq_lens", ATTN, None),
    ("seq_lens_bool", _set(seq_lens=lambda a, d: a["seq_lens"] > 0), r"seq_lens", ATTN, None),
    ("top_k_2e40", _set(top_k=lambda a, d: 1 << 40), r"top_k", ("select_attention",), None),
    ("mode_case", _set(mode=lambda a, d: "Head"), r"mode", ("select_attention",), None),
    ("recent_over_budget", _set(top_k=lambda a, d: 4, sink=lambda a, d: 0, recent=lambda a, d: 5),
     r"(sink|recent|top_k)", ("select_attention",), None),
    ("indices_int16", _set(indices=lambda a, d: a["indices"].to(torch.int16)), r"indices", ("sparse_attention",), None),
    ("indices_0d", _set(indices=lambda a, d: i32(0, d)), r"indices", ("sparse_attention",), None),
    ("k_B_mismatch", _set(k=lambda a, d: torch.randn(B + 1, HKV, S, D).to(a["k"].dtype).to(d)), r"\bk\b",
     ("correct_kv_attention",), None),
    ("k_D_mismatch", _set(k=lambda a, d: torch.randn(B, HKV, S, 2 * D).to(a["k"].dtype).to(d)), r"\bk\b",
     ("correct_kv_attention",), None),
    ("v_S_mismatch", _set(v=lambda a, d: a["v"][:, :, :S - 1]), r"\bv\b", ("correct_kv_attention",), None),
    ("v_rank5", _set(v=lambda a, d: a["v"][None]), r"\bv\b", ("correct_kv_attention",), None),
    ("start_0d", _set(start=lambda a, d: i32(0, d)), r"start", ("correct_kv_attention",), None),
    ("start_too_short", _set(start=lambda a, d: i32([0], d)), r"start", ("correct_kv_attention",), None),
    # CUDA-only: 16-byte cp.async rows, grid limits (huge shapes as zero-stride views)
    ("k_cache_misaligned_pointer", _set(k_cache=lambda a, d: misaligned(a["k_cache"])), r"k_cache", ALL, "cuda"),
    ("v_cache_row_stride_not_8", _set(v_cache=lambda a, d: padded_rows(a["v_cache"])), r"v_cache", ALL, "cuda"),
    ("batch_65536", _huge_batch(65536), r"q", ALL, "cuda"),
]


def _params():
    out = []
    for name, mutate, arg, ops, only in CASES:
        for op in ops:
            out.append(pytest.param(op, mutate, arg, only, id=f"{op}-{name}"))
    return out


@pytest.mark.parametrize("op,mutate,arg,only", _params())
def test_bad_input_names_op_and_argument(op, mutate, arg, only, device):
    if only == "cpu" and device != "cpu":
        pytest.skip("value checks read data: CPU only (CUDA kernels clamp instead of syncing)")
    if only == "cuda" and device != "cuda":
        pytest.skip("a CUDA-only limit (valid on CPU)")
    dtype = torch.float32 if device == "cpu" else torch.float16
    args = base_args(op, device, dtype)
    call(op, dict(args))  # the unmodified arguments are valid
    mutate(args, device)
    with pytest.raises(RuntimeError, match=rf"(?s)tidal\.{op}\b.*\b{arg}\b"):
        call(op, args)


# --------------------------------------------------------------------------------------------------
# device mismatches: a 'meta' tensor mixed with real ones (and cpu/cuda mixes when CUDA exists)
# --------------------------------------------------------------------------------------------------
DEVICE_ARGS = {
    "decode_attention": ["q", "k_cache", "v_cache", "seq_lens"],
    "select_attention": ["q", "k_cache", "v_cache", "seq_lens"],
    "sparse_attention": ["q", "k_cache", "v_cache", "seq_lens", "indices"],
    "correct_kv_attention": ["q", "k", "v", "k_cache", "v_cache", "start"],
}
OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op,moved", [(op, a) for op, args in DEVICE_ARGS.items() for a in args])
def test_device_mismatch(op, moved, other):
    dtype = torch.float16 if other == "cuda" else torch.float32
    args = base_args(op, "cpu", dtype)
    args[moved] = args[moved].to(other)
    # q moved: every other argument is the odd one out; the message names one of them
    names = "|".join(a for a in DEVICE_ARGS[op] if a != "q") if moved == "q" else moved
    with pytest.raises(RuntimeError, match=rf"(?s)tidal\.{op}\b.*\b({names})\b.*device"):
        call(op, args)


# --------------------------------------------------------------------------------------------------
# valid edge inputs
# --------------------------------------------------------------------------------------------------
def test_budget_boundaries_are_accepted(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    a = base_args("select_attention", device, dtype)
    a.update(top_k=4, sink=3, recent=1)  # sink + max(recent, 1) == top_k
    _, idx = call("select_attention", a)
    assert idx[0].tolist() == [[0, 1, 2, N - 1]] * HQ
    a.update(top_k=3, sink=0, recent=3)
    _, idx = call("select_attention", a)
    assert idx[0].tolist() == [[N - 3, N - 2, N - 1]] * HQ
    a.update(top_k=1 << 20, sink=0, recent=0, seq_lens=None)  # the largest top_k
    _, idx = call("select_attention", a)
    assert idx.shape == (B, HQ, 1 << 20) and (idx[:, :, N:] == -1).all()


@pytest.mark.parametrize("op", OP_NAMES)
def test_empty_batch(op, device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    args = base_args(op, device, dtype)
    for key, t in list(args.items()):
        if isinstance(t, torch.Tensor):
            args[key] = t[:0]
    res = call(op, args)
    if op == "select_attention":
        out, idx = res
        assert idx.shape == (0, HQ, 8) and idx.dtype == torch.int32
    else:
        out = res
    assert out.shape == (0,) + tuple(args["q"].shape[1:]) and out.dtype == dtype


@pytest.mark.parametrize("with_seq_lens", [False, True], ids=["seq_lens_none", "seq_lens_zero"])
@pytest.mark.parametrize("mode", ["head", "group"])
def test_empty_cache_gives_zeros(mode, with_seq_lens, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(B, HQ, D).to(dtype).to(device)
    kc = torch.randn(B, HKV, 0, D).to(dtype).to(device)
    sl = torch.zeros(B, dtype=torch.int32, device=device) if with_seq_lens else None
    out = OPS.decode_attention(q, kc, kc.clone(), sl)
    assert out.shape == (B, HQ, D) and (out == 0).all()
    out, idx = OPS.select_attention(q, kc, kc.clone(), sl, 8, mode)
    assert (out == 0).all() and idx.shape == (B, HQ if mode == "head" else HKV, 8) and (idx == -1).all()
    indices = torch.tensor([[[-1, 0, 3]] * HQ] * B, dtype=torch.int32, device=device)
    out = OPS.sparse_attention(q, kc, kc.clone(), indices, sl)
    assert (out == 0).all()


@pytest.mark.parametrize("mode", ["head", "group"])
def test_seq_len_zero_rows(mode, device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = torch.randn(3, HQ, D).to(dtype).to(device)
    kc, vc = (torch.randn(3, HKV, N, D).to(dtype).to(device) for _ in range(2))
    kc[1] = float("nan")  # row 1 is a padding slot: never read
    vc[1] = float("nan")
    sl = torch.tensor([N, 0, 4], dtype=torch.int32, device=device)
    out = OPS.decode_attention(q, kc, vc, sl)
    assert (out[1] == 0).all() and torch.isfinite(out).all() and (out[0] != 0).any()
    out, idx = OPS.select_attention(q, kc, vc, sl, 8, mode, 1, 1)
    assert (out[1] == 0).all() and (idx[1] == -1).all() and torch.isfinite(out).all()
    assert idx[2, 0].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    indices = torch.tensor([[[0, 5, 9]] * HQ] * 3, dtype=torch.int32, device=device)
    out = OPS.sparse_attention(q, kc, vc, indices, sl)
    assert (out[1] == 0).all() and torch.isfinite(out).all()


def test_out_of_range_indices_are_skipped(device):
    """ops.h: index entries < 0 or >= seq_len (int32's extremes included) are skipped, never read:
    the output equals that of the same rows with -1 in those slots. No valid entry, or K = 0: zeros."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    a = base_args("sparse_attention", device, dtype)
    idx = a["indices"]
    junk = i32([-(1 << 31), (1 << 31) - 1, N, N + 1, -7], device)
    swap = torch.rand(idx.shape, device=device) < 0.5
    a["indices"] = torch.where(swap, junk[torch.randint(0, 5, idx.shape, device=device)], idx)
    extreme = call("sparse_attention", a)
    a["indices"] = torch.where(swap, torch.full_like(idx, -1), idx)
    assert torch.equal(extreme, call("sparse_attention", a))
    for none_valid in (junk[torch.randint(0, 5, idx.shape, device=device)], idx[..., :0]):
        a["indices"] = none_valid
        assert (call("sparse_attention", a) == 0).all()


@pytest.mark.parametrize("n", [N, 0], ids=["N16", "N0"])
def test_correct_kv_empty_chunk(n, device):
    """S = 0 (also with N = 0): an empty [B, Hq, 0, D] output, the caches untouched."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    r = lambda *s: torch.randn(*s).to(dtype).to(device)  # noqa: E731
    kc, vc = r(B, HKV, n, D), r(B, HKV, n, D)
    k0, v0 = kc.clone(), vc.clone()
    out = OPS.correct_kv_attention(r(B, HQ, 0, D), r(B, HKV, 0, D), r(B, HKV, 0, D), kc, vc, i32([0, n], device))
    assert out.shape == (B, HQ, 0, D) and out.dtype == dtype
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.parametrize("op", OP_NAMES)
def test_strided_small_arguments_are_accepted(op, device):
    """seq_lens, start and indices of any strides (here a stride-2 last dim; the launchers make them
    contiguous) give exactly the results of their contiguous copies."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    a = base_args(op, device, dtype)
    strided = dict(a)
    for key in ("seq_lens", "start", "indices"):
        if key in a:
            strided[key] = strided_last(a[key])
            assert strided[key].stride(-1) == 2
    if op == "correct_kv_attention":
        for key in ("k_cache", "v_cache"):
            strided[key] = a[key].clone()
    res, res_s = call(op, a), call(op, strided)
    for x, y in zip(res if isinstance(res, tuple) else (res,), res_s if isinstance(res_s, tuple) else (res_s,)):
        assert torch.equal(x, y)
    if op == "correct_kv_attention":
        assert torch.equal(a["k_cache"], strided["k_cache"]) and torch.equal(a["v_cache"], strided["v_cache"])
