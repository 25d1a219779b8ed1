"""Train the Fashion-MNIST edge and cloud CNNs and write them into the model store.

Runs in the training venv (torch is a training-only dependency, never imported by a
service): ``make models`` or
``.venv-train/bin/python -m workload.train_fashion --model edge --store models/store``.
Seeded and deterministic (reruns reproduce model.onnx byte for byte on this machine);
about 1.5 minutes (edge) and 5-7 minutes (cloud) on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from workload.fashion_evaluation import evaluate
from workload.fashion_mnist import LABELS, SPLIT_SEED, SPLIT_SIZES, Split, load_split
from workload.model_store import ModelManifest, TensorEntry, write_version

_log = logging.getLogger("workload.train_fashion")
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530  # of the model-train split, rounded
OPSET = 17
MAX_BATCH_SIZE = 64


class ScaleUint8(nn.Module):
    """uint8 pixels in, normalised floats out: the scaling lives inside the graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def edge_network() -> nn.Module:
    """~9k parameters: two small convolutions and a linear head."""
    return nn.Sequential(
        ScaleUint8(),
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip


def cloud_network() -> nn.Module:
    """~0.5M parameters: three convolutions with batch norm, dropout, a wide head."""
    return nn.Sequential(
        ScaleUint8(),
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 7 * 7, 64), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(64, 10),
    )  # fmt: skip


# name, network, epochs, learning rate, description
RECIPES: dict[str, tuple[str, Callable[[], nn.Module], int, float, str]] = {
    "edge": ("fashion-edge", edge_network, 12, 3e-3, "tiny CNN for the edge node"),
    "cloud": ("fashion-cloud", cloud_network, 10, 1e-3, "larger CNN for the cloud tier (Triton)"),
}


def train(
    network: nn.Module,
    epochs: int,
    learning_rate: float,
    seed: int,
    split: Split | None = None,
) -> nn.Module:
    """Fit ``network`` on ``split`` (default: the whole model-train split)."""
    split = load_split("model_train") if split is None else split
    images = torch.from_numpy(split.images.copy())
    labels = torch.from_numpy(split.labels.copy())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), 128):
            batch = order[start : start + 128]
            batch_images = images[batch]
            # Horizontal flips: clothes are left-right symmetric, labels are not affected.
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch_images[flip] = batch_images[flip].flip(-1)
            optimizer.zero_grad()
            loss = loss_fn(network(batch_images), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        schedule.step()
        _log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, total / len(order))
    return network.eval()


def export_onnx(network: nn.Module) -> bytes:
    buffer = io.BytesIO()
    example = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    torch.onnx.export(
        network,
        (example,),
        buffer,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    return buffer.getvalue()


def model_card(
    manifest: ModelManifest, parameters: int, size: int, sha256: str, command: str
) -> str:
    metrics = manifest.metrics
    return f"""# Model card: {manifest.name} v{manifest.version}

{manifest.provenance["description"]}.

| | |
| --- | --- |
| task | Fashion-MNIST classification, 10 classes |
| data | Debian `dataset-fashion-mnist`, `model_train` split \
({SPLIT_SIZES["model_train"]:,} images, split seed {SPLIT_SEED}) |
| test accuracy | {metrics["test_accuracy"] * 100:.2f} % on the 10,000-image t10k split \
(never used to fit or tune) |
| latency | {metrics["latency_us_batch1_median"]:.1f} µs per image, onnxruntime CPU, \
batch 1, 1 thread (median of 7 x 200 runs) |
| parameters | {parameters:,} |
| size | {size:,} bytes |
| sha256 (model.onnx) | `{sha256}` |
| input | `image` UINT8 [n,1,28,28], pixels 0..255; scaling and normalisation inside the graph |
| output | `logits` FP32 [n,10] |
| format | ONNX opset {OPSET}, dynamic batch |

Rebuild: `{command}` (torch {torch.__version__}, {platform.machine()}). Retraining on other
hardware may differ in the last digits; the test suite checks the committed artifact.
"""


def build(model: str, store: Path, version: int, seed: int) -> Path:
    name, factory, epochs, learning_rate, description = RECIPES[model]
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    network = factory()
    parameters = sum(p.numel() for p in network.parameters())
    started = time.perf_counter()
    train(network, epochs, learning_rate, seed)
    training_s = time.perf_counter() - started
    onnx_bytes = export_onnx(network)
    # One thread: the edge node's setting, and the least noisy on a shared CPU.
    evaluation = evaluate(onnx_bytes, "image", "logits", threads=1)
    accuracy, latency_us = evaluation.accuracy, evaluation.latency_us_median
    command = f"python -m workload.train_fashion --model {model} --version {version} --seed {seed}"
    manifest = ModelManifest(
        name=name,
        version=version,
        task="classification",
        model_file="model.onnx",
        files=(),
        inputs=(TensorEntry("image", "UINT8", (-1, 1, 28, 28)),),
        outputs=(TensorEntry("logits", "FP32", (-1, 10)),),
        labels=LABELS,
        output_kind="logits",
        max_batch_size=MAX_BATCH_SIZE,
        preprocessing="uint8 pixels 0..255; /255 and (x-0.2860)/0.3530 inside the graph",
        metrics={
            "test_accuracy": round(accuracy, 4),
            "test_split": "t10k (10,000)",
            "latency_us_batch1_median": round(latency_us, 1),
            "parameters": parameters,
        },
        provenance={
            "description": description,
            "command": command,
            "seed": seed,
            "epochs": epochs,
            "training_seconds": round(training_s, 1),
            "torch": torch.__version__,
        },
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    card = model_card(manifest, parameters, len(onnx_bytes), sha, command)
    version_dir = write_version(
        store, manifest, {"model.onnx": onnx_bytes, "MODEL_CARD.md": card.encode()}
    )
    _log.info(
        "%s v%d: accuracy %.4f, %.1f us, %d params, %.0f s",
        name,
        version,
        accuracy,
        latency_us,
        parameters,
        training_s,
    )
    return version_dir


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(RECIPES), required=True)
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    arguments = parser.parse_args()
    build(arguments.model, arguments.store, arguments.version, arguments.seed)


if __name__ == "__main__":
    main()
