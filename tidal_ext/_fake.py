"""Fake (shape-only) kernels of every tidal op, so torch.compile can trace them without running
them. They check only what decides the output shapes; the real kernels validate everything."""
import torch


def _check_devices(op, q, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise RuntimeError(f"tidal.{op}: {name}: expected device {q.device} (same as q), got {t.device}")


@torch.library.register_fake("tidal::decode_attention")
def _decode_attention(q, k_cache, v_cache, seq_lens=None, scale=None):
    _check_devices("decode_attention", q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("tidal::select_attention")
def _select_attention(q, k_cache, v_cache, seq_lens=None, top_k=2048, mode="head", sink=0, recent=0, scale=None):
    _check_devices("select_attention", q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens)
    if mode not in ("head", "group"):
        raise RuntimeError(f'tidal.select_attention: mode: expected "head" or "group", got "{mode}"')
    hsel = q.shape[1] if mode == "head" else k_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[0], hsel, top_k), dtype=torch.int32)


@torch.library.register_fake("tidal::sparse_attention")
def _sparse_attention(q, k_cache, v_cache, indices, seq_lens=None, scale=None):
    _check_devices("sparse_attention", q, k_cache=k_cache, v_cache=v_cache, indices=indices, seq_lens=seq_lens)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("tidal::correct_kv_attention")
def _correct_kv_attention(q, k, v, k_cache, v_cache, start, scale=None):
    _check_devices("correct_kv_attention", q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, start=start)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
