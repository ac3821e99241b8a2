"""Fuzz cases against the reference in CI (fixed seed; tests/fuzz.py runs 10,000 on the GPU)."""
import fuzz


def test_fuzz_cpu():
    cases, failures = fuzz.run(300, "cpu", seed=0)
    assert cases == 300
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:20])
