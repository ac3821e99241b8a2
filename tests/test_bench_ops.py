"""CPU test of benchmarks/bench_ops.py's step bounds: floor_bound is 32 x SDPA over the floors of the
step's reads (dense layers at the stream floor, sparse layers at the gather floor; head mode the
faster of its per-head and distinct rows), step_floor_bound 32 x SDPA over the fastest pure-read step
of the mode (step_floor.cu) and step_merge_floor_bound over the fastest such step that merges what
its layers split (whichever sparse design), each only where its floors were measured (B = 1, same
N); and the rotation that keeps L2 from serving a benchmark's repeated reads."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_ops  # noqa: E402


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def test_floor_bound_from_the_floor_files(tmp_path):
    _write(tmp_path / "stream_floor.json", {"rows": [
        {"B": 1, "N": 32768, "variant": "rows", "us": 47.0}, {"B": 1, "N": 32768, "variant": "tile", "us": 45.0},
        {"B": 8, "N": 32768, "variant": "tile", "us": 343.0}]})
    _write(tmp_path / "gather_floor_32k.json", {"N": 32768, "rows": [
        {"pattern": "random", "mode": "head", "us": 13.5}, {"pattern": "random", "mode": "head", "us": 13.3},
        {"pattern": "random", "mode": "head-union", "us": 13.2}, {"pattern": "random", "mode": "group", "us": 4.9},
        {"pattern": "contiguous", "mode": "head", "us": 1.0}]})  # not random rows: ignored
    rows = [{"B": 1, "N": 32768, "mode": "head", "full_ms": 1.64, "dense_layers": 4},
            {"B": 1, "N": 32768, "mode": "group", "full_ms": 1.64, "dense_layers": 4},
            {"B": 8, "N": 32768, "mode": "head", "full_ms": 11.2, "dense_layers": 4},   # no gather floor at B = 8
            {"B": 1, "N": 131072, "mode": "head", "full_ms": 5.7, "dense_layers": 4}]  # no floors at 128K
    _write(tmp_path / "step_floor_32k.json", {"N": 32768, "rows": [
        {"mode": "head", "launch": "plain", "layers": "all", "us": 560.0},
        {"mode": "head", "launch": "early", "layers": "all", "us": 550.0},
        {"mode": "head", "launch": "early", "layers": "sparse", "us": 400.0},  # not the whole step: ignored
        {"mode": "group", "launch": "early", "layers": "all", "us": 330.0},
        {"mode": "head", "launch": "early", "layers": "all", "merge": True, "us": 580.0},
        {"mode": "head", "launch": "plain", "layers": "all", "merge": True, "us": 590.0},
        {"mode": "head", "sparse": "row", "launch": "early", "layers": "all", "merge": False, "us": 575.0},
        {"mode": "head", "sparse": "row", "launch": "early", "layers": "all", "merge": True, "us": 570.0},
        {"mode": "head", "launch": "early", "layers": "sparse", "merge": True, "us": 420.0}]})  # no group merge row
    bench_ops.floor_bounds(rows, str(tmp_path))
    head, group, b8, n128 = rows
    assert head["stream_floor_us"] == 45.0 and head["gather_floor_us"] == 13.2
    assert head["floor_bound"] == pytest.approx(1640.0 / (4 * 45.0 + 28 * 13.2))
    assert group["gather_floor_us"] == 4.9
    assert group["floor_bound"] == pytest.approx(1640.0 / (4 * 45.0 + 28 * 4.9))
    assert "floor_bound" not in b8 and "floor_bound" not in n128
    assert head["step_floor_us"] == 550.0 and head["step_floor_bound"] == pytest.approx(1640.0 / 550.0)
    assert group["step_floor_bound"] == pytest.approx(1640.0 / 330.0)
    assert "step_floor_bound" not in b8 and "step_floor_bound" not in n128
    # the fastest design with its merges: sparse layers a CTA a row (merges behind the dense layers only)
    assert head["step_merge_floor_us"] == 570.0 and head["step_merge_floor_bound"] == pytest.approx(1640.0 / 570.0)
    assert "step_merge_floor_bound" not in group and "step_merge_floor_bound" not in b8


def test_floor_bound_without_floor_files(tmp_path):
    rows = [{"B": 1, "N": 32768, "mode": "head", "full_ms": 1.64, "dense_layers": 4}]
    bench_ops.floor_bounds(rows, str(tmp_path))
    assert "floor_bound" not in rows[0]


def test_rotation_reads_twice_the_l2_between_repeats(monkeypatch):
    monkeypatch.setattr(bench_ops, "l2_bytes", lambda: 50 << 20)
    assert bench_ops.rotation(1 << 30) == 3  # whole caches: the least
    n = bench_ops.rotation(8 << 20)  # group mode's sparse call at 1x32K, k = 2048
    assert (n - 1) * (8 << 20) >= 2 * (50 << 20) > (n - 2) * (8 << 20)


def test_disjoint_index_sets():
    B, rows, N, k, n = 2, 3, 64, 8, 5
    sets = bench_ops.disjoint_index_sets(n, B, rows, N, k, device="cpu")
    assert len(sets) == n and all(s.shape == (B, rows, k) and s.dtype == torch.int32 for s in sets)
    assert all(bool((s[..., 1:] > s[..., :-1]).all()) for s in sets)  # sorted, distinct
    both = torch.cat(sets, -1)
    for b in range(B):
        for r in range(rows):
            assert both[b, r].unique().numel() == n * k and 0 <= int(both[b, r].min()) and int(both[b, r].max()) < N
