"""A photograph with a face (matplotlib's sample data), for the anonymiser tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import numpy.typing as npt

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def photo() -> npt.NDArray[np.uint8]:
    bgr = cv2.imread(str(PHOTO))
    assert bgr is not None, PHOTO
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
