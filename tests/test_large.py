"""Inputs past 2^31 elements: every offset a kernel forms (caches, q/out, indices, the split-KV
partials) must be 64-bit. Each test uses real tensors whose data lies beyond element 2^31 of its
storage; a zero-stride view or an as_strided view over a small storage would not exercise the
arithmetic (tests/test_errors.py uses such views only for the shape checks).

* Batch offsets: caches [3, 1, 2^23, 128] bf16 (3 * 2^30 elements, 6 GiB each); sequence b starts at
  element b * 2^30, so row 2's K/V lie past 2^31 (int32 offsets would wrap negative). Only the rows
  the ops read (seq_lens [5, 9, 17], correction chunks right after them) are filled; every op is
  compared with tidal_ext.reference on the first 32 rows.
* Position offsets: caches in [B, N, Hkv, D] layout ([1, 2^22, 8, 128] transposed, 8 GiB each), so
  position p of a head starts at element p * 1024: positions >= 2^21 lie past 2^31. sparse_attention
  over listed positions on both sides of 2^21 (the gather and the dense path share the row
  address arithmetic), against the reference on the same views.
* Indices past 2^31 (select + sparse, top_k 2^20 with 2050 selection rows: 8.6 GB of int32) and
  q/out/partials past 2^31 (decode at B = 40000, Hq = 512, D = 128: 2.6e9 elements each).

Memory: on CPU the two cache tests touch only the rows they fill (the allocations are lazily
committed pages), so they run on any machine that lets a process map 12-16 GiB (they skip if the
allocation fails). The indices and q tests write every element: they need 9-11 GB resident and run
only where free RAM (CPU) is at least 3x that, or free GPU memory (torch.cuda.mem_get_info) covers
it; on the 2-core CI machine they skip on CPU and are meant for the GPU machine.
"""

import os

import pytest
import torch

import tidal_ext  # noqa: F401
from _util import check_selection, ref, rel_err

OPS = torch.ops.tidal
GiB = 1 << 30
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BF16 = torch.bfloat16
TOL = 2e-2  # bf16 inputs and outputs vs the float64 reference; a wrong offset gives O(1) errors


def free_bytes(device):
    if device == "cuda":
        torch.cuda.empty_cache()  # blocks cached by earlier tests count as free here
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_resident(device, nbytes):
    """Skip unless the test's resident footprint fits: 3x on CPU, 1.1x + 1 GiB on CUDA."""
    need = 3 * nbytes if device == "cpu" else int(1.1 * nbytes) + GiB
    if free_bytes(device) < need:
        pytest.skip(f"needs {need / GiB:.1f} GiB free on {device}, {free_bytes(device) / GiB:.1f} GiB available")


def big_empty(shape, device, dtype=BF16):
    """torch.empty of a huge shape; skip if the allocator refuses (CPU pages are committed lazily)."""
    n = 1
    for s in shape:
        n *= s
    if device == "cuda":
        require_resident(device, n * torch.finfo(dtype).bits // 8)
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot map a {tuple(shape)} tensor on {device}: {str(e).splitlines()[0]}")


def rnd(*shape, device):
    return torch.randn(*shape).to(BF16).to(device)


# ------------------------------------------------------------------------------------------------
# batch offsets: caches [3, 1, 2^23, 128], row b at element b * 2^30
# ------------------------------------------------------------------------------------------------
NB, HKV1, NBIG, DBIG, HQ1 = 3, 1, 1 << 23, 128, 4
LENS = [5, 9, 17]
M = 32  # rows filled (and compared) per sequence: seq_lens and the correction chunks stay below


@pytest.fixture(scope="module", params=DEVICES)
def big_caches(request):
    device = request.param
    k = big_empty((NB, HKV1, NBIG, DBIG), device)
    v = big_empty((NB, HKV1, NBIG, DBIG), device)
    assert k.numel() == 3 * (1 << 30) and k.stride(0) * (NB - 1) >= 1 << 31
    k[:, :, :M] = rnd(NB, HKV1, M, DBIG, device=device)
    v[:, :, :M] = rnd(NB, HKV1, M, DBIG, device=device)
    yield device, k, v
    del k, v
    if device == "cuda":
        torch.cuda.empty_cache()


def _small(t):
    return t[:, :, :M].clone()


@pytest.mark.parametrize("op", ["decode", "select_head", "select_group", "sparse"])
def test_batch_offsets_past_2_31(big_caches, op):
    device, k, v = big_caches
    q = rnd(NB, HQ1, DBIG, device=device)
    sl = torch.tensor(LENS, dtype=torch.int32, device=device)
    ks, vs = _small(k), _small(v)
    if op == "decode":
        out, want = OPS.decode_attention(q, k, v, sl), ref.decode_attention(q, ks, vs, sl)
    elif op.startswith("select"):
        mode = op.split("_")[1]
        top_k, sink, recent = 8, 1, 2
        out, idx = OPS.select_attention(q, k, v, sl, top_k, mode, sink, recent)
        want, idx_ref = ref.select_attention(q, ks, vs, sl, top_k, mode, sink, recent)
        scores = ref.selection_scores(q, ks, sl, mode)
        check_selection(idx, idx_ref, scores, LENS, top_k, sink, recent, 1e-3, f"select {mode}")
    else:
        idx = torch.randint(-1, M, (NB, HQ1, 12), dtype=torch.int32, device=device)
        out, want = OPS.sparse_attention(q, k, v, idx, sl), ref.sparse_attention(q, ks, vs, idx, sl)
    assert rel_err(out, want) <= TOL, f"{op}: rel err {rel_err(out, want):.3g}"


def test_batch_offsets_past_2_31_correct_kv(big_caches):
    device, k, v = big_caches
    S = 4
    q = rnd(NB, HQ1, S, DBIG, device=device)
    kn, vn = rnd(NB, HKV1, S, DBIG, device=device), rnd(NB, HKV1, S, DBIG, device=device)
    start = torch.tensor(LENS, dtype=torch.int32, device=device)  # rows L .. L+3, right after the valid ones
    ks, vs = _small(k), _small(v)
    out = OPS.correct_kv_attention(q, kn, vn, k, v, start)
    want = ref.correct_kv_attention(q, kn, vn, ks, vs, start)  # updates ks, vs the same way
    assert rel_err(out, want) <= TOL, f"correct_kv: rel err {rel_err(out, want):.3g}"
    assert torch.equal(k[:, :, :M], ks) and torch.equal(v[:, :, :M], vs), "cache rows written at the wrong place"


# ------------------------------------------------------------------------------------------------
# position offsets: [1, 2^22, 8, 128] (BNHD) transposed, position p at element p * 1024
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_position_offsets_past_2_31(device):
    N, H, D, Hq, K = 1 << 22, 8, 128, 32, 24
    kb, vb = big_empty((1, N, H, D), device), big_empty((1, N, H, D), device)
    k, v = kb.transpose(1, 2), vb.transpose(1, 2)  # [1, 8, 2^22, 128], stride_n = 1024
    assert k.stride(2) * (N - 1) >= 1 << 31
    # per KV head: positions below and far above 2^21 (the last one included), -1 slots too
    g = torch.Generator().manual_seed(0)
    low = torch.randint(0, 1 << 20, (1, H, K // 2), generator=g)
    high = torch.randint((1 << 21) + 1, N - 1, (1, H, K // 2 - 2), generator=g)
    idx = torch.cat([low, high, torch.full((1, H, 1), N - 1), torch.full((1, H, 1), -1)], -1).to(torch.int32)
    rows = idx[idx >= 0].unique().to(device)
    kb[0, rows] = rnd(rows.numel(), H, D, device=device)  # only the listed rows are ever touched
    vb[0, rows] = rnd(rows.numel(), H, D, device=device)
    q = rnd(1, Hq, D, device=device)
    idx = idx.to(device)
    out = OPS.sparse_attention(q, k, v, idx)  # group rows (Hsel = Hkv), seq_lens None = N
    want = ref.sparse_attention(q, k, v, idx)  # gathers the listed rows only
    assert rel_err(out, want) <= TOL, f"rel err {rel_err(out, want):.3g}"


# ------------------------------------------------------------------------------------------------
# indices, q, out and the split-KV partials past 2^31
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_indices_past_2_31(device):
    """select_attention writes indices [2, 1025, 2^20] (2.15e9 int32) and sparse_attention reads
    them back: rows are all trivial (seq_len <= top_k), so each is 0..L-1 then -1."""
    B, Hq, D, N, top_k = 2, 1025, 32, 64, 1 << 20
    require_resident(device, B * Hq * top_k * 4 + GiB)
    lens = [40, 64]
    q = rnd(B, Hq, D, device=device)
    k, v = rnd(B, 1, N, D, device=device), rnd(B, 1, N, D, device=device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    out, idx = OPS.select_attention(q, k, v, sl, top_k)
    assert idx.shape == (B, Hq, top_k) and idx.numel() > 1 << 31
    for b, L in enumerate(lens):
        head = idx[b, :, :L]
        assert torch.equal(head, torch.arange(L, dtype=torch.int32, device=device).expand_as(head)), f"row {b}"
        tail = idx[b, :, L:]
        assert tail.amin().item() == -1 and tail.amax().item() == -1, f"row {b}: padding is not all -1"
    want = ref.decode_attention(q, k, v, sl)
    assert rel_err(out, want) <= TOL
    sparse = OPS.sparse_attention(q, k, v, idx, sl)
    assert rel_err(sparse, want) <= TOL, f"sparse over the full selection: rel err {rel_err(sparse, want):.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_q_out_and_partials_past_2_31(device):
    """decode_attention with q and out of 2.6e9 elements (on CUDA the split-KV partials too: one
    split per row at this batch); rows at both ends are checked against the reference."""
    B, Hq, Hkv, D, N = 40000, 512, 8, 128, 8
    numel = B * Hq * D
    assert numel > 1 << 31
    require_resident(device, 2 * numel * 2 + (numel * 4 if device == "cuda" else 0) + 2 * B * Hkv * N * D * 2)
    q = torch.empty(B, Hq, D, dtype=BF16, device=device).normal_()
    k = torch.empty(B, Hkv, N, D, dtype=BF16, device=device).normal_()
    v = torch.empty(B, Hkv, N, D, dtype=BF16, device=device).normal_()
    sl = torch.randint(1, N + 1, (B,), dtype=torch.int32, device=device)
    out = OPS.decode_attention(q, k, v, sl)
    assert out.shape == (B, Hq, D)
    for b in (0, 1, B // 2, B - 2, B - 1):
        s = slice(b, b + 1)
        want = ref.decode_attention(q[s], k[s], v[s], sl[s])
        assert rel_err(out[s], want) <= TOL, f"batch row {b}: rel err {rel_err(out[s], want):.3g}"
