"""Generate a Triton model repository from the model store.

Two flavours with identical model names and tensors: ``local`` for the CPU-only Triton
bundled in nvidia-pytriton (python backend running onnxruntime, see
workload/triton_python/model.py) and ``production`` for the Triton container
(``platform: "onnxruntime_onnx"``, GPU instances).
Usage: ``python -m workload.triton_repository --flavour local --out DIR [--models a,b]``.
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
from pathlib import Path

from workload.catalog import load_catalog
from workload.model_store import ModelManifest, latest_versions, load_verified

PYTHON_MODEL = Path(__file__).with_name("triton_python") / "model.py"
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
}
FLAVOURS = ("local", "production")


def _dims(shape: tuple[int, ...]) -> str:
    # max_batch_size > 0: Triton's dims leave out the batch dimension.
    return "[" + ", ".join(str(d) for d in shape[1:]) + "]"


def config_pbtxt(
    manifest: ModelManifest, flavour: str, *, dynamic_batching: bool, intra_op_threads: int
) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}")
    lines = [f'name: "{manifest.name}"']
    if flavour == "local":
        lines.append('backend: "python"')
    else:
        lines.append('platform: "onnxruntime_onnx"')
    lines.append(f"max_batch_size: {manifest.max_batch_size}")
    lines.append("version_policy: { latest: { num_versions: 1 } }")
    for kind, tensors in (("input", manifest.inputs), ("output", manifest.outputs)):
        lines.append(f"{kind} [")
        entries = []
        for tensor in tensors:
            label = ' label_filename: "labels.txt"' if kind == "output" else ""
            entries.append(
                f'  {{ name: "{tensor.name}" data_type: {TRITON_TYPES[tensor.datatype]} '
                f"dims: {_dims(tensor.shape)}{label} }}"
            )
        lines.append(",\n".join(entries))
        lines.append("]")
    if dynamic_batching:
        preferred = [size for size in (4, 8, 16, 32) if size <= manifest.max_batch_size]
        lines.append(
            f"dynamic_batching {{ preferred_batch_size: {preferred} "
            "max_queue_delay_microseconds: 200 }"
        )
    instance = "KIND_CPU" if flavour == "local" else "KIND_GPU"
    lines.append(f"instance_group [ {{ count: 1 kind: {instance} }} ]")
    if flavour == "local":
        lines.append(
            'parameters: { key: "intra_op_threads" value: '
            f'{{ string_value: "{intra_op_threads}" }} }}'
        )
        site_packages = sysconfig.get_paths()["purelib"]
        lines.append(
            'parameters: { key: "python_site_packages" value: '
            f'{{ string_value: "{site_packages}" }} }}'
        )
    return "\n".join(lines) + "\n"


def write_repository(
    store: Path,
    out: Path,
    flavour: str,
    models: list[str] | None = None,
    *,
    dynamic_batching: bool = True,
    intra_op_threads: int = 1,
) -> list[str]:
    """Write the repository; returns the model names written. Every model is verified."""
    written = []
    for version_dir in latest_versions(store):
        manifest = load_verified(version_dir)
        if models is not None and manifest.name not in models:
            continue
        model_dir = out / manifest.name
        target = model_dir / str(manifest.version)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(version_dir / manifest.model_file, target / "model.onnx")
        if flavour == "local":
            shutil.copyfile(PYTHON_MODEL, target / "model.py")
        (model_dir / "labels.txt").write_text("\n".join(manifest.labels) + "\n")
        (model_dir / "config.pbtxt").write_text(
            config_pbtxt(
                manifest,
                flavour,
                dynamic_batching=dynamic_batching,
                intra_op_threads=intra_op_threads,
            )
        )
        written.append(manifest.name)
    missing = sorted(set(models or ()) - set(written))
    if missing:
        raise ValueError(f"models not in the store {store}: {missing}")
    return written


def cloud_models(catalog: Path) -> list[str]:
    return sorted({pair.cloud_model for pair in load_catalog(catalog).values()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flavour", choices=FLAVOURS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=Path("models/store"))
    parser.add_argument("--catalog", type=Path, default=Path("models/catalog.toml"))
    parser.add_argument("--models", help="comma-separated; default: the catalog's cloud models")
    parser.add_argument("--no-dynamic-batching", action="store_true")
    parser.add_argument(
        "--intra-op-threads", type=int, default=1, help="local flavour: onnxruntime threads"
    )
    arguments = parser.parse_args()
    models = arguments.models.split(",") if arguments.models else cloud_models(arguments.catalog)
    write_repository(
        arguments.store,
        arguments.out,
        arguments.flavour,
        models,
        dynamic_batching=not arguments.no_dynamic_batching,
        intra_op_threads=arguments.intra_op_threads,
    )


if __name__ == "__main__":
    main()
