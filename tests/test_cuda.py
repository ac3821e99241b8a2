"""CUDA-only tests: long contexts and big batches against the reference, CUDA graph capture and
replay, torch.compile over a 4-layer schedule, device-side handling of unchecked length values.
(The CPU sweep in test_ops.py / test_opcheck.py / test_errors.py also runs on CUDA when present.)"""
import pytest
import torch

import tidal_ext
from _util import (assert_accurate, baseline_decode, baseline_sparse, check_selection, indices_mask, poison_beyond,
                   ref)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HQ, HKV, D = 32, 8, 128


def _inputs(B, N, lens, dtype=torch.bfloat16):
    q = torch.randn(B, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(B, HKV, N, D, device="cuda", dtype=dtype)
    v = torch.randn(B, HKV, N, D, device="cuda", dtype=dtype)
    poison_beyond(k, lens)
    poison_beyond(v, lens)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("B,N,lens", [
    (1, 32768, [32768]),
    (1, 131072, [131072]),
    (4, 32768, [32768, 20001, 4097, 1]),
    (16, 4096, [4096 - 37 * i for i in range(16)]),
], ids=["1x32K", "1x128K", "4x32K-unequal", "16x4K"])
@pytest.mark.parametrize("mode", ["head", "group"])
def test_long_context_select_decode_sparse(B, N, lens, mode):
    top_k, sink, recent = 2048, 4, 64
    q, k, v, sl = _inputs(B, N, lens)
    out, idx = tidal_ext.select_attention(q, k, v, sl, top_k, mode, sink, recent)
    # select's output is decode's output, bit for bit (same kernels, same splits)
    assert torch.equal(out, tidal_ext.decode_attention(q, k, v, sl))

    ref_out, ref_idx = ref.select_attention(q, k, v, sl, top_k, mode, sink, recent)
    k0, v0 = k.nan_to_num(), v.nan_to_num()  # SDPA would spread the NaN padding (0 * NaN)
    assert_accurate(out, ref_out, baseline_decode(q, k0, v0, lens), torch.bfloat16, f"select {mode}")
    scores = ref.selection_scores(q, k, sl, mode)
    check_selection(idx, ref_idx, scores, lens, top_k, sink, recent, rel_tol=1e-3, what=f"select {mode}")

    sparse = tidal_ext.sparse_attention(q, k, v, idx, sl)
    ref_sparse = ref.sparse_attention(q, k, v, idx, sl)
    assert_accurate(sparse, ref_sparse, baseline_sparse(q, k0, v0, idx, lens), torch.bfloat16, f"sparse {mode}")


@pytest.mark.parametrize("B,Hq,Hkv,D,N", [
    (2, 32, 4, 128, 20000),  # 8 query rows a CTA: more than the tile kernel's digit counters hold
    (17, 8, 8, 128, 66000),  # one split a row (136 rows fill an H100): 66048 positions a CTA, past 16 bits
], ids=["G8", "long-chunk"])
def test_select_head_without_attention_digit_counts(B, Hq, Hkv, D, N):
    """Head mode where the attention pass cannot count the top-k's first digits: the top-k kernel
    reads every score for them itself. Same selection as the reference either way."""
    top_k, sink, recent = 1000, 2, 9
    lens = [N - 1000 * b for b in range(B)]
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    _, idx = tidal_ext.select_attention(q, k, v, sl, top_k, "head", sink, recent)
    _, ref_idx = ref.select_attention(q, k, v, sl, top_k, "head", sink, recent)
    check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, "head"), lens, top_k, sink, recent, rel_tol=1e-3,
                    what="select head, top-k's own digit counts")


@pytest.mark.parametrize("top_k", [3000, 30000])
@pytest.mark.parametrize("mode", ["head", "group"])
def test_select_ties_across_top_k_chunks(mode, top_k):
    """Integer-valued scores: many exact ties at the cut, spread over the CTAs of a row's top-k
    cluster (4 chunks of 16384 positions); ties must go to the lowest positions, exactly as in the
    reference. top_k 3000 keeps each CTA's possible winners in its shared-memory list; 30000 (the
    cut near the median) overflows the list and takes the re-scanning path."""
    B, N = 2, 3 * 16384 + 100
    q = torch.randint(-1, 2, (B, HQ, D), device="cuda").to(torch.bfloat16)
    k = torch.randint(-1, 2, (B, HKV, N, D), device="cuda").to(torch.bfloat16)
    v = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor([N, N - 4000], dtype=torch.int32, device="cuda")
    _, idx = tidal_ext.select_attention(q, k, v, sl, top_k, mode, 3, 5)
    _, ref_idx = ref.select_attention(q, k, v, sl, top_k, mode, 3, 5)
    if mode == "head":  # group scores subtract a float logsumexp: ties there are only near-ties
        assert torch.equal(idx.cpu(), ref_idx.cpu())
    else:
        check_selection(idx, ref_idx, ref.selection_scores(q, k, sl, mode), sl.tolist(), top_k, 3, 5,
                        rel_tol=1e-5, what="group ties")


@pytest.mark.parametrize("in_bin", [3000, 9000], ids=["copied", "cluster-histograms"])
def test_select_crowded_cut_bin(in_bin):
    """Head mode with the cut inside a crowded first-digit bin full of ties: `in_bin` positions of a
    row score in [0.25, 0.3125) (one bin, 32 distinct values) beside 1000 clear winners, spread over
    the CTAs of the row's cluster. 3000 fit the top-k's copy of the cluster's cut-bin keys
    (kTopkBinCap = 8192), which every CTA ranks on its own; 9000 do not, and the cluster ranks them
    through its shared histograms. Exact indices, ties to the lowest positions, as in the reference."""
    B, N, D, top_k, sink, recent = 2, 65536, 64, 2000, 3, 5  # D = 64: the scale 1/8 keeps scores exact
    q = torch.zeros(B, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(B, 1, N, D)
    k[..., 0] = -1.0
    for b in range(B):
        perm = torch.randperm(N)
        k[b, 0, perm[:1000], 0] = 4.0
        k[b, 0, perm[1000:1000 + in_bin], 0] = 2.0 + torch.randint(0, 32, (in_bin,)) / 64  # bf16-exact
    q, k = q.to("cuda", torch.bfloat16), k.to("cuda", torch.bfloat16)
    v = torch.randn(B, 1, N, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor([N, N - 1000], dtype=torch.int32, device="cuda")
    _, idx = tidal_ext.select_attention(q, k, v, sl, top_k, "head", sink, recent)
    _, ref_idx = ref.select_attention(q, k, v, sl, top_k, "head", sink, recent)
    assert torch.equal(idx.cpu(), ref_idx.cpu())


@pytest.mark.parametrize("B,Hq,Hkv,D,K,mode", [
    (1, 32, 8, 128, 2048, "head"),   # 32 index rows: a few splits each, partials + merge kernel
    (1, 4, 1, 128, 3001, "group"),   # one index row: many splits, partials + merge kernel
    (64, 8, 8, 64, 300, "head"),     # 512 index rows: one CTA a row, output written directly
    (2, 6, 3, 256, 777, "group"),    # 2 query rows per index row
    (3, 9, 3, 32, 1500, "group"),    # 3 query rows (padded to 4)
    (2, 16, 2, 128, 1000, "group"),  # 8 query rows: the tile kernel takes it
    (2, 8, 2, 96, 1000, "head"),     # D = 96: the tile kernel takes it
], ids=["few-splits", "merged", "whole-row", "G2-D256", "G3-D32", "G8-tile", "D96-tile"])
def test_sparse_plans(B, Hq, Hkv, D, K, mode):
    """sparse_attention's gather kernel over each of its plans (whole row per CTA, a few or many
    splits merged by the merge kernel) and the tile kernel where the gather kernel does not
    apply; index rows with -1, out-of-range entries and a length that cuts a row's list, split
    sizes that leave slots of a warp with unequal work; NaN at every unlisted position."""
    N = 4 * K + 33
    lens = [N - 7 * b for b in range(B)]
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    hsel = Hq if mode == "head" else Hkv
    idx = torch.rand(B, hsel, N, device="cuda").argsort(-1)[..., :K].to(torch.int32)  # distinct positions
    idx[:, :, ::7] = -1
    idx[:, :, 3::11] = N + 5
    k0, v0 = k.clone(), v.clone()
    listed = indices_mask(idx, lens, B, Hq, Hkv, N, "cuda").view(B, Hkv, Hq // Hkv, N).any(2)
    k[~listed] = float("nan")
    v[~listed] = float("nan")
    out = tidal_ext.sparse_attention(q, k, v, idx, sl)
    assert_accurate(out, ref.sparse_attention(q, k, v, idx, sl), baseline_sparse(q, k0, v0, idx, lens),
                    torch.bfloat16, f"sparse {mode} D={D}")


def test_correct_kv_long_chunk():
    """S = 512 new tokens written at unequal starts into a 8K cache, causal attention."""
    B, N, S = 2, 8192, 512
    q = torch.randn(B, HQ, S, D, device="cuda", dtype=torch.float16)
    k_new = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    k_cache = torch.randn(B, HKV, N, D, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    start = torch.tensor([7000, 100], dtype=torch.int32, device="cuda")
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = tidal_ext.correct_kv_attention(q, k_new, v_new, k_cache, v_cache, start)
    ref_out = ref.correct_kv_attention(q, k_new, v_new, k_ref, v_ref, start)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    from _util import baseline_correct
    assert_accurate(out, ref_out, baseline_correct(q, k_ref, v_ref, start), torch.float16, "correct S=512")


def test_cuda_graph_replay_with_new_data():
    B, N, top_k = 2, 8192, 512
    q, k, v, sl = _inputs(B, N, [N, N // 3])
    for _ in range(2):  # warm up (allocator, function attributes) outside the capture
        tidal_ext.sparse_attention(q, k, v, tidal_ext.select_attention(q, k, v, sl, top_k)[1], sl)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec = tidal_ext.decode_attention(q, k, v, sl)
        sel, idx = tidal_ext.select_attention(q, k, v, sl, top_k, "group")
        sp = tidal_ext.sparse_attention(q, k, v, idx, sl)
    for lens in ([N // 2, 5], [N, N]):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        e_dec = tidal_ext.decode_attention(q, k, v, sl)
        e_sel, e_idx = tidal_ext.select_attention(q, k, v, sl, top_k, "group")
        e_sp = tidal_ext.sparse_attention(q, k, v, e_idx, sl)
        torch.cuda.synchronize()
        assert torch.equal(dec, e_dec) and torch.equal(sel, e_sel)
        assert torch.equal(idx, e_idx) and torch.equal(sp, e_sp)


def test_compile_reduce_overhead_four_layer_schedule():
    """decode, select, sparse, sparse: one torch.compile(fullgraph=True) graph with CUDA graphs."""
    B, N, top_k = 2, 4096, 256

    def step(qs, ks, vs, lens):
        o0 = torch.ops.tidal.decode_attention(qs[0], ks[0], vs[0], lens)
        o1, idx = torch.ops.tidal.select_attention(qs[1], ks[1], vs[1], lens, top_k, "head", 0, 16)
        o2 = torch.ops.tidal.sparse_attention(qs[2], ks[2], vs[2], idx, lens)
        o3 = torch.ops.tidal.sparse_attention(qs[3], ks[3], vs[3], idx, lens)
        return torch.stack([o0, o1, o2, o3]), idx

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for it in range(4):
        layers = [_inputs(B, N, [N, N - 100 * it]) for _ in range(4)]
        qs, ks, vs = ([x[i] for x in layers] for i in range(3))
        lens = layers[0][3]
        got, got_idx = compiled(qs, ks, vs, lens)
        exp, exp_idx = step(qs, ks, vs, lens)
        assert torch.equal(got_idx, exp_idx)
        assert torch.equal(got, exp)


def test_unchecked_lengths_are_clamped_on_device():
    """CUDA does not read seq_lens on the host (no sync): values beyond [0, N] act as clamped."""
    B, N = 3, 1000
    q, k, v, _ = _inputs(B, N, [N, N, N])
    bad = torch.tensor([N + 50, -7, 10], dtype=torch.int32, device="cuda")
    good = torch.tensor([N, 0, 10], dtype=torch.int32, device="cuda")
    assert torch.equal(tidal_ext.decode_attention(q, k, v, bad), tidal_ext.decode_attention(q, k, v, good))
    out, idx = tidal_ext.select_attention(q, k, v, bad, 64)
    out2, idx2 = tidal_ext.select_attention(q, k, v, good, 64)
    assert torch.equal(out, out2) and torch.equal(idx, idx2)
    assert (out[1] == 0).all() and (idx[1] == -1).all()


def test_two_streams_match_serial():
    """The ops keep no state between calls (scratch comes from the caching allocator on the launch
    stream): two workloads launched concurrently on two streams give the serial results, bit for bit."""
    def workload(B, N, lens, mode):
        q, k, v, sl = _inputs(B, N, lens)
        kc, vc = k.nan_to_num(), v.nan_to_num()
        S = 16
        qc = torch.randn(B, HQ, S, D, device="cuda", dtype=torch.bfloat16)
        kn, vn = torch.randn_like(kc[:, :, :S]), torch.randn_like(vc[:, :, :S])
        start = (sl - S).clamp(min=0)

        def run():
            dec = tidal_ext.decode_attention(q, k, v, sl)
            sel, idx = tidal_ext.select_attention(q, k, v, sl, 1024, mode, 4, 32)
            sp = tidal_ext.sparse_attention(q, k, v, idx, sl)
            kk, vv = kc.clone(), vc.clone()
            cor = tidal_ext.correct_kv_attention(qc, kn, vn, kk, vv, start)
            return [dec, sel, idx, sp, cor, kk, vv]
        return run

    runs = [workload(1, 65536, [65536], "head"), workload(3, 16384, [16384, 9000, 77], "group")]
    serial = [run() for run in runs]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(3):
        results = [None, None]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for rep in range(4):  # interleaved launches, so the kernels of both streams overlap
            for i, (s, run) in enumerate(zip(streams, runs)):
                with torch.cuda.stream(s):
                    results[i] = run()
        torch.cuda.synchronize()
        for got, exp in zip(results, serial):
            for name, g, e in zip(["decode", "select", "indices", "sparse", "correct", "k_cache", "v_cache"], got, exp):
                assert torch.equal(g, e), f"{name} differs between concurrent and serial runs"
