"""Label-preserving test-time views of a model input (shared by the edge tier, the
router's features and training, so all three transform the same way).

A pair declares its views in ``models/catalog.toml`` (``views = ["hflip"]``); a pair
without a label-preserving transform declares none. The edge tier runs its model once
more per view and returns the output as an extra tensor named
``<output>_view_<view>`` (``view_output_name``); the router turns the two outputs into
features (``router_service.features``).

- ``hflip``: the input mirrored left-right (its last axis reversed), for images laid
  out ``[n, channels, height, width]`` or ``[n, height, width]``. Label-preserving only
  for data whose classes are mirror-symmetric (clothing, most natural images: the
  Fashion-MNIST edge model was trained with flips); not for digits or text.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from services.errors import clip

ViewFunction = Callable[[npt.NDArray[np.generic]], npt.NDArray[np.generic]]


def _hflip(inputs: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    result: npt.NDArray[np.generic] = np.ascontiguousarray(inputs[..., ::-1])
    return result


VIEWS: dict[str, ViewFunction] = {"hflip": _hflip}
# The least input rank (batch included) each view applies to.
MIN_RANK = {"hflip": 3}


class UnknownViewError(ValueError):
    """A view name nobody implements, or an input it cannot apply to."""


def apply_view(name: str, inputs: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """``inputs`` (batch first) seen through view ``name``."""
    if name not in VIEWS:
        raise UnknownViewError(f"unknown view {clip(name)!r}; views: {sorted(VIEWS)}")
    if inputs.ndim < MIN_RANK[name]:
        raise UnknownViewError(
            f"view {name!r} needs an input of rank >= {MIN_RANK[name]}, got {inputs.shape}"
        )
    return VIEWS[name](inputs)


def view_output_name(output: str, view: str) -> str:
    """The extra output tensor's name for ``view`` of model output ``output``."""
    return f"{output}_view_{view}"
