"""Write the edge canary's golden set: the first 1,000 images of the calibration split
(never used to train the edge model, never the test split) with their labels.

``python tools/make_golden_set.py models/golden/fashion-edge.npz``
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_node.canary import GoldenSet
from workload.fashion_mnist import load_split

GOLDEN_SIZE = 1000


def main() -> None:
    split = load_split("calibration")
    GoldenSet(split.images[:GOLDEN_SIZE], split.labels[:GOLDEN_SIZE]).save(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
