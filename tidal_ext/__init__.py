"""TidalDecode for PyTorch: position persistent sparse attention ops.

``import tidal_ext`` loads the compiled ``tidal`` op library, so ``torch.ops.tidal.*`` work in
eager mode, torch.compile (fake kernels in ``tidal_ext._fake``) and TorchScript. The functions
below are thin, documented wrappers around those ops; ``tidal_ext.reference`` is an independent
pure-PyTorch reference of the same semantics.
"""
import importlib.machinery
import os

import torch

_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
if not os.path.exists(_LIBRARY):
    raise ImportError(
        f"tidal_ext: the op library {_LIBRARY} is missing; build it with "
        "`pip install --no-build-isolation -e .` from the repository root"
    )
torch.ops.load_library(_LIBRARY)

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from .config import TidalConfig  # noqa: E402
from .ops import correct_kv_attention, decode_attention, select_attention, sparse_attention  # noqa: E402

library_path = _LIBRARY

__all__ = [
    "TidalConfig",
    "decode_attention",
    "select_attention",
    "sparse_attention",
    "correct_kv_attention",
    "library_path",
]
