"""Write the edge canary's golden set: the first 1,000 images of the calibration split
(never used to train the edge model, never the test split) with their labels.

``python tools/make_golden_set.py models/golden/fashion-edge.npz``
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_node.canary import GoldenSet
from workload.fashion_mnist import golden_split


def main() -> None:
    GoldenSet.of(golden_split()).save(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
