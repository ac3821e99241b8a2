"""HuggingFace transformers drop-in: ``attn_implementation="tidal"``.

    import tidal_ext, tidal_ext.hf
    model = tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=2048, select_layers=(2, 13)))
    out = model.generate(**inputs)

Importing this module registers "tidal" in transformers' AttentionInterface (with sdpa's mask
function, so causal and padding masks are built as for "sdpa"). No model class is imported or
patched: the attention function gets the module (``module.layer_idx``) and the K/V cache tensors
the model's Cache (DynamicCache or StaticCache) returned, and calls the tidal ops on them.

* Prefill (more than one new token): full attention (transformers' sdpa function), then each
  sequence's prompt K/V is moved to the front of its cache rows, so that with left padding a
  sequence's valid tokens are always positions ``0 .. seq_len-1`` of the cache (the layout the ops
  use). Padded positions end up past seq_len: never attended, never selected. The padding is read
  from the attention mask (the prompt's last row), on the device.
* Decode (one new token): with a mask, seq_len is the count of valid positions in the new token's
  mask row and the cache slot the token was appended to is the row's last valid position; its K/V
  is copied to position seq_len - 1. Without a mask (no padding) seq_len = position_ids + 1. All
  device ops, no host sync, nothing carried over from earlier calls. Then the layer acts as its
  role says: full (decode_attention), select (select_attention, the indices kept for the next
  layers) or sparse (sparse_attention).
* KV-cache correction (``correction_stride`` S > 0): before every S-th decode step after the first,
  the last S tokens are re-run through the model with full attention, layer by layer
  (correct_kv_attention rewrites their K/V in the cache). A forward pre-hook on the model does it.

Misconfiguration fails in ``enable`` (a ValueError or RuntimeError naming the field), never at the
first token: a select layer beyond the model's layers; a head_dim the tidal kernels don't have
(``tidal_ext._C.HEAD_DIMS``, the same set on CPU and CUDA, so it is checked on every device);
with select layers, a top_k above ``max_position_embeddings`` or above the ``max_cache_len`` passed
to ``enable`` (a budget no context can exceed never selects anything: every layer would be full
attention plus the selection's cost). A StaticCache created by ``generate()`` is not checked
against top_k at its first prefill: a generation shorter than top_k is full attention by design
(every valid token kept, the tests' "full budget equals sdpa" cases), so only a capacity declared
up front can make the budget useless.

State lives in a ``TidalState`` shared by the attention modules of one model (set by ``enable``):
nothing global, two models in one process don't interfere. A generation must start with a prefill
on an empty cache (continuing on a filled cache is not supported).
Not supported: sliding-window attention (rejected by ``enable``); correction with beam search (the
beams reorder the cache between the steps the hook records).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from . import _C
from .config import TidalConfig

IMPLEMENTATION = "tidal"


class TidalState:
    """Per-model TidalDecode state: the schedule (roles precomputed per layer, so the attention
    function has no host-side config calls), the selection of the current step, each layer's cache
    tensors (for the correction re-run) and the decode-step history of the correction."""

    def __init__(self, config: TidalConfig, num_layers: int):
        config.validate_for_model(num_layers)
        self.config = config
        self.num_layers = num_layers
        self.roles: List[str] = [config.role(i) for i in range(num_layers)]
        self.reset()

    def reset(self):
        self.indices: Optional[torch.Tensor] = None
        self.caches: dict = {}                     # layer_idx -> (k_cache, v_cache)
        self.step = 0                              # decode steps begun
        self.history: list = []                    # (input_ids, position_ids) of recent steps
        self.correcting = False


def _positions(position_ids: Optional[torch.Tensor], batch: int, q_len: int, device) -> torch.Tensor:
    if position_ids is None:
        raise RuntimeError("tidal_ext.hf: the tidal attention needs position_ids (generate() passes them)")
    pos = position_ids.reshape(-1, position_ids.shape[-1])[:, -q_len:]
    return pos.expand(batch, q_len).to(device=device, dtype=torch.long)


def _valid(mask_row: torch.Tensor) -> torch.Tensor:
    """Valid positions of a mask row: True entries of a bool mask, zeros of an additive one."""
    return mask_row if mask_row.dtype == torch.bool else mask_row == 0


def _compact_prompt(key: torch.Tensor, value: torch.Tensor, pad: torch.Tensor, q_len: int) -> None:
    """Moves each sequence's prompt rows [pad_b, q_len) to [0, q_len - pad_b), in place."""
    src = (torch.arange(q_len, device=key.device)[None, :] + pad[:, None]).clamp_(max=q_len - 1)  # [B, T]
    for cache in (key, value):
        idx = src[:, None, :, None].expand(cache.shape[0], cache.shape[1], q_len, cache.shape[3])
        cache[:, :, :q_len].copy_(torch.gather(cache[:, :, :q_len], 2, idx))


def compact_prefill(key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    q_len: int) -> None:
    """After a prefill: with left padding (the prompt's last mask row marks the real tokens), each
    sequence's prompt rows move to the front of its cache rows."""
    if attention_mask is not None:
        pad = q_len - _valid(attention_mask[:, 0, -1, :q_len]).sum(-1)
        _compact_prompt(key, value, pad, q_len)


def decode_lengths(key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   pos: torch.Tensor) -> torch.Tensor:
    """At a decode step: each sequence's valid length (int32 [B]), with the new token's K/V moved
    from the cache slot it was written to onto position seq_len - 1 (the compact layout)."""
    if attention_mask is None:  # no padding: the cache slot is the position
        return (pos[:, 0] + 1).to(torch.int32)
    valid = _valid(attention_mask[:, 0, -1, :]).to(torch.long)  # [B, kv]: this token's valid positions
    seq_lens = valid.sum(-1).to(torch.int32)
    slots = torch.arange(1, valid.shape[-1] + 1, device=valid.device)
    last = (valid * slots).amax(-1) - 1  # the slot the cache wrote: the row's last valid position
    rows = torch.arange(key.shape[0], device=key.device)
    dst = seq_lens.to(torch.long) - 1
    key[rows, :, dst] = key[rows, :, last]
    value[rows, :, dst] = value[rows, :, last]
    return seq_lens


def tidal_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs):
    """The AttentionInterface function: query [B, Hq, T, D] (rotated), key/value the layer's cache
    tensors [B, Hkv, L, D] after the cache update (or, while correcting, the chunk's own K/V)."""
    state: Optional[TidalState] = getattr(module, "tidal_state", None)
    if state is None:
        raise RuntimeError(
            f"tidal_ext.hf: attention layer {getattr(module, 'layer_idx', '?')} has no TidalDecode state; call "
            "tidal_ext.hf.enable(model, tidal_ext.TidalConfig(...)) first")
    layer = module.layer_idx
    batch, _, q_len, _ = query.shape
    pos = _positions(kwargs.get("position_ids"), batch, q_len, query.device)

    if state.correcting:  # re-run of the last S tokens: rewrite their K/V with full attention
        k_cache, v_cache = state.caches[layer]
        out = torch.ops.tidal.correct_kv_attention(query, key.to(k_cache.dtype), value.to(v_cache.dtype), k_cache,
                                                   v_cache, pos[:, 0].to(torch.int32), scaling)
        return out.transpose(1, 2), None

    if q_len > 1:  # prefill: full causal attention exactly as sdpa, then the compact layout
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        if layer == 0:
            state.reset()
        compact_prefill(key, value, attention_mask, q_len)
        state.caches[layer] = (key, value)
        return out, None

    seq_lens = decode_lengths(key, value, attention_mask, pos)  # decode: one token per sequence
    state.caches[layer] = (key, value)
    q = query[:, :, 0]
    role = state.roles[layer]
    if role == "full":
        out = torch.ops.tidal.decode_attention(q, key, value, seq_lens, scaling)
    elif role == "select":
        cfg = state.config
        out, state.indices = torch.ops.tidal.select_attention(q, key, value, seq_lens, cfg.top_k, cfg.mode, cfg.sink,
                                                              cfg.recent, scaling)
    else:
        out = torch.ops.tidal.sparse_attention(q, key, value, state.indices, seq_lens, scaling)
    return out[:, None], None


def _attention_modules(model: torch.nn.Module):
    """The modules that call the attention interface: they carry layer_idx and scaling."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]


def _correction_hook(state: TidalState):
    """Forward pre-hook of the model: records decode-step inputs and, every correction_stride steps,
    re-runs the last ones through the base model with full attention (correct_kv_attention). It
    reads the cache's length on the host to tell a new generation (correction runs eagerly)."""
    stride = state.config.correction_stride

    def hook(model, args, kwargs):
        if state.correcting:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        if ids is None or ids.shape[1] > 1 or past is None or int(past.get_seq_length()) == 0:
            state.reset()  # a prefill (a 1-token prompt too): a new generation, nothing to correct yet
            return None
        if state.step > 0 and state.step % stride == 0 and len(state.history) == stride:
            chunk_ids = torch.cat([h[0] for h in state.history], dim=1)
            chunk_pos = torch.cat([h[1] for h in state.history], dim=1)
            state.correcting = True
            try:
                with torch.no_grad():
                    model.base_model(input_ids=chunk_ids, position_ids=chunk_pos, use_cache=False)
            finally:
                state.correcting = False
        state.step += 1
        positions = kwargs.get("position_ids")
        if positions is None:
            raise RuntimeError("tidal_ext.hf: KV-cache correction needs position_ids in the model call")
        state.history = (state.history + [(ids, positions.expand(ids.shape[0], -1))])[-stride:]
        return None

    return hook


def _check_model(model: torch.nn.Module, config: TidalConfig, max_cache_len: Optional[int]) -> None:
    """The enable-time checks of the model's shapes and the budget (see the module docstring)."""
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    if head_dim not in _C.HEAD_DIMS:
        raise ValueError(f"tidal_ext.hf.enable: head_dim: expected one of {tuple(_C.HEAD_DIMS)} (the tidal kernels' "
                         f"head dims), got {head_dim}")
    if max_cache_len is not None and max_cache_len < 1:
        raise ValueError(f"tidal_ext.hf.enable: max_cache_len: expected >= 1 or None, got {max_cache_len}")
    if not config.select_layers:  # all layers full: top_k is unused
        return
    for name, cap in (("max_position_embeddings", getattr(mc, "max_position_embeddings", None)),
                      ("max_cache_len", max_cache_len)):
        if cap is not None and config.top_k > cap:
            raise ValueError(f"tidal_ext.hf.enable: top_k: expected <= {name} = {cap} (a larger budget never "
                             f"selects: every layer would attend to every token), got {config.top_k}")


def enable(model: torch.nn.Module, config: Optional[TidalConfig] = None,
           max_cache_len: Optional[int] = None) -> torch.nn.Module:
    """Makes ``model`` decode with TidalDecode: validates ``config`` against the model (layer count,
    head_dim, top_k vs max_position_embeddings and the optional ``max_cache_len``, the capacity of the
    StaticCache the caller will generate with), attaches the shared state to every attention module,
    selects attn_implementation="tidal" and, with correction_stride > 0, installs the correction
    pre-hook. Returns the model. A failed check leaves the model unchanged."""
    config = config or TidalConfig()
    num_layers = model.config.num_hidden_layers
    window = getattr(model.config, "sliding_window", None)
    if window is not None and getattr(model.config, "use_sliding_window", True):
        raise NotImplementedError(
            f"tidal_ext.hf.enable: sliding-window attention (sliding_window={window}) is not supported; "
            "set model.config.sliding_window = None to run the layers as full attention")
    layers = _attention_modules(model)
    if len(layers) != num_layers:
        raise ValueError(f"tidal_ext.hf.enable: found {len(layers)} attention modules with layer_idx, "
                         f"expected num_hidden_layers = {num_layers}")
    _check_model(model, config, max_cache_len)
    state = TidalState(config, num_layers)
    for m in layers:
        m.tidal_state = state
    old = getattr(model, "_tidal_hook", None)
    if old is not None:
        old.remove()
    model._tidal_hook = None
    if config.correction_stride > 0:
        model._tidal_hook = model.register_forward_pre_hook(_correction_hook(state), with_kwargs=True)
    model.tidal_state = state
    model.set_attn_implementation(IMPLEMENTATION)
    return model


AttentionInterface.register(IMPLEMENTATION, tidal_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
