"""Python wrappers of the tidal ops. Shapes: B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0),
D head dim (32, 64, 96, 128, 256), N cache capacity. Caches are [B, Hkv, N, D] with a contiguous
last dim (other strides free); ``seq_lens`` is int32 [B] (None = N); ``scale`` None = 1/sqrt(D).
Outputs are in q's dtype. A sequence with seq_len 0 gives zeros (and indices -1)."""
from typing import Optional, Tuple

import torch
from torch import Tensor


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Tensor:
    """Full attention of one query per sequence, q [B, Hq, D] -> [B, Hq, D]."""
    return torch.ops.tidal.decode_attention(q, k_cache, v_cache, seq_lens, scale)


def select_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Optional[Tensor] = None,
                     top_k: int = 2048, mode: str = "head", sink: int = 0, recent: int = 0,
                     scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """decode_attention's output plus indices int32 [B, Hsel, top_k] of the positions to keep.

    mode "head": Hsel = Hq, each query head ranks token t by scale * q_h . k_t.
    mode "group": Hsel = Hkv, a KV head ranks t by the largest log-probability any of its query heads
    gives t. The newest token, the first ``sink`` and the last ``recent`` tokens are always kept and
    count inside ``top_k``; the rest go to the highest-ranked tokens (ties: lower position first).
    seq_len <= top_k keeps every valid token. Rows are sorted ascending, unused slots are -1.
    """
    return torch.ops.tidal.select_attention(q, k_cache, v_cache, seq_lens, top_k, mode, sink, recent, scale)


def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor,
                     seq_lens: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Attention over only the positions in ``indices`` (int32 [B, Hsel, K], Hsel = Hq or Hkv).

    Row h serves query head h (Hsel == Hq) or every query head of KV group h (Hsel == Hkv). Entries
    that are negative or >= seq_len are skipped and never read; a row with none valid gives zeros.
    """
    return torch.ops.tidal.sparse_attention(q, k_cache, v_cache, indices, seq_lens, scale)


def correct_kv_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor,
                         scale: Optional[float] = None) -> Tensor:
    """Writes k, v ([B, Hkv, S, D]) into the caches at start[b] .. start[b]+S-1 (in place), then query
    i of q [B, Hq, S, D] attends causally to positions 0 .. start[b]+i. Returns [B, Hq, S, D]."""
    return torch.ops.tidal.correct_kv_attention(q, k, v, k_cache, v_cache, start, scale)
