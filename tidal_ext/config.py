"""tidal_ext.TidalConfig: the Python face of tidal::TidalConfig (include/tidal/config.h).

Validation is the C++ one: constructing the config builds a torch.classes.tidal.TidalConfig, whose
constructor raises on a bad field, so Python and C++ accept exactly the same configurations."""
from dataclasses import dataclass, field
from typing import Tuple

import torch


@dataclass(frozen=True)
class TidalConfig:
    """The layer schedule and token budget of TidalDecode.

    top_k: tokens attended by sparse layers (newest, sink and recent tokens included).
    select_layers: layers that do full attention and pick the top_k positions; layers before the
        first are full attention, every other later layer is sparse. Empty: all layers full.
    mode: "head" (a set per query head, the paper) or "group" (a set per KV head).
    sink / recent: first / last tokens always kept.
    correction_stride: every S decode steps re-run the last S tokens with full attention (0 = off).
    """

    top_k: int = 2048
    select_layers: Tuple[int, ...] = (2, 13)
    mode: str = "head"
    sink: int = 0
    recent: int = 0
    correction_stride: int = 0
    _cpp: object = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "select_layers", tuple(int(x) for x in self.select_layers))
        cpp = torch.classes.tidal.TidalConfig(int(self.top_k), list(self.select_layers), str(self.mode),
                                              int(self.sink), int(self.recent), int(self.correction_stride))
        object.__setattr__(self, "_cpp", cpp)

    def role(self, layer_idx: int) -> str:
        """"full", "select" or "sparse" for a decode step of layer ``layer_idx``."""
        return self._cpp.role(int(layer_idx))

    def validate_for_model(self, num_layers: int) -> None:
        """Raises if a select layer is beyond the model's ``num_layers`` layers."""
        self._cpp.validate_for_model(int(num_layers))
