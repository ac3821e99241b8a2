"""pytest configuration of the python tests.

* `device` fixture: "cpu", plus "cuda" when torch.cuda.is_available() (the same sweep then runs on
  the GPU machine). Tests skip dtypes a device does not support (CUDA: fp16/bf16 only).
* Every test gets fresh random inputs seeded from its own test id (reproducible, independent of the
  order or subset of tests run).
* `slow` tests (bigger shapes) run on CPU only with --runslow or TIDAL_SLOW=1; on CUDA they always run.
"""

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow on CPU (bigger shapes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: bigger shapes; on CPU only with --runslow or TIDAL_SLOW=1")


def _run_slow(config):
    return config.getoption("--runslow") or os.environ.get("TIDAL_SLOW", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if _run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow on CPU: use --runslow or TIDAL_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            callspec = getattr(item, "callspec", None)
            if callspec is None or callspec.params.get("device", "cpu") == "cpu":
                item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield

