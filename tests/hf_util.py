"""Helpers of tests/test_hf.py: tiny random-weight HF models, batches with left padding, a
teacher-forced decode driver and an independent masking reference of the PPSA schedule.

The reference ("ppsa_ref", registered in transformers' AttentionInterface) is written from the
method's description (DESIGN.md section 1), not from tidal_ext.hf: it works on HF's own cache layout
(left padding stays where the cache puts it, validity comes from HF's attention mask), builds
boolean masks and runs plain softmax attention in float64. It never calls a tidal op.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import (AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          StaticCache)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PAD_ID = 0
VOCAB = 192

# family -> (config class, model class, shape kwargs). GQA everywhere, head_dim 32 or 64,
# 4-6 layers, hidden 128. Mistral's sliding window is off (contexts here are short anyway).
FAMILIES: Dict[str, tuple] = {
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2, head_dim=32)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM,
              dict(num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=32)),
    "mistral": (MistralConfig, MistralForCausalLM,
                dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                     sliding_window=None)),
}


def make_config(family: str, **overrides):
    cfg_cls, _, shape = FAMILIES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, max_position_embeddings=512,
              pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              rms_norm_eps=1e-6)
    kw.update(shape)
    kw.update(overrides)
    return cfg_cls(**kw)


def random_state_dict(family: str, seed: int = 0, **overrides) -> Dict[str, torch.Tensor]:
    """Weights with O(1) activations and peaky attention (HF's default init, std 0.02, gives almost
    uniform attention, under which top-k selection would barely matter)."""
    _, model_cls, _ = FAMILIES[family]
    model = model_cls(make_config(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            # RMSNorm gains; q_norm/k_norm (Qwen3) a bit above 1 for sharper attention
            gain = 1.6 if ("q_norm" in name or "k_norm" in name) else 1.0
            t = gain * (1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            t = 0.2 * torch.randn(p.shape, generator=g)
        elif p.dim() == 2 and "embed_tokens" in name:
            t = torch.randn(p.shape, generator=g)
        elif p.dim() == 2:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
            t = gain * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        else:
            t = p.detach().clone()
        sd[name] = t.to(p.dtype)
    return sd


def make_model(family: str, impl: str = "sdpa", state_dict=None, device="cpu", dtype=torch.float32,
               seed: int = 0, **overrides):
    """A fresh model with its own config object (HF models share theirs, and set_attn_implementation
    mutates it), the given (or seeded random) weights, in eval mode."""
    _, model_cls, _ = FAMILIES[family]
    cfg = copy.deepcopy(make_config(family, **overrides))
    model = model_cls(cfg).eval()
    model.load_state_dict(state_dict if state_dict is not None else random_state_dict(family, seed, **overrides))
    model.to(device=device, dtype=dtype)
    if impl is not None:
        model.set_attn_implementation(impl)
    return model


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    ids: torch.Tensor        # [B, T] (prompt + the teacher-forced continuation), left padded
    mask: torch.Tensor       # [B, T] 1 = real token
    positions: torch.Tensor  # [B, T] as generate() derives them
    prompt_len: int          # padded prompt width P; decode tokens are ids[:, P:]
    pads: List[int]          # left padding per row


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s position ids: cumsum of the mask - 1, padding -> 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def make_batch(lens: Sequence[int], steps: int = 0, device="cpu", generator=None, pad_fill=None) -> Batch:
    """len(lens) prompts of the given lengths, left padded to max(lens), plus `steps` continuation
    tokens per row. pad_fill: the token ids in padded slots (default PAD_ID; a tensor/int to vary)."""
    B, P = len(lens), max(lens)
    ids = torch.randint(3, VOCAB, (B, P + steps), generator=generator)
    mask = torch.ones(B, P + steps, dtype=torch.long)
    pads = [P - L for L in lens]
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    fill = PAD_ID if pad_fill is None else pad_fill
    if isinstance(fill, torch.Tensor):
        ids = torch.where(mask == 0, fill.to(ids.dtype), ids)
    else:
        ids = ids.masked_fill(mask == 0, fill)
    return Batch(ids.to(device), mask.to(device), positions_of(mask).to(device), P, pads)


def new_cache(model, kind: str, max_len: int = 96):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    raise ValueError(kind)


@torch.no_grad()
def prefill(model, batch: Batch, cache):
    P = batch.prompt_len
    out = model(input_ids=batch.ids[:, :P], attention_mask=batch.mask[:, :P], position_ids=batch.positions[:, :P],
                past_key_values=cache, use_cache=True)
    return out.logits


@torch.no_grad()
def decode_step(model, batch: Batch, cache, t: int):
    """Feeds token t (absolute index into batch.ids, t >= prompt_len) as generate() would."""
    out = model(input_ids=batch.ids[:, t:t + 1], attention_mask=batch.mask[:, :t + 1],
                position_ids=batch.positions[:, t:t + 1], past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


@torch.no_grad()
def teacher_forced(model, batch: Batch, cache_kind: str = "dynamic", cache=None):
    """(prefill logits [B, P, V], [decode logits [B, V] per step], cache)."""
    if cache is None:
        cache = new_cache(model, cache_kind, max_len=batch.ids.shape[1] + 8)
    pre = prefill(model, batch, cache)
    steps = [decode_step(model, batch, cache, t) for t in range(batch.prompt_len, batch.ids.shape[1])]
    return pre, steps, cache


# ------------------------------------------------------------------------------------------------
# the PPSA masking reference
# ------------------------------------------------------------------------------------------------
REF_IMPL = "ppsa_ref"


@dataclass
class PPSASchedule:
    top_k: int
    select_layers: Tuple[int, ...]
    mode: str = "head"
    sink: int = 0
    recent: int = 0

    def role(self, layer: int) -> str:
        if not self.select_layers or layer < self.select_layers[0]:
            return "full"
        return "select" if layer in self.select_layers else "sparse"


class PPSARefState:
    def __init__(self, schedule: PPSASchedule):
        self.schedule = schedule
        self.selected: Optional[torch.Tensor] = None  # bool [B, Hq, L] of the last select layer
        self.log: List[tuple] = []                     # (layer, role) of each decode call


def _valid_keys(attention_mask, B: int, T: int, L: int, device) -> torch.Tensor:
    """bool [B, T, L]: which keys each query may attend, from HF's mask (None: plain causal with
    the T queries being the last T of the L keys)."""
    if attention_mask is None:
        q = torch.arange(T, device=device)[:, None] + (L - T)
        return (torch.arange(L, device=device)[None, :] <= q)[None].expand(B, T, L)
    m = attention_mask
    if m.dtype != torch.bool:
        m = m == 0  # additive float mask: 0 = attend
    m = m[..., :L]
    if m.shape[1] != 1:
        raise AssertionError(f"ppsa_ref: expected a head-broadcast mask, got {tuple(m.shape)}")
    return m[:, 0].expand(B, T, L)


def _forced(valid_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """The positions always kept among the ascending valid positions of one sequence."""
    keep = [valid_pos[-1:], valid_pos[:sink]]
    if recent > 0:
        keep.append(valid_pos[-recent:])
    return torch.unique(torch.cat(keep))


def reference_selection(scores: torch.Tensor, valid: torch.Tensor, sch: PPSASchedule, G: int) -> torch.Tensor:
    """scores [B, Hq, L] (scaled q.k, float64), valid [B, L] -> bool [B, Hq, L] selected positions.

    head: per query head the top (k - forced) scores among non-forced valid positions;
    group: per KV head, ranked by max over its G query heads of log-softmax (over valid positions)."""
    B, Hq, L = scores.shape
    sel = torch.zeros(B, Hq, L, dtype=torch.bool, device=scores.device)
    for b in range(B):
        vpos = valid[b].nonzero().flatten()
        n = vpos.numel()
        if n <= sch.top_k:
            sel[b, :, vpos] = True
            continue
        forced = _forced(vpos, sch.sink, sch.recent)
        s = scores[b].masked_fill(~valid[b][None], -math.inf)
        if sch.mode == "group":
            s = torch.log_softmax(s, dim=-1).view(Hq // G, G, L).amax(dim=1)  # [Hkv, L]
        s = s.clone()
        s[:, forced] = -math.inf  # forced ones are added below; rank only the others
        budget = sch.top_k - forced.numel()
        top = s.topk(budget, dim=-1).indices  # all finite: n - |forced| >= budget
        rows = torch.zeros_like(s, dtype=torch.bool)
        rows.scatter_(1, top, True)
        rows[:, forced] = True
        if sch.mode == "group":
            rows = rows.repeat_interleave(G, dim=0)
        sel[b] = rows
    return sel


def ppsa_ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Prefill: HF's sdpa. Decode (one query): full / select / sparse attention by masking."""
    st: PPSARefState = module.ppsa_ref
    B, Hq, T, D = query.shape
    if T > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    Hkv, L = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scaling is None else scaling
    valid = _valid_keys(attention_mask, B, T, L, query.device)[:, 0]  # [B, L]
    q = query[:, :, 0].double()
    k = key.double().repeat_interleave(G, dim=1)
    v = torch.where(valid[:, None, :, None], value.double(), 0.0).repeat_interleave(G, dim=1)
    s = scale * torch.einsum("bhd,bhld->bhl", q, k)  # [B, Hq, L]
    role = st.schedule.role(module.layer_idx)
    st.log.append((module.layer_idx, role))
    attend = valid[:, None, :].expand(B, Hq, L)
    if role == "select":
        st.selected = reference_selection(s, valid, st.schedule, G)
    elif role == "sparse":
        attend = attend & st.selected
    p = torch.softmax(s.masked_fill(~attend, -math.inf), dim=-1)
    out = torch.einsum("bhl,bhld->bhd", p, v)
    return out.to(query.dtype)[:, None], None  # [B, 1, Hq, D]


AttentionInterface.register(REF_IMPL, ppsa_ref_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REF_IMPL, sdpa_mask)


def make_ref_model(family: str, schedule: PPSASchedule, state_dict, device="cpu", dtype=torch.float32, **overrides):
    model = make_model(family, impl=REF_IMPL, state_dict=state_dict, device=device, dtype=dtype, **overrides)
    st = PPSARefState(schedule)
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling"):
            m.ppsa_ref = st
    model.ppsa_ref = st
    return model


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def valid_prefill_logits(logits: torch.Tensor, batch: Batch) -> List[torch.Tensor]:
    """The prefill logits of the real (non-padded) prompt positions, one tensor per row."""
    return [logits[b, batch.pads[b]:] for b in range(logits.shape[0])]


def cache_rows(cache, layer: int):
    """(keys, values) [B, Hkv, N, D] of one layer of an HF cache object."""
    lay = cache.layers[layer]
    return lay.keys, lay.values


def native_valid_rows(cache, layer: int, batch: Batch, b: int, n: int):
    """Rows of sequence b's first n valid tokens in HF's native (left padded) layout."""
    k, v = cache_rows(cache, layer)
    pad = batch.pads[b]
    return k[b, :, pad:pad + n], v[b, :, pad:pad + n]
