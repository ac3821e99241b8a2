"""TidalDecode for PyTorch: position persistent sparse attention ops.

``import tidal_ext`` loads the compiled extension, so ``torch.ops.tidal.*`` work in
eager mode, torch.compile (fake kernels in ``tidal_ext._fake``) and TorchScript. The functions
below are thin, documented wrappers around those ops; ``tidal_ext.reference`` is an independent
pure-PyTorch reference of the same semantics.
"""
import torch

try:
    from . import _C  # the C++ extension: registers torch.ops.tidal.* and TidalAttention
except ImportError as e:  # pragma: no cover - a source checkout that was never built
    raise ImportError(
        "tidal_ext: the C++ extension is not built; run `pip install --no-build-isolation -e .` "
        f"from the repository root ({e})"
    ) from e

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from .config import TidalConfig  # noqa: E402
from .ops import correct_kv_attention, decode_attention, select_attention, sparse_attention  # noqa: E402

from .module import TidalAttention  # noqa: E402


def DecodeContext(config: TidalConfig, num_layers: int):
    """The per-generation state all layers of a model share (torch.classes.tidal.DecodeContext):
    lengths and the current selection as device tensors, the step counter, the layer roles."""
    return torch.classes.tidal.DecodeContext(config._cpp, int(num_layers))


library_path = _C.__file__

__all__ = [
    "TidalConfig",
    "DecodeContext",
    "TidalAttention",
    "decode_attention",
    "select_attention",
    "sparse_attention",
    "correct_kv_attention",
    "library_path",
]
