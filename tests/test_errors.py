"""Bad input raises RuntimeError naming the op and the argument ("tidal.<op>: <argument>: expected
X, got Y"); edge inputs with defined results (B = 0, N = 0, seq_len 0 rows) give them.

Value checks (seq_lens outside [0, N], start outside [0, N - S]) read tensor data, which CUDA ops
must not do on the host (no synchronization, CUDA-graph safe; the CUDA kernels clamp instead), so
those cases run on CPU only.
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


# (name, mutate(args, device) -> None, argument regex, ops it applies to, cpu_only)
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


CASES = [
    # q / caches: dtype
    ("q_float64", _set(q=lambda a, d: a["q"].double()), r"q", ALL, False),
    ("q_int32", _set(q=lambda a, d: a["q"].to(torch.int32)), r"q", ALL, False),
    ("all_float64", lambda a, d: [a.__setitem__(k, a[k].double()) for k in ("q", "k_cache", "v_cache", "k", "v") if k in a],
     r"q", ALL, False),
    ("k_cache_dtype", _set(k_cache=lambda a, d: other_dtype(a["k_cache"])), r"k_cache", ALL, False),
    ("v_cache_dtype", _set(v_cache=lambda a, d: other_dtype(a["v_cache"])), r"v_cache", ALL, False),
    # rank / shape
    ("q_rank_plus1", _set(q=lambda a, d: a["q"].unsqueeze(2)), r"q", ALL, False),
    ("q_rank_minus1", _set(q=lambda a, d: a["q"][0]), r"q", ALL, False),
    ("k_cache_rank3", _set(k_cache=lambda a, d: a["k_cache"][0]), r"k_cache", ALL, False),
    ("v_cache_rank5", _set(v_cache=lambda a, d: a["v_cache"][None]), r"v_cache", ALL, False),
    ("B_mismatch_q_caches", _resize_caches(b=B + 1), r"(k_cache|q)", ALL, False),
    ("D_mismatch_q_caches", _resize_caches(d=128), r"(k_cache|q)", ALL, False),
    ("N_mismatch_k_v", _resize_caches(n=N + 1, which=("v_cache",)), r"(v_cache|k_cache)", ALL, False),
    ("Hkv_mismatch_k_v", _resize_caches(hkv=1, which=("v_cache",)), r"(v_cache|k_cache)", ALL, False),
    ("D_mismatch_k_v", _resize_caches(d=128, which=("v_cache",)), r"(v_cache|k_cache)", ALL, False),
    ("Hq_not_multiple_of_Hkv", _all_heads(6, 4), r"(q|Hq|k_cache)", ALL, False),
    ("head_dim_48", _all_heads(HQ, HKV, d=48), r"(q|head dim|D)", ALL, False),
    ("k_cache_last_dim_strided", _set(k_cache=lambda a, d: strided_last(a["k_cache"])), r"k_cache", ALL, False),
    ("v_cache_last_dim_strided", _set(v_cache=lambda a, d: strided_last(a["v_cache"])), r"v_cache", ALL, False),
    ("scale_nan", _set(scale=lambda a, d: float("nan")), r"scale", ALL, False),
    # seq_lens
    ("seq_lens_int64", _set(seq_lens=lambda a, d: a["seq_lens"].long()), r"seq_lens", ATTN, False),
    ("seq_lens_float", _set(seq_lens=lambda a, d: a["seq_lens"].float()), r"seq_lens", ATTN, False),
    ("seq_lens_too_long", _set(seq_lens=lambda a, d: torch.tensor([N, 5, 5], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, False),
    ("seq_lens_2d", _set(seq_lens=lambda a, d: a["seq_lens"][:, None]), r"seq_lens", ATTN, False),
    ("seq_lens_gt_N", _set(seq_lens=lambda a, d: torch.tensor([N + 1, 5], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, True),
    ("seq_lens_negative", _set(seq_lens=lambda a, d: torch.tensor([3, -1], dtype=torch.int32, device=d)),
     r"seq_lens", ATTN, True),
    # select_attention budget / mode
    ("top_k_0", _set(top_k=lambda a, d: 0, sink=lambda a, d: 0, recent=lambda a, d: 0), r"top_k",
     ("select_attention",), False),
    ("top_k_negative", _set(top_k=lambda a, d: -5, sink=lambda a, d: 0, recent=lambda a, d: 0), r"top_k",
     ("select_attention",), False),
    ("top_k_over_max", _set(top_k=lambda a, d: (1 << 20) + 1), r"top_k", ("select_attention",), False),
    ("mode_bogus", _set(mode=lambda a, d: "heads"), r"mode", ("select_attention",), False),
    ("mode_empty", _set(mode=lambda a, d: ""), r"mode", ("select_attention",), False),
    ("sink_negative", _set(sink=lambda a, d: -1), r"sink", ("select_attention",), False),
    ("recent_negative", _set(recent=lambda a, d: -1), r"recent", ("select_attention",), False),
    ("sink_fills_budget", _set(top_k=lambda a, d: 4, sink=lambda a, d: 4, recent=lambda a, d: 0),
     r"(sink|recent|top_k)", ("select_attention",), False),
    ("sink_recent_over_budget", _set(top_k=lambda a, d: 4, sink=lambda a, d: 2, recent=lambda a, d: 3),
     r"(sink|recent|top_k)", ("select_attention",), False),
    # sparse_attention indices
    ("indices_int64", _set(indices=lambda a, d: a["indices"].long()), r"indices", ("sparse_attention",), False),
    ("indices_float", _set(indices=lambda a, d: a["indices"].float()), r"indices", ("sparse_attention",), False),
    ("indices_rank2", _set(indices=lambda a, d: a["indices"][0]), r"indices", ("sparse_attention",), False),
    ("indices_rank4", _set(indices=lambda a, d: a["indices"][..., None]), r"indices", ("sparse_attention",), False),
    ("indices_B_mismatch", _set(indices=lambda a, d: torch.zeros(B + 1, HQ, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), False),
    ("indices_Hsel_3", _set(indices=lambda a, d: torch.zeros(B, 3, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), False),
    ("indices_Hsel_1", _set(indices=lambda a, d: torch.zeros(B, 1, 8, dtype=torch.int32, device=d)),
     r"indices", ("sparse_attention",), False),
    # correct_kv_attention
    ("k_S_mismatch", _set(k=lambda a, d: a["k"][:, :, :S - 1]), r"\bk\b", ("correct_kv_attention",), False),
    ("v_shape_mismatch", _set(v=lambda a, d: a["v"][:, :1]), r"\bv\b", ("correct_kv_attention",), False),
    ("k_Hkv_mismatch_cache", _set(k=lambda a, d: torch.randn(B, HKV * 2, S, D).to(a["k"].dtype).to(d)), r"\bk\b",
     ("correct_kv_attention",), False),
    ("k_dtype", _set(k=lambda a, d: other_dtype(a["k"])), r"\bk\b", ("correct_kv_attention",), False),
    ("v_dtype", _set(v=lambda a, d: other_dtype(a["v"])), r"\bv\b", ("correct_kv_attention",), False),
    ("k_rank3", _set(k=lambda a, d: a["k"][0]), r"\bk\b", ("correct_kv_attention",), False),
    ("start_int64", _set(start=lambda a, d: a["start"].long()), r"start", ("correct_kv_attention",), False),
    ("start_float", _set(start=lambda a, d: a["start"].float()), r"start", ("correct_kv_attention",), False),
    ("start_wrong_length", _set(start=lambda a, d: torch.zeros(B + 1, dtype=torch.int32, device=d)), r"start",
     ("correct_kv_attention",), False),
    ("start_2d", _set(start=lambda a, d: a["start"][:, None]), r"start", ("correct_kv_attention",), False),
    ("start_negative", _set(start=lambda a, d: torch.tensor([-1, 0], dtype=torch.int32, device=d)), r"start",
     ("correct_kv_attention",), True),
    ("start_plus_S_over_N", _set(start=lambda a, d: torch.tensor([0, N - S + 1], dtype=torch.int32, device=d)),
     r"start", ("correct_kv_attention",), True),
]


def _params():
    out = []
    for name, mutate, arg, ops, cpu_only in CASES:
        for op in ops:
            out.append(pytest.param(op, mutate, arg, cpu_only, id=f"{op}-{name}"))
    return out


@pytest.mark.parametrize("op,mutate,arg,cpu_only", _params())
def test_bad_input_names_op_and_argument(op, mutate, arg, cpu_only, device):
    if cpu_only and device != "cpu":
        pytest.skip("value checks read data: CPU only (CUDA kernels clamp instead of syncing)")
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
