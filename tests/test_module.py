"""The C++ TidalAttention layer and DecodeContext from Python (tidal_ext.TidalAttention,
tidal_ext.DecodeContext = torch.classes.tidal.DecodeContext).

* TidalAttention is a torch.nn.Module: parameters, buffers, submodules, state_dict, .to().
* The binding's prefill / decode_step / correct (and the *_qkv methods) equal a pure-Python
  re-implementation that calls torch.ops.tidal.* with the same weights, bit for bit.
* DecodeContext from Python: roles, lengths, the step counter, the correction schedule, the
  selection slot; a wrong ctx type is a TypeError naming ctx; two models/contexts are independent.
CPU always; CUDA too when available (fp16/bf16 only there).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tidal_ext
from tidal_ext import DecodeContext, TidalAttention, TidalConfig

from _util import skip_unsupported

HQ, HKV, D, HIDDEN = 4, 2, 64, 96
THETA, MAX_POS = 10000.0, 64
PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


def make_layer(layer_idx=0, projections=True, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    if projections:
        return TidalAttention(layer_idx, HQ, HKV, D, hidden_size=HIDDEN, rope_theta=THETA, max_positions=MAX_POS)
    return TidalAttention(layer_idx, HQ, HKV, D)


def params(m):
    """name -> parameter (named_parameters works whatever the state of state_dict/attribute access)."""
    return {n: p for n, p in m.named_parameters()}


def move(m, device, dtype):
    """Moves a layer in place (not relying on the return value of .to)."""
    m.to(torch.device(device), dtype)


def lens(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------------
# nn.Module behaviour
# ------------------------------------------------------------------------------------------------
def test_is_an_nn_module_with_parameters_and_buffers():
    m = make_layer(seed=0)
    assert isinstance(m, torch.nn.Module)
    p = params(m)
    assert set(p) == set(PARAMS)
    assert p["q_proj.weight"].shape == (HQ * D, HIDDEN)
    assert p["k_proj.weight"].shape == (HKV * D, HIDDEN)
    assert p["v_proj.weight"].shape == (HKV * D, HIDDEN)
    assert p["o_proj.weight"].shape == (HIDDEN, HQ * D)
    assert all(t.requires_grad for t in p.values())
    assert len(list(m.parameters())) == 4
    assert {n for n, _ in m.named_buffers()} == set()  # rope angles are computed, no tables
    assert {n for n, _ in m.named_children()} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert m.layer_idx == 0
    # without projections or rope: no parameters, no buffers
    plain = make_layer(projections=False)
    assert len(list(plain.parameters())) == 0
    assert len(list(plain.named_buffers())) == 0
    # train / eval
    m.eval()
    assert not m.training
    m.train()
    assert m.training


def test_projection_submodules_expose_their_weights():
    """q_proj etc. are submodules whose .weight is the layer's parameter (as in nn.Linear)."""
    m = make_layer(seed=1)
    p = params(m)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sub = getattr(m, name)
        assert isinstance(sub, torch.nn.Module), f"{name} is a {type(sub)}, not a torch.nn.Module"
        assert sub.weight is p[f"{name}.weight"] or torch.equal(sub.weight, p[f"{name}.weight"])


def test_state_dict_round_trip():
    m = make_layer(seed=2)
    sd = m.state_dict()
    assert set(PARAMS) <= set(sd)
    other = make_layer(seed=3)
    assert not torch.equal(params(other)["q_proj.weight"], params(m)["q_proj.weight"])
    other.load_state_dict(sd)
    for n in PARAMS:
        assert torch.equal(params(other)[n], params(m)[n]), n


def test_to_converts_in_place_and_returns_the_module(device):
    m = make_layer(seed=4)
    before = {n: t.detach().clone() for n, t in params(m).items()}
    r = m.to(torch.device(device), torch.float64 if device == "cpu" else torch.float16)
    want = torch.float64 if device == "cpu" else torch.float16
    for n, t in params(m).items():
        assert t.dtype == want and t.device.type == device, n
        assert torch.equal(t.cpu(), before[n].to(want)), n
    for n, b in m.named_buffers():
        assert b.dtype == want and b.device.type == device, n
    # nn.Module.to returns self, so `model = model.to(device)` works
    assert r is m, f".to() returned {r!r} instead of the module"
    for name in ("float", "cpu"):
        assert getattr(m, name)() is m, f".{name}() does not return the module"


def test_cache_properties_follow_allocate_and_set_cache():
    m = make_layer(seed=5)
    m.allocate_cache(3, 20, torch.float32, "cpu")
    assert m.k_cache is not None and m.k_cache.shape == (3, HKV, 20, D)
    assert m.v_cache is not None and m.v_cache.shape == (3, HKV, 20, D)
    k, v = torch.zeros(1, HKV, 8, D), torch.zeros(1, HKV, 8, D)
    m.set_cache(k, v)
    assert m.k_cache.data_ptr() == k.data_ptr() and m.v_cache.data_ptr() == v.data_ptr()


# ------------------------------------------------------------------------------------------------
# a pure-Python re-implementation of the layer on torch.ops.tidal.*
# ------------------------------------------------------------------------------------------------
class PyLayer:
    """What TidalAttention does, written from include/tidal/attention.h with torch.ops.tidal.*."""

    def __init__(self, layer_idx, weights, dtype, device, k_cache, v_cache):
        self.layer_idx = layer_idx
        self.w = {n: t.detach().clone() for n, t in weights.items()}
        f64 = torch.float64
        inv = torch.pow(THETA, -torch.arange(0, D, 2, dtype=f64) / D)
        ang = torch.outer(torch.arange(MAX_POS, dtype=f64), inv)
        ang = torch.cat([ang, ang], -1)
        # float32 tables whatever the module's dtype (the layer makes its angles in float64)
        self.cos = ang.cos().float().to(device=device)
        self.sin = ang.sin().float().to(device=device)
        self.k_cache, self.v_cache = k_cache, v_cache

    def rotate(self, x, pos):  # x [B, H, S, D], pos [B, S]
        pos = pos.long()
        cos = self.cos.index_select(0, pos.flatten()).view(pos.shape[0], 1, pos.shape[1], -1)
        sin = self.sin.index_select(0, pos.flatten()).view(pos.shape[0], 1, pos.shape[1], -1)
        xf = x.float()
        rot = torch.cat([-xf[..., D // 2:], xf[..., : D // 2]], -1)
        return (xf * cos + rot * sin).to(x.dtype)

    def proj(self, name, x, heads):  # x [B, T, hidden] -> [B, heads, T, D]
        B, T = x.shape[:2]
        return F.linear(x, self.w[name]).view(B, T, heads, D).transpose(1, 2)

    def out(self, o):  # [B, Hq, T, D] -> [B, T, hidden]
        return F.linear(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1), self.w["o_proj.weight"])

    def chunk(self, x, start):
        pos = start.long()[:, None] + torch.arange(x.shape[1], device=x.device)
        q = self.rotate(self.proj("q_proj.weight", x, HQ), pos)
        k = self.rotate(self.proj("k_proj.weight", x, HKV), pos)
        v = self.proj("v_proj.weight", x, HKV)
        return self.out(torch.ops.tidal.correct_kv_attention(q, k, v, self.k_cache, self.v_cache, start.int()))

    def decode(self, x, state):
        pos = (state.lens - 1)[:, None]
        x3 = x[:, None]
        q = self.rotate(self.proj("q_proj.weight", x3, HQ), pos)[:, :, 0]
        k = self.rotate(self.proj("k_proj.weight", x3, HKV), pos)[:, :, 0]
        v = self.proj("v_proj.weight", x3, HKV)[:, :, 0]
        rows = torch.arange(x.shape[0], device=x.device)
        p = pos[:, 0].long()
        self.k_cache[rows, :, p] = k.to(self.k_cache.dtype)
        self.v_cache[rows, :, p] = v.to(self.v_cache.dtype)
        cfg, l = state.cfg, self.layer_idx
        sel = cfg.select_layers
        if not sel or l < sel[0]:
            o = torch.ops.tidal.decode_attention(q, self.k_cache, self.v_cache, state.lens)
        elif l in sel:
            o, state.indices = torch.ops.tidal.select_attention(q, self.k_cache, self.v_cache, state.lens, cfg.top_k,
                                                                cfg.mode, cfg.sink, cfg.recent)
        else:
            o = torch.ops.tidal.sparse_attention(q, self.k_cache, self.v_cache, state.indices, state.lens)
        return self.out(o[:, :, None])[:, 0]


class PyState:
    """The Python re-implementation's own generation state (no DecodeContext)."""

    def __init__(self, cfg, prompt_lens):
        self.cfg, self.lens, self.indices = cfg, prompt_lens.clone(), None


def run_stack(layers, x, fn):
    h = x
    for layer in layers:
        h = h + fn(layer, h)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_binding_equals_python_reimplementation(device, dtype):
    """A 3-layer stack (full, select, sparse; top_k 5 with a sink; correction every 2 steps) through
    the binding and through PyLayer: every output and every cache row identical."""
    skip_unsupported(device, dtype)
    L, B, T, N, steps, S = 3, 2, 12, 32, 4, 2
    cfg = TidalConfig(top_k=5, select_layers=(1,), mode="head", sink=1, recent=0, correction_stride=S)
    torch.manual_seed(10)
    mods, refs = [], []
    for l in range(L):
        m = make_layer(l)
        move(m, device, dtype)
        kc, vc = (torch.zeros(B, HKV, N, D, dtype=dtype, device=device) for _ in range(2))
        m.set_cache(kc, vc)  # borrowed: the test can read the module's cache
        mods.append((m, kc, vc))
        refs.append(PyLayer(l, params(m), dtype, device, torch.zeros_like(kc), torch.zeros_like(vc)))
    ctx = DecodeContext(cfg, L)
    prompt = lens([T, T - 5], device)
    ctx.begin_prefill(prompt)
    st = PyState(cfg, prompt)

    def check_caches(what):
        for l, ((_, kc, vc), r) in enumerate(zip(mods, refs)):
            assert torch.equal(kc, r.k_cache), f"{what}: k_cache of layer {l}"
            assert torch.equal(vc, r.v_cache), f"{what}: v_cache of layer {l}"

    x = torch.randn(B, T, HIDDEN).to(device, dtype)
    with torch.no_grad():
        out_m = run_stack([m for m, _, _ in mods], x, lambda m, h: m.prefill(h, ctx))
        out_r = run_stack(refs, x, lambda r, h: r.chunk(h, torch.zeros(B, dtype=torch.int32, device=device)))
    assert out_m.shape == (B, T, HIDDEN) and out_m.dtype == dtype
    assert torch.equal(out_m, out_r), "prefill"
    check_caches("prefill")

    inputs, corrections = [], 0
    for s in range(1, steps + 1):
        ctx.begin_step()
        st.lens = st.lens + 1
        xs = torch.randn(B, HIDDEN).to(device, dtype)
        inputs.append(xs)
        with torch.no_grad():
            out_m = run_stack([m for m, _, _ in mods], xs, lambda m, h: m.decode_step(h, ctx))
            out_r = run_stack(refs, xs, lambda r, h: r.decode(h, st))
        assert out_m.shape == (B, HIDDEN)
        assert torch.equal(out_m, out_r), f"decode step {s}"
        assert torch.equal(ctx.indices(), st.indices), f"selection of step {s}"
        check_caches(f"decode step {s}")
        if ctx.correction_due():
            corrections += 1
            chunk = torch.stack(inputs[-S:], 1)
            start = st.lens - S
            with torch.no_grad():
                cm = run_stack([m for m, _, _ in mods], chunk, lambda m, h: m.correct(h, ctx))
                cr = run_stack(refs, chunk, lambda r, h: r.chunk(h, start))
            assert cm.shape == (B, S, HIDDEN)
            assert torch.equal(cm, cr), f"correct at step {s}"
            check_caches(f"correct at step {s}")
    assert corrections == steps // S


def test_qkv_methods_equal_the_ops(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, T, N = 2, 9, 24
    cfg = TidalConfig(top_k=4, select_layers=(0,), mode="group", correction_stride=1)
    sel, sparse = make_layer(0, projections=False), make_layer(1, projections=False)
    ctx = DecodeContext(cfg, 2)
    caches = {}
    for name, m in (("sel", sel), ("sparse", sparse)):
        kc, vc = (torch.zeros(B, HKV, N, D, dtype=dtype, device=device) for _ in range(2))
        m.set_cache(kc, vc)
        caches[name] = (kc, vc, kc.clone(), vc.clone())  # module's, reference copies
    prompt = lens([T, 4], device)
    ctx.begin_prefill(prompt)
    rnd = lambda *shape: torch.randn(*shape).to(device, dtype)  # noqa: E731
    zero = torch.zeros(B, dtype=torch.int32, device=device)
    for name, m in (("sel", sel), ("sparse", sparse)):
        q, k, v = rnd(B, HQ, T, D), rnd(B, HKV, T, D), rnd(B, HKV, T, D)
        kc, vc, kr, vr = caches[name]
        assert torch.equal(m.prefill_qkv(q, k, v, ctx), torch.ops.tidal.correct_kv_attention(q, k, v, kr, vr, zero))
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
    ctx.begin_step()
    seq = prompt + 1
    pos = (seq - 1).long()
    idx = None
    for name, m in (("sel", sel), ("sparse", sparse)):
        q, k, v = rnd(B, HQ, D), rnd(B, HKV, D), rnd(B, HKV, D)
        kc, vc, kr, vr = caches[name]
        out = m.decode_qkv(q, k, v, ctx)
        rows = torch.arange(B, device=device)
        kr[rows, :, pos] = k
        vr[rows, :, pos] = v
        if name == "sel":
            ref, idx = torch.ops.tidal.select_attention(q, kr, vr, seq, 4, "group", 0, 0)
            assert torch.equal(ctx.indices(), idx)
            assert ctx.indices().shape == (B, HKV, 4)
        else:
            ref = torch.ops.tidal.sparse_attention(q, kr, vr, idx, seq)
        assert torch.equal(out, ref), name
        assert torch.equal(kc, kr) and torch.equal(vc, vr), name
    assert ctx.correction_due()
    for name, m in (("sel", sel), ("sparse", sparse)):
        q, k, v = rnd(B, HQ, 1, D), rnd(B, HKV, 1, D), rnd(B, HKV, 1, D)
        kc, vc, kr, vr = caches[name]
        out = m.correct_qkv(q, k, v, ctx)
        assert torch.equal(out, torch.ops.tidal.correct_kv_attention(q, k, v, kr, vr, (seq - 1).int())), name
        assert torch.equal(kc, kr) and torch.equal(vc, vr), name


def test_rotate_from_python():
    m = make_layer(seed=6)
    x = torch.randn(2, HQ, 3, D)
    assert torch.equal(m.rotate(x, torch.zeros(2, 3, dtype=torch.long)), x)
    r = m.rotate(x, torch.randint(0, MAX_POS, (2, 3)))
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))


# ------------------------------------------------------------------------------------------------
# DecodeContext from Python
# ------------------------------------------------------------------------------------------------
def test_decode_context_from_python(device):
    cfg = TidalConfig(top_k=16, select_layers=(2, 5), mode="group", sink=2, recent=3, correction_stride=3)
    ctx = DecodeContext(cfg, 8)
    assert isinstance(ctx, torch.ScriptObject)
    assert ctx.num_layers() == 8
    assert (ctx.top_k(), ctx.mode(), ctx.sink(), ctx.recent(), ctx.correction_stride()) == (16, "group", 2, 3, 3)
    ctx.begin_prefill(lens([7, 4], device))
    assert ctx.in_prefill() and ctx.step() == 0
    assert [ctx.role(l) for l in range(8)] == ["full"] * 8
    assert ctx.seq_lens().device.type == device and ctx.seq_lens().dtype == torch.int32
    assert ctx.seq_lens().tolist() == [7, 4]
    expected_roles = ["full", "full", "select", "sparse", "sparse", "select", "sparse", "sparse"]
    for s in range(1, 7):
        ctx.begin_step()
        assert not ctx.in_prefill() and ctx.step() == s
        assert [ctx.role(l) for l in range(8)] == expected_roles
        assert ctx.seq_lens().tolist() == [7 + s, 4 + s]
        assert ctx.positions().tolist() == [6 + s, 3 + s]
        assert ctx.correction_due() == (s % 3 == 0), s
    assert ctx.correction_start(3).tolist() == [10, 7]
    with pytest.raises(RuntimeError, match="DecodeContext.indices"):
        ctx.indices()
    assert not ctx.has_indices()
    idx = torch.randint(-1, 10, (2, 2, 16), dtype=torch.int32, device=device)
    ctx.set_indices(idx)
    assert ctx.has_indices()
    got = ctx.indices()
    assert torch.equal(got, idx) and got.data_ptr() == idx.data_ptr()
    with pytest.raises(RuntimeError, match="set_indices.*indices"):
        ctx.set_indices(idx.long())
    with pytest.raises(RuntimeError, match="DecodeContext.role.*layer_idx"):
        ctx.role(8)
    ctx.begin_prefill(lens([3, 3], device))
    assert not ctx.has_indices() and ctx.step() == 0 and ctx.role(3) == "full"


def test_decode_context_constructor_checks():
    with pytest.raises(RuntimeError, match="num_layers"):
        DecodeContext(TidalConfig(top_k=16, select_layers=()), 0)
    with pytest.raises(RuntimeError, match="select_layers"):
        DecodeContext(TidalConfig(top_k=16, select_layers=(2, 13)), 13)


@pytest.mark.parametrize("bad", [None, 3, "ctx", "config", "config_cpp", "tensor"])
def test_wrong_ctx_type_is_a_type_error_naming_ctx(bad):
    cfg = TidalConfig(top_k=4, select_layers=())
    obj = {"config": cfg, "config_cpp": cfg._cpp, "tensor": torch.zeros(2), "ctx": "ctx"}.get(bad, bad)
    m = make_layer(seed=7)
    m.allocate_cache(1, 8, torch.float32, "cpu")
    calls = [
        lambda: m.prefill(torch.randn(1, 2, HIDDEN), obj),
        lambda: m.decode_step(torch.randn(1, HIDDEN), obj),
        lambda: m.correct(torch.randn(1, 1, HIDDEN), obj),
        lambda: m.decode_qkv(torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D), obj),
        lambda: m.prefill_qkv(torch.randn(1, HQ, 2, D), torch.randn(1, HKV, 2, D), torch.randn(1, HKV, 2, D), obj),
        lambda: m.correct_qkv(torch.randn(1, HQ, 1, D), torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D), obj),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"TidalAttention.*ctx.*DecodeContext"):
            call()


def test_misuse_errors_name_tidal_attention():
    m = make_layer(seed=8)
    ctx = DecodeContext(TidalConfig(top_k=4, select_layers=()), 1)
    ctx.begin_prefill(torch.tensor([2], dtype=torch.int32))
    ctx.begin_step()
    with pytest.raises(RuntimeError, match=r"TidalAttention.*k_cache.*allocate_cache"):
        m.decode_step(torch.randn(1, HIDDEN), ctx)
    m.allocate_cache(1, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"TidalAttention.decode_step: x"):
        m.decode_step(torch.randn(1, HIDDEN + 1), ctx)
    with pytest.raises(RuntimeError, match=r"TidalAttention.*x"):
        m.prefill(torch.randn(1, HIDDEN), ctx)
    with pytest.raises(RuntimeError, match=r"TidalAttention.*num_heads"):
        TidalAttention(0, 4, 3, 64)


def _cuda_or_meta():
    return "cuda" if torch.cuda.is_available() else "meta"


@pytest.mark.parametrize("call,match", [
    (lambda m: m.allocate_cache(-1, 8, torch.float32, "cpu"), r"allocate_cache: batch: expected >= 0, got -1"),
    (lambda m: m.allocate_cache(1, -2, torch.float32, "cpu"), r"allocate_cache: capacity: .*got -2"),
    (lambda m: m.allocate_cache(1, 1 << 31, torch.float16, "cpu"), r"allocate_cache: capacity: .*2147483648"),
    (lambda m: m.allocate_cache(1, 8, torch.float64, "cpu"), r"allocate_cache: dtype: .*Double"),
    (lambda m: m.set_cache(torch.zeros(1, HKV, 8, D, dtype=torch.int32), torch.zeros(1, HKV, 8, D, dtype=torch.int32)),
     r"set_cache: k_cache: expected dtype .*Int"),
    (lambda m: m.set_cache(torch.zeros(1, HKV, 8, D), torch.zeros(1, HKV, 8, D, dtype=torch.bfloat16)),
     r"set_cache: v_cache: expected dtype Float .*BFloat16"),
    (lambda m: m.set_cache(torch.zeros(1, HKV, 8, D), torch.zeros(1, HKV, 8, D, device=_cuda_or_meta())),
     r"set_cache: v_cache: expected device cpu"),
    (lambda m: m.set_cache(torch.zeros(1, HKV, 8, 2 * D)[..., ::2], torch.zeros(1, HKV, 8, D)),
     r"set_cache: k_cache: expected a contiguous last dim"),
], ids=["batch", "capacity", "capacity_2e31", "dtype", "set_int32", "set_v_dtype", "set_v_device", "set_strided"])
def test_cache_misconfiguration_fails_when_attached(call, match):
    """What every op would reject at the first token is rejected by allocate_cache / set_cache."""
    m = make_layer(seed=9)
    with pytest.raises(RuntimeError, match=rf"tidal.TidalAttention.{match}"):
        call(m)
    assert m.k_cache is None and m.v_cache is None  # nothing attached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA dtypes")
def test_float32_cuda_cache_fails_when_attached():
    m = make_layer(seed=9)
    with pytest.raises(RuntimeError, match=r"allocate_cache: dtype: expected dtype Half or BFloat16 on CUDA"):
        m.allocate_cache(1, 8, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match=r"set_cache: k_cache: expected dtype Half or BFloat16 on CUDA"):
        m.set_cache(torch.zeros(1, HKV, 8, D, device="cuda"), torch.zeros(1, HKV, 8, D, device="cuda"))


def test_construction_and_first_call_checks():
    """A non-finite scale fails at construction; a layer beyond the context's layers at its prefill
    (before any decode token)."""
    with pytest.raises(RuntimeError, match=r"tidal.TidalAttention: scale: expected a finite number"):
        TidalAttention(0, HQ, HKV, D, scale=float("inf"))
    m = make_layer(layer_idx=3, seed=10)
    m.allocate_cache(1, 8, torch.float32, "cpu")
    ctx = DecodeContext(TidalConfig(top_k=4, select_layers=()), 3)
    ctx.begin_prefill(lens([2], "cpu"))
    with pytest.raises(RuntimeError, match=r"TidalAttention.prefill: ctx: expected .*layer_idx = 3.*got 3 layers"):
        m.prefill(torch.randn(1, 2, HIDDEN), ctx)


# ------------------------------------------------------------------------------------------------
# independence
# ------------------------------------------------------------------------------------------------
def _generation(cfg, seed, device, dtype, interleave_with=None):
    """A 3-layer stack driven through prefill + 4 steps (+ corrections); returns the outputs."""
    torch.manual_seed(seed)
    layers = []
    for l in range(3):
        m = make_layer(l)
        move(m, device, dtype)
        m.allocate_cache(2, 24, dtype, device)
        layers.append(m)
    gen = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    ctx = DecodeContext(cfg, 3)
    ctx.begin_prefill(lens([10, 6], device))
    with torch.no_grad():
        outs = [run_stack(layers, rnd(2, 10, HIDDEN), lambda m, h: m.prefill(h, ctx))]
    yield
    inputs = []
    for _ in range(4):
        ctx.begin_step()
        inputs.append(rnd(2, HIDDEN))
        with torch.no_grad():
            outs.append(run_stack(layers, inputs[-1], lambda m, h: m.decode_step(h, ctx)))
            if ctx.correction_due():
                S = cfg.correction_stride
                outs.append(run_stack(layers, torch.stack(inputs[-S:], 1), lambda m, h: m.correct(h, ctx)))
        outs.append(ctx.indices().clone())
        yield
    yield outs


def _run_alone(cfg, seed, device, dtype):
    g = _generation(cfg, seed, device, dtype)
    result = None
    for result in g:
        pass
    return result


def test_two_models_and_contexts_do_not_interfere(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg_a = TidalConfig(top_k=4, select_layers=(1,), mode="head", correction_stride=2)
    cfg_b = TidalConfig(top_k=6, select_layers=(0,), mode="group", sink=1, recent=1)
    alone_a = _run_alone(cfg_a, 100, device, dtype)
    alone_b = _run_alone(cfg_b, 200, device, dtype)
    # interleaved: step A, step B, step A, ... in one process
    ga, gb = _generation(cfg_a, 100, device, dtype), _generation(cfg_b, 200, device, dtype)
    out_a = out_b = None
    while out_a is None or out_b is None:
        ra, rb = next(ga, None), next(gb, None)
        out_a = ra if ra is not None else out_a
        out_b = rb if rb is not None else out_b
    for name, got, want in (("A", out_a, alone_a), ("B", out_b, alone_b)):
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"model {name}, output {i}"
