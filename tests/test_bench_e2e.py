"""CPU smoke test of benchmarks/bench_e2e.py: the captured decode step is a real greedy decode (a
full-budget TidalDecode gives the full-attention tokens) and the JSON has the issue's schema."""
import json
import os
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_e2e  # noqa: E402


def test_decode_step_full_budget_equals_full_attention():
    torch.manual_seed(0)
    cfg = LlamaConfig(**bench_e2e.TINY, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    dec = bench_e2e.Decoder(model, B=2, N=100, steps=6)
    bench_e2e.use(model, "full_tidal")
    _, full = dec.ms_per_token(6, graph=False)
    bench_e2e.use(model, "tidal", top_k=128, mode="head")  # 128 >= every length: selects everything
    _, tidal = dec.ms_per_token(6, graph=False)
    assert full.shape == (2, 6) and torch.equal(full, tidal)
    bench_e2e.use(model, "tidal", top_k=8, mode="group")
    _, sparse = dec.ms_per_token(6, graph=False)
    assert sparse.shape == (2, 6)


def test_fused_step_equals_hf_layers():
    """The fused step (pre/post-attention functions around the cache update and the attention
    interface) computes what the HF decoder layers compute, for each attention variant."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**bench_e2e.TINY, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    dec = bench_e2e.Decoder(model, B=2, N=50, steps=2, compile=False)
    bench_e2e.FULL_ROWS["n"] = 51
    for variant, kw in (("full_cudnn", {}), ("full_tidal", {}), ("tidal", dict(top_k=16, mode="head"))):
        bench_e2e.use(model, variant, **kw)
        logits = []
        for fused in (False, True):
            dec.fused = fused
            dec.reset()
            logits.append(dec.step())
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4, msg=variant)


def test_bench_e2e_json(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--device", "cpu", "--tiny",
                    "--shapes", "1x64", "--steps", "2", "--top-k", "16", "--modes", "head,group", "--no-compile",
                    "--out", str(out)],
                   check=True, env=env, capture_output=True)
    result = json.loads(out.read_text())
    assert {"card", "date", "rows"} <= set(result)
    assert len(result["rows"]) == 4  # 2 modes x steps fused and hf
    for row in result["rows"]:
        assert {"B", "N", "top_k", "mode", "ms_tidal", "ms_full", "speedup", "floor_ms"} <= set(row)
        assert row["ms_tidal"] > 0 and row["ms_full"] > 0
