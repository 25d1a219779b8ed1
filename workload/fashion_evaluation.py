"""Test accuracy and batch-1 latency of a Fashion-MNIST ONNX model, with onnxruntime only.

The numbers on the model cards come from here (at training time) and can be re-measured
on any machine with the main venv:
``python -m workload.fashion_evaluation [--store models/store] [--threads 1]``.
Latency is the median over ``rounds`` of the mean of ``calls`` single-image runs, after a
warm-up, so one noisy moment on a shared CPU does not move it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from workload.fashion_mnist import load_split
from workload.model_store import ModelManifest, latest_versions, load_verified

FASHION_INPUT = ("UINT8", (-1, 1, 28, 28))


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    latency_us_median: float


def open_session(model: bytes | Path, threads: int = 1) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def accuracy_on_test_split(
    session: Any, input_name: str, output_name: str, batch: int = 500
) -> float:
    """Top-1 accuracy on the 10,000-image t10k split."""
    test = load_split("test")
    predictions = [
        np.asarray(
            session.run([output_name], {input_name: test.images[start : start + batch]})[0]
        ).argmax(axis=1)
        for start in range(0, len(test.labels), batch)
    ]
    return float((np.concatenate(predictions) == test.labels).mean())


def median_latency_us(
    session: Any,
    input_name: str,
    output_name: str,
    *,
    rounds: int = 7,
    calls: int = 200,
    warmup: int = 50,
) -> float:
    """Median (over rounds) per-call latency of one image, in microseconds."""
    single = load_split("test").images[:1]
    feed = {input_name: single}
    for _ in range(warmup):
        session.run([output_name], feed)
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            session.run([output_name], feed)
        timings.append((time.perf_counter() - started) / calls)
    return float(np.median(timings) * 1e6)


def evaluate(
    model: bytes | Path, input_name: str, output_name: str, threads: int = 1
) -> Evaluation:
    session = open_session(model, threads)
    return Evaluation(
        accuracy=accuracy_on_test_split(session, input_name, output_name),
        latency_us_median=median_latency_us(session, input_name, output_name),
    )


def evaluate_manifest(version_dir: Path, manifest: ModelManifest, threads: int = 1) -> Evaluation:
    return evaluate(
        version_dir / manifest.model_file,
        manifest.inputs[0].name,
        manifest.outputs[0].name,
        threads,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    sys.stdout.write("model | version | test accuracy (card) | latency µs, batch 1, median\n")
    for version_dir in latest_versions(arguments.store):
        manifest = load_verified(version_dir)
        spec = manifest.inputs[0]
        if (spec.datatype, spec.shape) != FASHION_INPUT:
            continue  # not a Fashion-MNIST model
        result = evaluate_manifest(version_dir, manifest, arguments.threads)
        card = manifest.metrics.get("test_accuracy", float("nan"))
        sys.stdout.write(
            f"{manifest.name} | {manifest.version} | {result.accuracy * 100:.2f} % "
            f"({card * 100:.2f} %) | {result.latency_us_median:.1f}\n"
        )


if __name__ == "__main__":
    main()
