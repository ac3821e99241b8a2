"""tidal_ext.calibrate: the re-selection-layer tool (recall of a layer's top-k against later layers')."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tidal_ext import calibrate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("sdpa")
    return m


def samples(n=2, T=96):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (1, T), generator=g) for _ in range(n)]


@pytest.mark.parametrize("mode", ["head", "group"])
def test_recall_matrix_properties(model, mode):
    r = calibrate.layer_recall(model, samples(), top_k=16, mode=mode)
    L = model.config.num_hidden_layers
    assert r.shape == (L, L) and r.dtype == torch.float64
    assert torch.allclose(r.diagonal(), torch.ones(L, dtype=torch.float64))
    assert ((r >= 0) & (r <= 1)).all()
    assert (r < 1).any(), "random layers must disagree somewhere at top_k 16 of 96"
    # the tool leaves the model as it was
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "tidal_calibration") for m in model.modules())


def test_full_budget_recall_is_one(model):
    """top_k >= context: every layer keeps every causal position, so all recalls are 1."""
    r = calibrate.layer_recall(model, samples(T=40), top_k=64)
    assert torch.allclose(r, torch.ones_like(r))
    assert calibrate.schedule_recall(r, (2, 4)) == pytest.approx(1.0)


def test_best_layer_maximizes_the_schedule_recall(model):
    c = calibrate.best_reselection_layer(model, samples(), top_k=16, first_select=1)
    assert set(c.scores) == set(range(2, model.config.num_hidden_layers - 1))
    assert c.best_layer == max(c.scores, key=c.scores.get)
    for r, score in c.scores.items():
        assert score == pytest.approx(calibrate.schedule_recall(c.recall, (1, r)))


def test_schedule_recall_pairs_each_sparse_layer_with_its_select_layer():
    r = torch.arange(36, dtype=torch.float64).view(6, 6) / 100
    # schedule (1, 3) over 6 layers: sparse 2 <- 1, sparse 4 and 5 <- 3
    assert calibrate.schedule_recall(r, (1, 3)) == pytest.approx((r[1, 2] + r[3, 4] + r[3, 5]).item() / 3)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="mode"):
        calibrate.layer_recall(model, samples(), mode="heads")
    with pytest.raises(ValueError, match="no samples"):
        calibrate.layer_recall(model, [])
    with pytest.raises(ValueError, match="candidate"):
        calibrate.best_reselection_layer(copy.deepcopy(model), samples(), candidates=[0, 1])
