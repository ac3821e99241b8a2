"""pytest configuration of the python tests.

* `device` fixture: "cpu", plus "cuda" when torch.cuda.is_available() (the same sweep then runs on
  the GPU machine). Tests skip dtypes a device does not support (CUDA: fp16/bf16 only).
* Every test gets fresh random inputs seeded from its own test id (reproducible, independent of the
  order or subset of tests run).
* `slow` marks the bigger shapes (N ~ 2K); they are cheap enough on CPU to run by default
  (deselect with -m "not slow" for a quicker loop).
"""

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: bigger shapes (N ~ 2K); deselect with -m 'not slow'")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield

