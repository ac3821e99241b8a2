"""HuggingFace drop-in (tidal_ext.hf, issue 5): attn_implementation="tidal" in tiny random-weight
Llama / Qwen2 / Qwen3 / Mistral models (GQA, built from configs, no download).

* top_k >= context: logits (prefill and every decode step) and greedy generate() equal to "sdpa",
  DynamicCache and StaticCache, a batch of 3 left-padded prompts; the compact cache layout holds the
  same K/V as sdpa's cache.
* small top_k: decode logits equal to an independent masking reference of the PPSA schedule
  (tests/hf_util.py, "ppsa_ref"): full layers, select layers' top-k of the pre-softmax scores (head
  and group mode, newest/sink/recent forced), sparse layers masked to the selection; padded
  positions never attended or selected; generate() equal to the reference's.
* two models with different configs in one process; enable() validation.
* KV-cache correction: the corrected rows equal full attention's K/V, nothing else changes.
* torch.compile (fullgraph, no graph breaks) of the decode step and of the attention path; on CUDA,
  StaticCache + torch.compile(mode="reduce-overhead") generate() equal to eager.

CPU runs in fp32; with CUDA the same tests also run in fp16/bf16 (the kernels' dtypes), where an
output must be at most 2x as far from the fp32 result as sdpa's in the same dtype (DESIGN.md 6).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import tidal_ext
import tidal_ext.hf
from hf_util import (FAMILIES, PAD_ID, VOCAB, Batch, PPSASchedule, decode_step, make_batch, make_model,
                     make_ref_model, max_abs, native_valid_rows, new_cache, positions_of, prefill,
                     random_state_dict, teacher_forced, valid_prefill_logits)

CUDA = torch.cuda.is_available()
DEV_DTYPES = [pytest.param("cpu", torch.float32, id="cpu-f32")]
if CUDA:
    DEV_DTYPES += [pytest.param("cuda", torch.float16, id="cuda-f16"),
                   pytest.param("cuda", torch.bfloat16, id="cuda-bf16")]
if os.environ.get("TIDAL_HF_TEST_CPU_LOWP") == "1":  # the fp16/bf16 checks on CPU (CPU kernels have them)
    DEV_DTYPES += [pytest.param("cpu", torch.float16, id="cpu-f16"), pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]

ATOL32 = 5e-5   # fp32 logits/K/V (observed ~5e-6: different summation orders only)
CACHES = ["dynamic", "static"]
GEN = dict(do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These models are tiny: intra-op threads only add synchronization, and on a loaded 2-core
    machine OpenMP's spin-waiting made a run 10x slower (83 s vs 7 s for the PPSA tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def num_layers(family):
    return FAMILIES[family][2]["num_hidden_layers"]


def default_select(family):
    """A select layer after one full layer and, in models of 5+ layers, a re-selection layer with
    sparse layers before and after it (so some select/sparse layer's input is already sparse)."""
    n = num_layers(family)
    return (1, n - 2) if n >= 5 else (1,)


def tidal_model(family, cfg, sd, device="cpu", dtype=torch.float32, **overrides):
    return tidal_ext.hf.enable(make_model(family, None, sd, device, dtype, **overrides), cfg)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def assert_close_dt(out, exp32, base, dtype, what):
    """fp32: |out - exp| <= ATOL32 (+ rtol 1e-5). fp16/bf16: exp32 is the fp32 result, base the
    same-dtype baseline (sdpa); err(out) <= 2 err(base) + floor."""
    if dtype == torch.float32:
        torch.testing.assert_close(out.float().cpu(), exp32.float().cpu(), atol=ATOL32, rtol=1e-5,
                                   msg=lambda m: f"{what}: {m}")
        return
    e, eb = rel_err(out, exp32), rel_err(base, exp32)
    assert e <= 2 * eb + 2e-3, f"{what}: rel err {e:.3e} > 2 * baseline {eb:.3e} + 2e-3"


def assert_same_greedy(seq, seq_ref, logits_ref, prompt_len, margin, what):
    """Greedy sequences equal; a divergence is tolerated only at a step where the reference's top-2
    logits are within `margin` (a near-tie that rounding may flip), after which the row stops."""
    assert seq.shape == seq_ref.shape, f"{what}: shapes {tuple(seq.shape)} vs {tuple(seq_ref.shape)}"
    seq, seq_ref = seq.cpu(), seq_ref.cpu()
    for b in range(seq.shape[0]):
        diff = (seq[b, prompt_len:] != seq_ref[b, prompt_len:]).nonzero()
        if diff.numel() == 0:
            continue
        s = int(diff[0])
        top2 = logits_ref[s][b].float().topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap <= margin, (f"{what}: row {b} diverges at new token {s} ({seq[b, prompt_len + s].item()} vs "
                               f"{seq_ref[b, prompt_len + s].item()}) with a reference top-2 gap {gap:.3g} > {margin}")


def greedy_margin(dtype):
    return 1e-4 if dtype == torch.float32 else 0.25


# ================================================================================================
# top_k >= context: identical to sdpa
# ================================================================================================
@pytest.mark.parametrize("dev,dtype", DEV_DTYPES)
@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_budget_matches_sdpa(family, cache_kind, dev, dtype):
    """top_k >= context: every decode step's logits and the prefill logits of the real tokens equal
    sdpa's; the compact cache holds sdpa's K/V of each sequence's valid tokens at 0..seq_len-1."""
    sd = random_state_dict(family)
    mode = "group" if family in ("qwen2", "mistral") else "head"
    cfg = tidal_ext.TidalConfig(top_k=64, select_layers=default_select(family), mode=mode, sink=1, recent=2)
    batch = make_batch([19, 11, 5], steps=6, device=dev)
    sdpa = make_model(family, "sdpa", sd, dev, dtype)
    tid = tidal_model(family, cfg, sd, dev, dtype)
    pre_s, steps_s, cache_s = teacher_forced(sdpa, batch, cache_kind)
    pre_t, steps_t, _ = teacher_forced(tid, batch, cache_kind)
    if dtype == torch.float32:
        pre_32, steps_32, cache_32 = pre_s, steps_s, cache_s
    else:
        pre_32, steps_32, cache_32 = teacher_forced(make_model(family, "sdpa", sd, dev, torch.float32), batch,
                                                    cache_kind)
    for b, (pt, p32, ps) in enumerate(zip(*(valid_prefill_logits(x, batch) for x in (pre_t, pre_32, pre_s)))):
        assert_close_dt(pt, p32, ps, dtype, f"prefill logits row {b}")
    for i, (lt, l32, ls) in enumerate(zip(steps_t, steps_32, steps_s)):
        assert_close_dt(lt, l32, ls, dtype, f"decode step {i} logits")
    # the compact layout: sequence b's n valid tokens at rows 0..n-1 of every layer
    state = tid.tidal_state
    for layer in range(num_layers(family)):
        k_t, v_t = state.caches[layer]
        for b, L in enumerate([19, 11, 5]):
            n = L + 6
            k_32, v_32 = native_valid_rows(cache_32, layer, batch, b, n)
            k_s, v_s = native_valid_rows(cache_s, layer, batch, b, n)
            assert_close_dt(k_t[b, :, :n], k_32, k_s, dtype, f"layer {layer} row {b} keys")
            assert_close_dt(v_t[b, :, :n], v_32, v_s, dtype, f"layer {layer} row {b} values")


@pytest.mark.parametrize("dev,dtype", DEV_DTYPES)
@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_full_budget_identical(family, cache_kind, dev, dtype):
    """top_k >= context: greedy generate() of a left-padded batch of 3 equals sdpa's."""
    sd = random_state_dict(family, seed=1)
    cfg = tidal_ext.TidalConfig(top_k=32, select_layers=default_select(family))
    batch = make_batch([12, 7, 3], device=dev)
    kw = dict(GEN, max_new_tokens=10, output_logits=True, return_dict_in_generate=True)
    if cache_kind == "static":
        kw["cache_implementation"] = "static"
    sdpa = make_model(family, "sdpa", sd, dev, dtype)
    tid = tidal_model(family, cfg, sd, dev, dtype)
    with torch.no_grad():
        ref = sdpa.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
        out = tid.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
    if dtype == torch.float32:
        assert torch.equal(out.sequences, ref.sequences)
        for i, (a, b) in enumerate(zip(out.logits, ref.logits)):
            assert max_abs(a, b) <= ATOL32 * 4, f"step {i}: logits differ by {max_abs(a, b):.3e}"
    else:
        assert_same_greedy(out.sequences, ref.sequences, ref.logits, batch.prompt_len, greedy_margin(dtype),
                           "tidal vs sdpa generate")


def test_no_select_layers_is_full_attention():
    """select_layers=() (all layers full): equal to sdpa even with a tiny top_k."""
    sd = random_state_dict("llama")
    cfg = tidal_ext.TidalConfig(top_k=2, select_layers=())
    batch = make_batch([15, 9, 4], steps=4)
    _, steps_s, _ = teacher_forced(make_model("llama", "sdpa", sd), batch)
    _, steps_t, _ = teacher_forced(tidal_model("llama", cfg, sd), batch)
    for i, (a, b) in enumerate(zip(steps_t, steps_s)):
        assert max_abs(a, b) <= ATOL32, f"step {i}"


# ================================================================================================
# small top_k: the PPSA masking reference
# ================================================================================================
PPSA_CASES = [
    # family, mode, sink, recent, cache
    ("llama", "head", 0, 0, "dynamic"),
    ("llama", "group", 2, 2, "static"),
    ("qwen2", "head", 1, 0, "static"),
    ("qwen2", "group", 0, 0, "dynamic"),
    ("qwen3", "head", 0, 3, "dynamic"),
    ("qwen3", "group", 2, 0, "static"),
    ("mistral", "head", 2, 2, "dynamic"),
    ("mistral", "group", 0, 1, "static"),
]


@pytest.mark.parametrize("dev,dtype", DEV_DTYPES)
@pytest.mark.parametrize("family,mode,sink,recent,cache_kind", PPSA_CASES,
                         ids=[f"{c[0]}-{c[1]}-s{c[2]}r{c[3]}-{c[4]}" for c in PPSA_CASES])
def test_ppsa_matches_masking_reference(family, mode, sink, recent, cache_kind, dev, dtype):
    """Small top_k, teacher forcing on the same tokens: decode logits equal the masking reference at
    every step (rows shorter and longer than top_k; padded slots hold random tokens, so attending
    or selecting one would show). Prefill stays full attention (= sdpa)."""
    top_k = 8
    sd = random_state_dict(family, seed=2)
    sel = default_select(family)
    g = torch.Generator().manual_seed(7)
    batch = make_batch([24, 13, 6], steps=7, device=dev, generator=g,
                       pad_fill=torch.randint(3, VOCAB, (3, 31), generator=g))
    sch = PPSASchedule(top_k, sel, mode, sink, recent)
    ref = make_ref_model(family, sch, sd, dev, dtype)
    tid = tidal_model(family, tidal_ext.TidalConfig(top_k=top_k, select_layers=sel, mode=mode, sink=sink,
                                                    recent=recent), sd, dev, dtype)
    sdpa = make_model(family, "sdpa", sd, dev, dtype)
    pre_r, steps_r, _ = teacher_forced(ref, batch, cache_kind)
    pre_t, steps_t, _ = teacher_forced(tid, batch, cache_kind)
    pre_s, steps_s, _ = teacher_forced(sdpa, batch, cache_kind)
    # the reference did run the schedule: every layer once per decode step, with the configured roles
    roles = [sch.role(i) for i in range(num_layers(family))]
    assert ref.ppsa_ref.log == [(i, r) for _ in steps_r for i, r in enumerate(roles)]
    # and sparse attention matters here (otherwise the comparison below would prove little)
    assert max(max_abs(a, b) for a, b in zip(steps_r, steps_s)) > 0.05, "top_k too large to discriminate"
    for b, (pt, ps) in enumerate(zip(valid_prefill_logits(pre_t, batch), valid_prefill_logits(pre_s, batch))):
        assert max_abs(pt, ps) <= (ATOL32 if dtype == torch.float32 else 0.1), f"prefill row {b}"
    if dtype == torch.float32:
        for i, (a, b) in enumerate(zip(steps_t, steps_r)):
            assert max_abs(a, b) <= ATOL32, f"decode step {i}: tidal vs reference differ by {max_abs(a, b):.3e}"
    else:
        # fp16/bf16: rounding may flip a selection at a near-tie of the cutoff, differently in the
        # kernels and in the reference, so compare statistically: tidal's distance to the fp32
        # reference is at most 2x (the lowp reference's + lowp sdpa's own rounding error) + floor
        steps_r32 = teacher_forced(make_ref_model(family, sch, sd, dev, torch.float32), batch, cache_kind)[1]
        steps_s32 = teacher_forced(make_model(family, "sdpa", sd, dev, torch.float32), batch, cache_kind)[1]
        st = lambda xs: torch.stack([x.float() for x in xs])  # noqa: E731
        e_t, e_r = rel_err(st(steps_t), st(steps_r32)), rel_err(st(steps_r), st(steps_r32))
        e_s = rel_err(st(steps_s), st(steps_s32))
        assert e_t <= 2 * (e_r + e_s) + 0.01, \
            f"tidal err {e_t:.4f} vs the fp32 reference > 2 * (reference err {e_r:.4f} + sdpa err {e_s:.4f}) + 0.01"


@pytest.mark.parametrize("family,mode,cache_kind", [("llama", "head", "dynamic"), ("qwen3", "group", "static")])
def test_padding_never_attended(family, mode, cache_kind):
    """Small top_k, left padding: the decode logits do not depend on what the padded slots hold (pad
    token with a huge embedding vs random real tokens), and each row equals the same prompt run alone
    without padding."""
    sd = random_state_dict(family, seed=3)
    sd_poison = dict(sd)
    emb = sd["model.embed_tokens.weight"].clone()
    emb[PAD_ID] = 1e3 * torch.randn(emb.shape[1])
    sd_poison["model.embed_tokens.weight"] = emb
    cfg = tidal_ext.TidalConfig(top_k=6, select_layers=default_select(family), mode=mode, sink=1, recent=1)
    lens, steps = [21, 12, 7], 6
    g = torch.Generator().manual_seed(11)
    b_pad = make_batch(lens, steps=steps, generator=g)  # pad slots: PAD_ID (poisoned embedding)
    b_rand = Batch(torch.where(b_pad.mask == 0, torch.randint(3, VOCAB, b_pad.ids.shape, generator=g), b_pad.ids),
                   b_pad.mask, b_pad.positions, b_pad.prompt_len, b_pad.pads)
    _, steps_pad, _ = teacher_forced(tidal_model(family, cfg, sd_poison), b_pad, cache_kind)
    tid = tidal_model(family, cfg, sd)
    _, steps_rand, _ = teacher_forced(tid, b_rand, cache_kind)
    for i, (a, b) in enumerate(zip(steps_pad, steps_rand)):
        assert max_abs(a, b) <= 1e-5, f"step {i}: padded-slot contents changed the logits by {max_abs(a, b):.3e}"
    for row, L in enumerate(lens):
        pad = b_pad.pads[row]
        ids = b_pad.ids[row:row + 1, pad:]
        alone = Batch(ids, torch.ones_like(ids), positions_of(torch.ones_like(ids)), L, [0])
        _, steps_alone, _ = teacher_forced(tid, alone, cache_kind)
        for i, (a, b) in enumerate(zip(steps_alone, steps_rand)):
            assert max_abs(a[0], b[row]) <= ATOL32, f"row {row} step {i}: alone vs in the padded batch"


@pytest.mark.parametrize("family,mode,sink,recent,cache_kind", [
    ("llama", "head", 0, 0, "dynamic"), ("qwen2", "group", 1, 1, "dynamic"),
    ("qwen3", "head", 2, 0, "static"), ("mistral", "group", 0, 2, "static")])
def test_generate_matches_reference(family, mode, sink, recent, cache_kind):
    """Small top_k: greedy generate() of a left-padded batch of 3 equals the masking reference's
    generate(), and DynamicCache and StaticCache give the same tokens."""
    sd = random_state_dict(family, seed=4)
    sel = default_select(family)
    cfg = tidal_ext.TidalConfig(top_k=6, select_layers=sel, mode=mode, sink=sink, recent=recent)
    batch = make_batch([16, 9, 4])
    kw = dict(GEN, max_new_tokens=12, output_logits=True, return_dict_in_generate=True)
    if cache_kind == "static":
        kw["cache_implementation"] = "static"
    ref = make_ref_model(family, PPSASchedule(6, sel, mode, sink, recent), sd)
    tid = tidal_model(family, cfg, sd)
    sdpa = make_model(family, "sdpa", sd)
    with torch.no_grad():
        out_r = ref.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
        out_t = tid.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
        other = "dynamic" if cache_kind == "static" else "static"
        kw2 = dict(kw, cache_implementation="static") if other == "static" else {k: v for k, v in kw.items()
                                                                                 if k != "cache_implementation"}
        out_t2 = tid.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw2)
        out_s = sdpa.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
    assert_same_greedy(out_t.sequences, out_r.sequences, out_r.logits, batch.prompt_len, 1e-4, "tidal vs reference")
    assert torch.equal(out_t.sequences, out_t2.sequences), f"{cache_kind} vs {other} cache"
    for i, (a, b) in enumerate(zip(out_t.logits, out_t2.logits)):
        assert max_abs(a, b) <= ATOL32, f"step {i}: {cache_kind} vs {other} cache logits"
    assert max(max_abs(a, b) for a, b in zip(out_r.logits[:2], out_s.logits[:2])) > 0.05, \
        "the reference equals sdpa: top_k does not discriminate"


# ================================================================================================
# two models, one process; enable()
# ================================================================================================
def test_two_models_do_not_interfere():
    """Two models (same weights, different configs: one with correction) interleaved step by step and
    generate() call by call give exactly what each gives alone."""
    sd = random_state_dict("llama", seed=5)
    cfg_a = tidal_ext.TidalConfig(top_k=6, select_layers=(1, 3), mode="head")
    cfg_b = tidal_ext.TidalConfig(top_k=9, select_layers=(2,), mode="group", sink=1, recent=2, correction_stride=2)
    batch_a = make_batch([14, 10, 5], steps=6)
    batch_b = make_batch([17, 6, 12], steps=6)
    model_a = tidal_model("llama", cfg_a, sd)
    _, alone_a, _ = teacher_forced(model_a, batch_a, "dynamic")
    model_b = tidal_model("llama", cfg_b, sd)
    _, alone_b, _ = teacher_forced(model_b, batch_b, "static")
    _, a_under_b, _ = teacher_forced(tidal_model("llama", cfg_b, sd), batch_a)
    assert max(max_abs(a, b) for a, b in zip(alone_a, a_under_b)) > 1e-3, "the two configs do not differ"
    # interleaved, step by step
    cache_a, cache_b = new_cache(model_a, "dynamic"), new_cache(model_b, "static", batch_b.ids.shape[1] + 8)
    prefill(model_a, batch_a, cache_a)
    prefill(model_b, batch_b, cache_b)
    for i, t in enumerate(range(batch_a.prompt_len, batch_a.ids.shape[1])):
        la = decode_step(model_a, batch_a, cache_a, t)
        lb = decode_step(model_b, batch_b, cache_b, batch_b.prompt_len + i)
        assert torch.equal(la, alone_a[i]), f"model A step {i}"
        assert torch.equal(lb, alone_b[i]), f"model B step {i}"
    # generate: A, B, A
    kw = dict(GEN, max_new_tokens=8)
    pa = dict(input_ids=batch_a.ids[:, :batch_a.prompt_len], attention_mask=batch_a.mask[:, :batch_a.prompt_len])
    pb = dict(input_ids=batch_b.ids[:, :batch_b.prompt_len], attention_mask=batch_b.mask[:, :batch_b.prompt_len])
    with torch.no_grad():
        ga1 = model_a.generate(**pa, **kw)
        gb1 = model_b.generate(**pb, **kw)
        ga2 = model_a.generate(**pa, **kw)
        gb2 = tidal_model("llama", cfg_b, sd).generate(**pb, **kw)
    assert torch.equal(ga1, ga2)
    assert torch.equal(gb1, gb2)
    assert model_a.tidal_state is not model_b.tidal_state
    assert model_a.config is not model_b.config


@pytest.mark.parametrize("kwargs", [
    dict(select_layers=(2, 5)),     # 5 layers: index 5 is beyond the model
    dict(select_layers=(7,)),
    dict(select_layers=(2, 13)),    # the Llama-3-8B default on a small model
], ids=["select5of5", "select7", "default-2-13"])
def test_enable_rejects_select_layer_beyond_model(kwargs):
    model = make_model("llama", "sdpa")  # 5 layers
    cfg = tidal_ext.TidalConfig(top_k=8, **kwargs)  # valid on its own
    with pytest.raises(RuntimeError, match="select_layers"):
        tidal_ext.hf.enable(model, cfg)
    # a failed enable leaves the model as it was
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "tidal_state")
    assert all(not hasattr(m, "tidal_state") for m in model.modules())


def _assert_untouched(model):
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "tidal_state")
    assert all(not hasattr(m, "tidal_state") for m in model.modules())


@pytest.mark.parametrize("head_dim", [48, 16])
def test_enable_rejects_head_dim_the_kernels_lack(head_dim):
    """Every op would reject it at the first decode token (CPU and CUDA share the head dims)."""
    model = make_model("llama", "sdpa", head_dim=head_dim)
    with pytest.raises(ValueError, match=rf"tidal_ext.hf.enable: head_dim: expected one of .*got {head_dim}"):
        tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=8, select_layers=(1,)))
    _assert_untouched(model)


@pytest.mark.parametrize("top_k,select,max_cache_len,match", [
    (513, (1,), None, r"top_k: expected <= max_position_embeddings = 512.*got 513"),
    (65, (1,), 64, r"top_k: expected <= max_cache_len = 64.*got 65"),
    (8, (1,), 0, r"max_cache_len: expected >= 1"),
])
def test_enable_rejects_budget_beyond_capacity(top_k, select, max_cache_len, match):
    model = make_model("llama", "sdpa")  # max_position_embeddings 512
    with pytest.raises(ValueError, match=match):
        tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=top_k, select_layers=select), max_cache_len=max_cache_len)
    _assert_untouched(model)


@pytest.mark.parametrize("top_k,select,max_cache_len", [
    (512, (1,), None), (64, (1,), 64), (4096, (), 64),  # at the limits; no select layers: top_k unused
])
def test_enable_accepts_budget_within_capacity(top_k, select, max_cache_len):
    model = make_model("llama", "sdpa")
    tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=top_k, select_layers=select), max_cache_len=max_cache_len)
    assert model.tidal_state.config.top_k == top_k


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k"), (dict(mode="bogus"), "mode"), (dict(select_layers=(3, 1)), "select_layers"),
    (dict(select_layers=(2, 2)), "select_layers"), (dict(select_layers=(-1,)), "select_layers"),
    (dict(top_k=8, sink=5, recent=4), "sink"), (dict(correction_stride=-1), "correction_stride"),
    (dict(sink=-1), "sink"), (dict(recent=-1), "recent"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        tidal_ext.TidalConfig(**kwargs)


def test_enable_edge_cases():
    """The last layer as select layer is fine; a tidal model without enable() fails with a message
    naming enable; enabling again replaces config and state (and the correction hook)."""
    sd = random_state_dict("llama")
    batch = make_batch([9, 6, 3], steps=3)
    model = tidal_model("llama", tidal_ext.TidalConfig(top_k=4, select_layers=(4,)), sd)
    assert model.tidal_state.roles == ["full"] * 4 + ["select"]
    _, steps_last, _ = teacher_forced(model, batch)
    _, steps_sdpa, _ = teacher_forced(make_model("llama", "sdpa", sd), batch)
    for a, b in zip(steps_last, steps_sdpa):  # a select layer attends fully; nothing after it is sparse
        assert max_abs(a, b) <= ATOL32

    bare = make_model("llama", "tidal", sd)
    with pytest.raises(RuntimeError, match="enable"):
        teacher_forced(bare, batch)

    m = tidal_model("llama", tidal_ext.TidalConfig(top_k=4, select_layers=(1,), correction_stride=2), sd)
    assert m._tidal_hook is not None
    first = m.tidal_state
    cfg2 = tidal_ext.TidalConfig(top_k=5, select_layers=(2, 3), mode="group")
    tidal_ext.hf.enable(m, cfg2)
    assert m._tidal_hook is None and m.tidal_state is not first and m.tidal_state.config == cfg2
    assert all(x.tidal_state is m.tidal_state for x in m.modules() if hasattr(x, "tidal_state"))
    _, s2, _ = teacher_forced(m, batch)
    _, s2_fresh, _ = teacher_forced(tidal_model("llama", cfg2, sd), batch)
    for a, b in zip(s2, s2_fresh):
        assert torch.equal(a, b)


# ================================================================================================
# KV-cache correction
# ================================================================================================
def _snapshot(state, n_layers):
    return [(state.caches[i][0].clone(), state.caches[i][1].clone()) for i in range(n_layers)]


@pytest.mark.parametrize("dev,dtype", DEV_DTYPES)
@pytest.mark.parametrize("family,cache_kind,stride", [("llama", "dynamic", 3), ("qwen3", "static", 2),
                                                      ("mistral", "dynamic", 4)])
def test_correction_rewrites_exactly_the_last_S_rows(family, cache_kind, stride, dev, dtype):
    """correction_stride S: at decode steps S and 2S the K/V rows of the S tokens fed in the S steps
    before are rewritten with full attention's K/V (equal to sdpa's for the same tokens, every layer);
    the other rows are unchanged; with correction off those rows differ from sdpa's."""
    S = stride
    sd = random_state_dict(family, seed=6)
    sel = default_select(family)
    lens = [20, 11, 6]
    batch = make_batch(lens, steps=2 * S + 1, device=dev)
    cfg_on = tidal_ext.TidalConfig(top_k=5, select_layers=sel, sink=1, correction_stride=S)
    cfg_off = tidal_ext.TidalConfig(top_k=5, select_layers=sel, sink=1)
    nl = num_layers(family)
    _, _, cache_s = teacher_forced(make_model(family, "sdpa", sd, dev, dtype), batch, cache_kind)
    if dtype == torch.float32:
        cache_32 = cache_s
    else:
        _, _, cache_32 = teacher_forced(make_model(family, "sdpa", sd, dev, torch.float32), batch, cache_kind)

    def run(cfg):
        m = tidal_model(family, cfg, sd, dev, dtype)
        cache = new_cache(m, cache_kind, max_len=batch.ids.shape[1] + 4)
        prefill(m, batch, cache)
        snaps = {}
        for j in range(2 * S + 1):
            if j in (S, 2 * S):
                snaps[j] = _snapshot(m.tidal_state, nl)
            decode_step(m, batch, cache, batch.prompt_len + j)
            if j in (S, 2 * S):
                snaps[(j, "after")] = _snapshot(m.tidal_state, nl)
        return snaps

    on, off = run(cfg_on), run(cfg_off)
    worst_off = 0.0
    for c in (S, 2 * S):
        for layer in range(nl):
            for b, L in enumerate(lens):
                lo, hi = L + c - S, L + c  # compact rows of the tokens fed in steps c-S .. c-1
                k0, v0 = on[c][layer][0][b], on[c][layer][1][b]
                k1, v1 = on[(c, "after")][layer][0][b], on[(c, "after")][layer][1][b]
                # rows before the window: bit-for-bit unchanged
                assert torch.equal(k1[:, :lo], k0[:, :lo]) and torch.equal(v1[:, :lo], v0[:, :lo]), \
                    f"step {c} layer {layer} row {b}: rows < {lo} changed"
                k32, v32 = native_valid_rows(cache_32, layer, batch, b, hi)
                ks, vs = native_valid_rows(cache_s, layer, batch, b, hi)
                assert_close_dt(k1[:, lo:hi], k32[:, lo:hi], ks[:, lo:hi], dtype, f"step {c} layer {layer} row {b} K")
                assert_close_dt(v1[:, lo:hi], v32[:, lo:hi], vs[:, lo:hi], dtype, f"step {c} layer {layer} row {b} V")
                # the whole prefix (earlier windows corrected before) is full attention's
                assert_close_dt(k1[:, :hi], k32, ks, dtype, f"step {c} layer {layer} row {b} K prefix")
                k_off = off[(c, "after")][layer][0][b]
                worst_off = max(worst_off, max_abs(k_off[:, lo:hi], k32[:, lo:hi]))
    assert worst_off > 1e-2, f"without correction the rows equal full attention's too ({worst_off:.2e})"


def _ref_with_correction(family, sch, sd, batch, S, cache_kind, sdpa_cache):
    """The masking reference with correction done by hand: before decode steps S, 2S, ... the rows of
    the last S tokens become full attention's (sdpa's) K/V."""
    ref = make_ref_model(family, sch, sd)
    cache = new_cache(ref, cache_kind, max_len=batch.ids.shape[1] + 4)
    prefill(ref, batch, cache)
    out = []
    P = batch.prompt_len
    for j in range(batch.ids.shape[1] - P):
        if j > 0 and j % S == 0:
            for layer in range(len(cache.layers)):
                for dst, src in zip((cache.layers[layer].keys, cache.layers[layer].values),
                                    (sdpa_cache.layers[layer].keys, sdpa_cache.layers[layer].values)):
                    dst[:, :, P + j - S:P + j] = src[:, :, P + j - S:P + j]
        out.append(decode_step(ref, batch, cache, P + j))
    return out


@pytest.mark.parametrize("family,mode,cache_kind", [("llama", "head", "static"), ("qwen2", "group", "dynamic")])
def test_correction_logits_match_reference(family, mode, cache_kind):
    """Logits with correction_stride 3 equal the masking reference whose cache rows are replaced by
    full attention's at each correction; and generate() with correction (both caches) picks the
    reference's greedy tokens."""
    S, top_k = 3, 6
    sd = random_state_dict(family, seed=8)
    sel = default_select(family)
    batch = make_batch([18, 10, 7], steps=10)
    cfg = tidal_ext.TidalConfig(top_k=top_k, select_layers=sel, mode=mode, recent=1, correction_stride=S)
    sch = PPSASchedule(top_k, sel, mode, 0, 1)
    _, _, cache_s = teacher_forced(make_model(family, "sdpa", sd), batch, cache_kind)
    steps_r = _ref_with_correction(family, sch, sd, batch, S, cache_kind, cache_s)
    _, steps_t, _ = teacher_forced(tidal_model(family, cfg, sd), batch, cache_kind)
    _, steps_plain, _ = teacher_forced(make_ref_model(family, sch, sd), batch, cache_kind)
    for i, (a, b) in enumerate(zip(steps_t, steps_r)):
        assert max_abs(a, b) <= ATOL32, f"step {i}: tidal with correction vs reference {max_abs(a, b):.3e}"
    assert max(max_abs(a, b) for a, b in zip(steps_r, steps_plain)) > 1e-3, "correction changed nothing"

    # generate(): its tokens are the reference's greedy choices under teacher forcing
    prompt = Batch(batch.ids[:, :batch.prompt_len], batch.mask[:, :batch.prompt_len],
                   batch.positions[:, :batch.prompt_len], batch.prompt_len, batch.pads)
    tid = tidal_model(family, cfg, sd)
    seqs = []
    for ck in CACHES:
        kw = dict(GEN, max_new_tokens=8) | ({"cache_implementation": "static"} if ck == "static" else {})
        with torch.no_grad():
            seqs.append(tid.generate(input_ids=prompt.ids, attention_mask=prompt.mask, **kw))
    assert torch.equal(seqs[0], seqs[1]), "DynamicCache vs StaticCache with correction"
    seq = seqs[0]
    full_mask = torch.cat([prompt.mask, torch.ones(3, 8, dtype=prompt.mask.dtype)], 1)
    gen_batch = Batch(seq, full_mask, positions_of(full_mask), prompt.prompt_len, prompt.pads)
    _, _, cache_g = teacher_forced(make_model(family, "sdpa", sd), gen_batch, cache_kind)
    steps_g = _ref_with_correction(family, sch, sd, gen_batch, S, cache_kind, cache_g)
    # step i's logits predict token P + i + 1 (token P was predicted by the prefill)
    for i in range(7):
        assert torch.equal(steps_g[i].argmax(-1), seq[:, prompt.prompt_len + i + 1]), f"generated token {i + 1}"


# ================================================================================================
# torch.compile
# ================================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("cache_kind,backend", [("static", "inductor"), ("dynamic", "aot_eager")])
def test_compile_decode_step_fullgraph(cache_kind, backend):
    """torch.compile(model.forward, fullgraph=True) of decode steps (select + sparse layers, left
    padding): no graph break anywhere in the model, logits equal eager. inductor (~30 s on one CPU
    thread) with StaticCache; aot_eager (fake kernels, functionalized in-place cache writes) with
    DynamicCache, whose growing shapes recompile every step."""
    sd = random_state_dict("llama", seed=9)
    cfg = tidal_ext.TidalConfig(top_k=6, select_layers=(1, 3), mode="group", sink=1)
    batch = make_batch([16, 11, 6], steps=2)
    model = tidal_model("llama", cfg, sd)
    _, eager, _ = teacher_forced(model, batch, cache_kind)
    t = batch.prompt_len
    step = dict(input_ids=batch.ids[:, t:t + 1], attention_mask=batch.mask[:, :t + 1],
                position_ids=batch.positions[:, t:t + 1], use_cache=True)
    # explain: graph breaks counted without fullgraph's unbacked-scalar capture (torch >= 2.13 turns
    # capture_scalar_outputs on under fullgraph=True, so a host read like int(t.max()) would not break)
    cache = new_cache(model, cache_kind, max_len=32)
    prefill(model, batch, cache)
    torch._dynamo.reset()
    with torch.no_grad():
        expl = torch._dynamo.explain(model.forward)(past_key_values=cache, **step)
    assert expl.graph_break_count == 0, expl.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend=backend)
    cache = new_cache(model, cache_kind, max_len=32)
    prefill(model, batch, cache)  # eager prefill
    try:
        for i, t in enumerate(range(batch.prompt_len, batch.ids.shape[1])):
            with torch.no_grad():
                out = compiled(input_ids=batch.ids[:, t:t + 1], attention_mask=batch.mask[:, :t + 1],
                               position_ids=batch.positions[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert max_abs(out.logits[:, -1], eager[i]) <= 1e-5, f"step {i}"
    finally:
        torch._dynamo.reset()


class _Layer(torch.nn.Module):
    def __init__(self, idx, state, head_dim):
        super().__init__()
        self.layer_idx, self.scaling, self.tidal_state = idx, head_dim ** -0.5, state


@pytest.mark.slow
@pytest.mark.parametrize("dev,dtype", DEV_DTYPES)
def test_compile_attention_path_inductor(dev, dtype):
    """The decode attention path (tidal_attention_forward through full, select and sparse layers, left
    padding) under torch.compile(backend="inductor", fullgraph=True): no graph breaks
    (torch._dynamo.explain), same outputs and the same selection as eager."""
    from tidal_ext.hf import TidalState, tidal_attention_forward
    B, Hq, Hkv, D, N, nl = 3, 8, 2, 64, 40, 4
    state = TidalState(tidal_ext.TidalConfig(top_k=7, select_layers=(1,), mode="head", sink=1, recent=1), nl)
    layers = [_Layer(i, state, D) for i in range(nl)]
    pads = torch.tensor([0, 5, 11], device=dev)

    # HF's decode mask (uncompacted layout): sequence b's valid slots are its pad_b .. 30 (the token
    # just appended at row 30); the compact layout holds its tokens at 0 .. 30 - pad_b
    slots = torch.arange(N, device=dev)
    mask = ((slots[None, :] >= pads[:, None]) & (slots[None, :] <= 30))[:, None, None, :]

    def step(qs, ks, vs, pos):
        outs = [tidal_attention_forward(m, q, k, v, mask, scaling=m.scaling, position_ids=pos)[0]
                for m, q, k, v in zip(layers, qs, ks, vs)]
        return torch.stack(outs), state.indices

    def fresh():
        state.reset()

    qs = [torch.randn(B, Hq, 1, D, device=dev, dtype=dtype) for _ in range(nl)]
    ks = [torch.randn(B, Hkv, N, D, device=dev, dtype=dtype) for _ in range(nl)]
    vs = [torch.randn(B, Hkv, N, D, device=dev, dtype=dtype) for _ in range(nl)]
    pos = 30 - pads[:, None]  # the cache appended the token at row 30 (behind the padding)
    clone = lambda xs: [x.clone() for x in xs]  # noqa: E731
    fresh()
    expl = torch._dynamo.explain(step)(qs, clone(ks), clone(vs), pos)
    assert expl.graph_break_count == 0, expl.break_reasons
    fresh()
    out_e, idx_e = step(qs, clone(ks), clone(vs), pos)
    torch._dynamo.reset()
    fresh()
    ks_c, vs_c = clone(ks), clone(vs)
    out_c, idx_c = torch.compile(step, fullgraph=True, backend="inductor")(qs, ks_c, vs_c, pos)
    torch._dynamo.reset()
    assert torch.equal(idx_c, idx_e)
    assert max_abs(out_c, out_e) <= (1e-5 if dtype == torch.float32 else 1e-2)
    # the token's K/V was moved to its compact position in the compiled run too
    for b in range(B):
        assert torch.equal(ks_c[0][b, :, pos[b, 0]], ks[0][b, :, 30])


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_static_cache_reduce_overhead_llama3_arch():
    """A Llama-3-8B-architecture model (random weights, 3 layers) generating with StaticCache under
    torch.compile(mode="reduce-overhead") (CUDA graphs): the same tokens as eager."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=3,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=PAD_ID, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(copy.deepcopy(cfg)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed" in name else p.shape[1] ** -0.5
                p.copy_(std * torch.randn(p.shape, device="cuda", generator=g))
    tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=64, select_layers=(1,), mode="head", sink=4, recent=8))
    batch = make_batch([300, 211, 97], device="cuda")
    kw = dict(GEN, max_new_tokens=16, cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    # generate() compiles the decode step itself when the cache is static (prefill stays eager)
    with torch.no_grad():
        eager = model.generate(input_ids=batch.ids, attention_mask=batch.mask, disable_compile=True, **kw)
        torch._dynamo.reset()
        counters.clear()
        try:
            comp = model.generate(input_ids=batch.ids, attention_mask=batch.mask,
                                  compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"), **kw)
        finally:
            torch._dynamo.reset()
    assert_same_greedy(comp.sequences, eager.sequences, eager.logits, batch.prompt_len, 0.25, "compiled vs eager")
    assert counters["stats"]["unique_graphs"] >= 1, "generate() did not compile the decode step"
    assert not counters["inductor"]["cudagraph_skips"], f"CUDA graphs skipped: {dict(counters['inductor'])}"
    assert len(comp.logits) == len(eager.logits) == 16
    # step 0 comes from the (eager) prefill in both; step 1 is the first compiled decode step, on the
    # same input token
    assert torch.equal(comp.sequences[:, batch.prompt_len], eager.sequences[:, batch.prompt_len])
    e1 = rel_err(comp.logits[1], eager.logits[1])
    assert e1 <= 5e-2, f"first compiled decode step: logits rel err {e1:.3e}"


# ================================================================================================
# regressions: a 1-token prompt after a padded generation, padding without position_ids,
# sliding-window models
# ================================================================================================
@pytest.mark.parametrize("cache_kind", CACHES)
def test_one_token_prompt_after_padded_generation(cache_kind):
    sd = random_state_dict("llama")
    sdpa = make_model("llama", "sdpa", sd)
    tid = tidal_model("llama", tidal_ext.TidalConfig(top_k=64, select_layers=(1, 3)), sd)
    batch = make_batch([10, 6, 4])
    kw = dict(GEN, max_new_tokens=4) | ({"cache_implementation": "static"} if cache_kind == "static" else {})
    with torch.no_grad():
        tid.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
        one = torch.randint(3, VOCAB, (3, 1))
        out = tid.generate(input_ids=one, **kw)
        ref = sdpa.generate(input_ids=one, **kw)
    assert torch.equal(out, ref)


def test_padded_forward_without_position_ids_matches_sdpa():
    sd = random_state_dict("llama")
    batch = make_batch([12, 7, 4], steps=3)
    P = batch.prompt_len
    res = []
    for m in (make_model("llama", "sdpa", sd),
              tidal_model("llama", tidal_ext.TidalConfig(top_k=64, select_layers=(1, 3)), sd)):
        cache = new_cache(m, "dynamic")
        with torch.no_grad():
            m(input_ids=batch.ids[:, :P], attention_mask=batch.mask[:, :P], past_key_values=cache, use_cache=True)
            res.append([m(input_ids=batch.ids[:, t:t + 1], attention_mask=batch.mask[:, :t + 1], past_key_values=cache,
                          use_cache=True).logits[:, -1] for t in range(P, P + 3)])
    for i, (a, b) in enumerate(zip(*res)):
        assert max_abs(a, b) <= ATOL32, f"step {i}: {max_abs(a, b):.3g}"


@pytest.mark.parametrize("cache_kind", CACHES)
def test_sliding_window_model_supported_or_rejected(cache_kind):
    sd = random_state_dict("mistral", sliding_window=8)
    sdpa = make_model("mistral", "sdpa", sd, sliding_window=8)
    model = make_model("mistral", None, sd, sliding_window=8)
    cfg = tidal_ext.TidalConfig(top_k=64, select_layers=(1,))
    try:
        tidal_ext.hf.enable(model, cfg)
    except (ValueError, NotImplementedError) as e:  # rejecting it at enable time is fine
        assert "sliding" in str(e)
        return
    ids = torch.randint(3, VOCAB, (1, 20))
    kw = dict(GEN, max_new_tokens=6) | ({"cache_implementation": "static"} if cache_kind == "static" else {})
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **kw), sdpa.generate(input_ids=ids, **kw))
