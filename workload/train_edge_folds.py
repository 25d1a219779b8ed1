"""Train K edge fold models on the model-train split (out-of-fold router training data).

Fold model k is the edge recipe (``workload.train_fashion``: same network, epochs,
learning rate, flips) fitted on model-train minus fold k (``workload.folds.fold_of``); its
outputs on fold k are out-of-fold. Runs in the training venv (``make models``):
``.venv-train/bin/python -m workload.train_edge_folds --folds 5``. Writes
``models/folds/fashion-edge/<version>/`` (fold-<k>.onnx, folds.json, MODEL_CARD.md with
the training cost). About 1 minute per fold on 2 shared cores at 12 epochs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from workload.fashion_mnist import SPLIT_SEED, Split, load_split
from workload.folds import FOLD_SEED, FOLDS_FILE, FOLDS_ROOT, FOLDS_SCHEMA, fold_of
from workload.train_fashion import RECIPES, export_onnx, train

_log = logging.getLogger("workload.train_edge_folds")
SPLIT = "model_train"


def _oof_accuracy(onnx_bytes: bytes, held_out: Split) -> float:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": held_out.images})
    return float((np.asarray(logits).argmax(axis=1) == held_out.labels).mean())


def build(
    root: Path, version: int, folds: int, epochs: int | None, *, seed: int, threads: int = 2
) -> Path:
    name, factory, recipe_epochs, learning_rate, _ = RECIPES["edge"]
    epochs = recipe_epochs if epochs is None else epochs
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Before hours of training: the staging directory below lives in ``root``.
    root.mkdir(parents=True, exist_ok=True)
    data = load_split(SPLIT)
    assignment = fold_of(len(data.labels), folds, FOLD_SEED)
    entries: list[dict[str, Any]] = []
    files: dict[str, bytes] = {}
    for k in range(folds):
        torch.manual_seed(seed + k)
        keep = assignment != k
        fit = Split(f"{SPLIT}-without-fold-{k}", data.images[keep], data.labels[keep])
        held_out = Split(f"{SPLIT}-fold-{k}", data.images[~keep], data.labels[~keep])
        started = time.perf_counter()
        network = train(factory(), epochs, learning_rate, seed + k, fit)
        seconds = time.perf_counter() - started
        onnx_bytes = export_onnx(network)
        accuracy = _oof_accuracy(onnx_bytes, held_out)
        files[f"fold-{k}.onnx"] = onnx_bytes
        entries.append(
            {
                "fold": k,
                "file": f"fold-{k}.onnx",
                "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
                "train_items": int(keep.sum()),
                "held_out_items": int((~keep).sum()),
                "training_seconds": round(seconds, 1),
                "out_of_fold_accuracy": round(accuracy, 4),
                "seed": seed + k,
            }
        )
        _log.info("fold %d/%d: %.0f s, out-of-fold accuracy %.4f", k + 1, folds, seconds, accuracy)
    command = (
        f"python -m workload.train_edge_folds --folds {folds} --version {version}"
        + (f" --epochs {epochs}" if epochs != recipe_epochs else "")
        + f" --seed {seed}"
    )
    metadata = {
        "schema": FOLDS_SCHEMA,
        "edge_model": name,
        "edge_version": version,
        "split": SPLIT,
        "split_seed": SPLIT_SEED,
        "folds": folds,
        "seed": FOLD_SEED,
        "epochs": epochs,
        "recipe_epochs": recipe_epochs,
        "learning_rate": learning_rate,
        "torch": torch.__version__,
        "command": command,
        "training_seconds_total": round(sum(e["training_seconds"] for e in entries), 1),
        "fold_models": entries,
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(),
    }
    files[FOLDS_FILE] = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    files["MODEL_CARD.md"] = model_card(metadata).encode()
    target = root / name / str(version)
    # Written beside, then renamed: a half-written fold set is never read.
    with tempfile.TemporaryDirectory(dir=root) as staging:
        staged = Path(staging) / "set"
        staged.mkdir()
        for file_name, content in files.items():
            (staged / file_name).write_bytes(content)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def model_card(metadata: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {e['fold']} | {e['train_items']:,} | {e['held_out_items']:,} | "
        f"{e['training_seconds']:.0f} s | {e['out_of_fold_accuracy'] * 100:.2f} % |"
        for e in metadata["fold_models"]
    )
    epochs_note = (
        ""
        if metadata["epochs"] == metadata["recipe_epochs"]
        else f" (the served edge model: {metadata['recipe_epochs']})"
    )
    return f"""# Model card: {metadata["edge_model"]} v{metadata["edge_version"]} fold models

{metadata["folds"]} copies of the edge recipe, fold model k fitted on the `{metadata["split"]}`
split minus fold k (fold assignment: seeded permutation, seed {metadata["seed"]}). Their
outputs on the fold each did not see are out-of-fold edge outputs: router training data
(`workload/folds.py`, `hybridmesh policy train`). Never served.

| fold | fitted on | out-of-fold items | training time | out-of-fold accuracy |
| --- | --- | --- | --- | --- |
{rows}

Training cost: {metadata["training_seconds_total"]:.0f} s of wall time in all, on 2 CPU cores \
shared with other work
(per-fold times follow the load, not the fold)
(torch {metadata["torch"]}, {metadata["epochs"]} epochs{epochs_note}, learning rate
{metadata["learning_rate"]}).

Rebuild: `{metadata["command"]}` (`make models`).
"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=FOLDS_ROOT)
    parser.add_argument("--version", type=int, default=1, help="the edge version they mirror")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the edge recipe's")
    parser.add_argument("--seed", type=int, default=7)
    # On a CPU shared with other work, one thread wastes less time in OpenMP barriers.
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    build(
        arguments.root,
        arguments.version,
        arguments.folds,
        arguments.epochs,
        seed=arguments.seed,
        threads=arguments.threads,
    )


if __name__ == "__main__":
    main()
