"""tidal_ext.TidalAttention: the C++ attention layer (include/tidal/attention.h) as a torch.nn.Module.

The Python module owns the parameters (q_proj/k_proj/v_proj/o_proj as nn.Linear, no bias), so
state_dict, load_state_dict, .to(), .half() behave as for any module; the C++ layer computes with
the same storage (re-shared after every conversion). The rotary angles are made per call in
float64 from theta (no tables, nothing a dtype conversion could round).
The KV cache lives in the C++ layer (allocate_cache / set_cache; k_cache / v_cache read it)."""
from typing import Optional

import torch

from . import _C


class TidalAttention(torch.nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int = 0,
                 rope_theta: float = 0.0, max_positions: int = 0, scale: Optional[float] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self._layer = _C.TidalAttentionLayer(layer_idx, num_heads, num_kv_heads, head_dim, hidden_size, rope_theta,
                                             max_positions, scale)
        cpp = dict(self._layer.named_parameters())
        if hidden_size > 0:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = cpp[f"{name}.weight"]
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                with torch.no_grad():
                    linear.weight.copy_(w)  # the C++ layer's initialization
                setattr(self, name, linear)
        self._share()

    def _share(self):
        """Makes the C++ layer compute with this module's current tensors."""
        if hasattr(self, "q_proj"):
            self._layer.set_projection_weights(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                               self.o_proj.weight)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._share()  # a conversion may have replaced the tensors: share the new ones
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._share()

    def allocate_cache(self, batch: int, capacity: int, dtype: torch.dtype, device) -> None:
        self._layer.allocate_cache(batch, capacity, dtype, device)

    def set_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self._layer.set_cache(k_cache, v_cache)

    @property
    def k_cache(self) -> torch.Tensor:
        return self._layer.k_cache()

    @property
    def v_cache(self) -> torch.Tensor:
        return self._layer.v_cache()

    def prefill(self, x, ctx):
        """x [B, T, hidden] -> [B, T, hidden]: writes tokens 0..T-1, full causal attention."""
        return self._layer.prefill(x, ctx)

    def decode_step(self, x, ctx):
        """x [B, hidden] -> [B, hidden]: appends at ctx.positions(), attends as ctx.role(layer)."""
        return self._layer.decode_step(x, ctx)

    def correct(self, x, ctx):
        """x [B, S, hidden] of the last S tokens -> [B, S, hidden], rewriting their K/V."""
        return self._layer.correct(x, ctx)

    def prefill_qkv(self, q, k, v, ctx):
        return self._layer.prefill_qkv(q, k, v, ctx)

    def decode_qkv(self, q, k, v, ctx):
        return self._layer.decode_qkv(q, k, v, ctx)

    def correct_qkv(self, q, k, v, ctx):
        return self._layer.correct_qkv(q, k, v, ctx)

    def rotate(self, x, positions):
        return self._layer.rotate(x, positions)

    def forward(self, x, ctx):
        """A decode step for x [B, hidden], a prefill for x [B, T, hidden]."""
        return self.decode_step(x, ctx) if x.dim() == 2 else self.prefill(x, ctx)
