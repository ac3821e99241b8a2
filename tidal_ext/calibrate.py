"""Choosing the re-selection layer: ``tidal_ext.calibrate.best_reselection_layer(model, samples)``.

TidalDecode's sparse layers attend to the positions the last select layer picked. A good
re-selection layer r picks positions that the later layers would pick themselves. For sample
texts this module measures, per layer, the top-k positions each query head ranks highest for the
last ``queries`` tokens (pre-softmax scores over the causal context, full attention everywhere),
and the recall of layer r's set against layer l's own set:
``recall[r, l] = |top_k(r) & top_k(l)| / |top_k(l)|``, averaged over heads, queries and samples
(the paper's overlap measure; group mode uses the union of a KV group's head sets). With the first
select layer f and a candidate re-selection layer r, every sparse layer l is served by the last
select layer before it (f for f < l < r, r for l > r); the candidate's score is the mean recall of
those pairs over all sparse layers, and the best candidate wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

IMPLEMENTATION = "tidal_calibrate"


@dataclass
class Calibration:
    recall: torch.Tensor            # [L, L] float64: recall of layer r's selection against layer l's
    scores: Dict[int, float]        # candidate layer -> mean recall of the sparse layers it implies
    best_layer: int


def _record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention as sdpa, and the top-k position sets of the last queries of this layer."""
    rec = module.tidal_calibration
    B, Hq, T, D = query.shape
    G = Hq // key.shape[1]
    n_q = min(rec["queries"], T)
    q = query[:, :, -n_q:].double()
    k = key[:, :, :T].double().repeat_interleave(G, dim=1)
    s = torch.einsum("bhqd,bhtd->bhqt", q, k)  # scale does not change the ranking
    causal = torch.arange(T, device=s.device)[None, :] <= torch.arange(T - n_q, T, device=s.device)[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    if attention_mask is not None:  # padding
        valid = attention_mask[:, :, -n_q:, :T]
        valid = valid if valid.dtype == torch.bool else valid == 0
        s = s.masked_fill(~valid, float("-inf"))
    k_eff = min(rec["top_k"], T)
    vals, idx = s.topk(k_eff, dim=-1)  # [B, Hq, n_q, k]; masked positions (-inf) are not selections
    sets = torch.zeros(B, Hq, n_q, T, dtype=torch.bool, device=s.device)
    sets.scatter_(-1, idx, vals > float("-inf"))
    if rec["mode"] == "group":  # one set per KV head: the union of its query heads' sets
        sets = sets.view(B, Hq // G, G, n_q, T).any(2)
    rec["sets"][module.layer_idx] = sets.cpu()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def layer_recall(model: torch.nn.Module, samples: Iterable[torch.Tensor], top_k: int = 256, mode: str = "head",
                 queries: int = 8) -> torch.Tensor:
    """recall[r, l] over the samples (each a [1, T] or [B, T] tensor of token ids)."""
    if mode not in ("head", "group"):
        raise ValueError(f'tidal_ext.calibrate: mode: expected "head" or "group", got "{mode}"')
    layers = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]
    L = len(layers)
    rec = {"top_k": top_k, "mode": mode, "queries": queries, "sets": {}}
    previous = model.config._attn_implementation
    total = torch.zeros(L, L, dtype=torch.float64)
    n = 0
    try:  # the model itself, switched to the recording attention and back
        for m in layers:
            m.tidal_calibration = rec
        model.set_attn_implementation(IMPLEMENTATION)
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in samples:
                rec["sets"].clear()
                model(input_ids=(ids if ids.dim() == 2 else ids[None]).to(device), use_cache=False)
                sets = [rec["sets"][i].double() for i in range(L)]
                for r in range(L):
                    for l in range(L):
                        inter = (sets[r] * sets[l]).sum(-1)
                        total[r, l] += (inter / sets[l].sum(-1).clamp(min=1)).mean()
                n += 1
    finally:
        model.set_attn_implementation(previous)
        for m in layers:
            del m.tidal_calibration
    if n == 0:
        raise ValueError("tidal_ext.calibrate: no samples")
    return total / n


def best_reselection_layer(model: torch.nn.Module, samples: Iterable[torch.Tensor], top_k: int = 256,
                           mode: str = "head", queries: int = 8, first_select: int = 2,
                           candidates: Optional[List[int]] = None) -> Calibration:
    """The re-selection layer (after the first select layer) that makes the schedule
    (first_select, r) cover the sparse layers' own top-k sets best; candidates default to every
    layer between first_select and the last one."""
    recall = layer_recall(model, samples, top_k, mode, queries)
    L = recall.shape[0]
    candidates = candidates or list(range(first_select + 1, L - 1))
    scores = {r: schedule_recall(recall, (first_select, r)) for r in candidates if first_select < r < L - 1}
    if not scores:
        raise ValueError(f"tidal_ext.calibrate: no candidate layer between {first_select} and {L - 1}: {candidates}")
    return Calibration(recall, scores, max(scores, key=scores.get))


def schedule_recall(recall: torch.Tensor, select_layers) -> float:
    """Mean recall[s(l), l] over the sparse layers l of a schedule, s(l) the last select layer before l."""
    select = sorted(select_layers)
    pairs = [(max(s for s in select if s < l), l) for l in range(select[0] + 1, recall.shape[0]) if l not in select]
    return sum(recall[s, l].item() for s, l in pairs) / max(1, len(pairs))


AttentionInterface.register(IMPLEMENTATION, _record)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
