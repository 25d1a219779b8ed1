"""The command-line flags that say where model pairs come from (``--catalog``, ``--store``,
``--policies``), shared by ``hybridmesh up | demo`` and ``hybridmesh policy ...``."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CATALOG = Path("models/catalog.toml")
DEFAULT_STORE = Path("models/store")
DEFAULT_POLICIES = Path("models/policies")


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--catalog``, ``--store`` and ``--policies`` (``Path``s, repository-relative
    defaults) to ``parser``."""
    parser.add_argument(
        "--catalog",
        type=Path,
        default=DEFAULT_CATALOG,
        help="the pair catalog: each pair's models, tensors, output kind and data "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=DEFAULT_STORE,
        help="the model store holding the pairs' edge and cloud models (default %(default)s)",
    )
    parser.add_argument(
        "--policies",
        type=Path,
        default=DEFAULT_POLICIES,
        help="the router policy root, versions in <policies>/<pair>/<version>/ "
        "(default %(default)s)",
    )
