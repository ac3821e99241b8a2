"""NaN / Inf inputs (issue 7): the ops propagate them as plain PyTorch attention does (a NaN or
+Inf score poisons that head's softmax), never hang or crash, and leave other heads untouched.
The pattern of non-finite outputs must equal the float64 reference's; finite outputs must agree.
Runs on CPU and, where present, CUDA (fp16/bf16 there: the CUDA kernels take no fp32)."""
import pytest
import torch

import tidal_ext  # noqa: F401
from _util import ref

B, HQ, HKV, D, N = 2, 4, 2, 64, 48
OPS = torch.ops.tidal


def inputs(dtype, device):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take fp16/bf16")
    torch.manual_seed(0)
    q = torch.randn(B, HQ, D).to(dtype).to(device)
    k = torch.randn(B, HKV, N, D).to(dtype).to(device)
    v = torch.randn(B, HKV, N, D).to(dtype).to(device)
    lens = torch.tensor([N, N - 9], dtype=torch.int32, device=device)
    return q, k, v, lens


def same_nonfinite(out, expected, what):
    out, expected = out.double(), expected.double()
    assert torch.equal(torch.isnan(out), torch.isnan(expected)), f"{what}: NaN pattern differs"
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: finite pattern differs"
    assert torch.allclose(out[fin], expected[fin], atol=2e-2, rtol=2e-2), f"{what}: finite values differ"


POISONS = {
    "nan_in_q": lambda q, k, v: q[0, 1].fill_(float("nan")),
    "inf_in_q": lambda q, k, v: q[1, 2, 5].fill_(float("inf")),
    "nan_in_k_row": lambda q, k, v: k[0, 1, 7].fill_(float("nan")),
    "inf_in_v_row": lambda q, k, v: v[1, 0, 3].fill_(float("inf")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("poison", list(POISONS))
def test_decode_select_sparse_propagate_like_pytorch(poison, dtype, device):
    q, k, v, lens = inputs(dtype, device)
    POISONS[poison](q, k, v)
    same_nonfinite(OPS.decode_attention(q, k, v, lens), ref.decode_attention(q, k, v, lens), f"decode {poison}")
    for mode in ("head", "group"):
        out, idx = OPS.select_attention(q, k, v, lens, 16, mode, 1, 2)
        same_nonfinite(out, ref.decode_attention(q, k, v, lens), f"select {mode} {poison}")
        # the rows stay well formed whatever the scores: sorted valid positions, then -1
        for row in idx.reshape(-1, 16).tolist():
            valid = [p for p in row if p >= 0]
            assert valid == sorted(set(valid)) and row[len(valid):] == [-1] * (16 - len(valid))
        same_nonfinite(OPS.sparse_attention(q, k, v, idx, lens), ref.sparse_attention(q, k, v, idx, lens),
                       f"sparse {mode} {poison}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_correct_kv_attention_propagates_like_pytorch(dtype, device):
    q, k, v, _ = inputs(dtype, device)
    S = 3
    q4 = torch.randn(B, HQ, S, D).to(dtype).to(device)
    kn, vn = torch.randn(B, HKV, S, D).to(dtype).to(device), torch.randn(B, HKV, S, D).to(dtype).to(device)
    kn[1, 0, 1] = float("nan")
    start = torch.tensor([10, 20], dtype=torch.int32, device=device)
    k2, v2 = k.clone(), v.clone()
    out = OPS.correct_kv_attention(q4, kn, vn, k, v, start)
    expected = ref.correct_kv_attention(q4, kn, vn, k2, v2, start)
    same_nonfinite(out, expected, "correct_kv")
