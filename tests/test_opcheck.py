"""torch.library.opcheck on every tidal op: schema (mutation annotations included), fake kernel
vs real kernel, autograd registration, AOT dispatch with dynamic shapes."""

import pytest
import torch

import tidal_ext  # noqa: F401
from _util import ref, skip_unsupported

OPS = torch.ops.tidal
DT = {"f32": torch.float32, "bf16": torch.bfloat16}


def _r(*shape, dtype, device):
    return torch.randn(*shape).to(dtype).to(device)


def _i32(vals, device):
    return torch.tensor(vals, dtype=torch.int32, device=device)


def decode_samples(dt, dev):
    q, k, v = _r(2, 4, 64, dtype=dt, device=dev), _r(2, 2, 40, 64, dtype=dt, device=dev), _r(2, 2, 40, 64, dtype=dt, device=dev)
    big = _r(1, 3, 50, 128, dtype=dt, device=dev)
    return [
        ((q, k, v), {}),
        ((q, k, v, _i32([40, 7], dev)), {"scale": 0.3}),
        ((_r(1, 3, 128, dtype=dt, device=dev), big[:, :, 5:37], big[:, :, 10:42], _i32([0], dev)), {}),
    ]


def select_samples(dt, dev):
    q, k, v = _r(2, 8, 64, dtype=dt, device=dev), _r(2, 2, 60, 64, dtype=dt, device=dev), _r(2, 2, 60, 64, dtype=dt, device=dev)
    return [
        ((q, k, v, _i32([60, 5], dev), 8, "head", 1, 2), {}),
        ((q, k, v), {"top_k": 16, "mode": "group"}),
        ((q, k.transpose(1, 2).contiguous().transpose(1, 2), v, None, 4, "group", 2, 2, 0.5), {}),
    ]


def sparse_samples(dt, dev):
    q, k, v = _r(2, 8, 64, dtype=dt, device=dev), _r(2, 2, 60, 64, dtype=dt, device=dev), _r(2, 2, 60, 64, dtype=dt, device=dev)
    sl = _i32([60, 33], dev)
    _, ih = ref.select_attention(q, k, v, sl, 12, "head", 1, 1)
    _, ig = ref.select_attention(q, k, v, sl, 12, "group")
    junk = torch.tensor([[[-1, 59, 3, 3, 100]] * 2] * 2, dtype=torch.int32, device=dev)
    return [
        ((q, k, v, ih.to(dev), sl), {}),
        ((q, k, v, ig.to(dev)), {"scale": 0.2}),
        ((q, k, v, junk, sl), {}),
    ]


def correct_samples(dt, dev):
    B, Hq, Hkv, D, N, S = 2, 8, 2, 64, 40, 3
    q = _r(B, Hq, S, D, dtype=dt, device=dev)
    kn, vn = _r(B, Hkv, S, D, dtype=dt, device=dev), _r(B, Hkv, S, D, dtype=dt, device=dev)
    kc, vc = _r(B, Hkv, N, D, dtype=dt, device=dev), _r(B, Hkv, N, D, dtype=dt, device=dev)
    big = _r(B, N + 8, Hkv, D, dtype=dt, device=dev)
    return [
        ((q, kn, vn, kc, vc, _i32([0, 37], dev)), {}),
        ((q, kn, vn, big[:, 4:4 + N].transpose(1, 2), vc.clone(), _i32([10, 20], dev)), {"scale": 0.25}),
        ((_r(B, Hq, 1, D, dtype=dt, device=dev), kn[:, :, :1], vn[:, :, :1], kc.clone(), vc.clone(), _i32([39, 0], dev)), {}),
    ]


SAMPLES = {
    "decode_attention": decode_samples,
    "select_attention": select_samples,
    "sparse_attention": sparse_samples,
    "correct_kv_attention": correct_samples,
}


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("op", list(SAMPLES))
def test_opcheck(op, dtype, device):
    dt = DT[dtype]
    skip_unsupported(device, dt)
    for args, kwargs in SAMPLES[op](dt, device):
        torch.library.opcheck(getattr(OPS, op).default, args, kwargs)


def test_schemas_are_the_public_api():
    expected = {
        "decode_attention": "tidal::decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seq_lens=None, "
                            "float? scale=None) -> Tensor",
        "select_attention": "tidal::select_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seq_lens=None, "
                            "int top_k=2048, str mode=\"head\", int sink=0, int recent=0, float? scale=None) "
                            "-> (Tensor, Tensor)",
        "sparse_attention": "tidal::sparse_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, "
                            "Tensor? seq_lens=None, float? scale=None) -> Tensor",
        "correct_kv_attention": "tidal::correct_kv_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
                                "Tensor(b!) v_cache, Tensor start, float? scale=None) -> Tensor",
    }
    for name, schema in expected.items():
        assert str(getattr(OPS, name).default._schema) == schema
