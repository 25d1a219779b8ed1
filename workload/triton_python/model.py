"""Triton python-backend model running onnxruntime on the version's model.onnx.

Used by the local Triton (the CPU build bundled in nvidia-pytriton has no onnxruntime
backend). Dynamic batching hands ``execute`` several requests: they are run as one
session call and split back, which is what makes batching pay off.

The backend stub's interpreter does not honour PYTHONPATH, so the site-packages holding
numpy and onnxruntime come from the model's ``python_site_packages`` parameter, and
those imports happen only after it is on ``sys.path``.
"""

import json
import os
import sys
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        site_packages = parameters.get("python_site_packages", {}).get("string_value", "")
        if site_packages and site_packages not in sys.path:
            sys.path.insert(0, site_packages)
        import numpy  # imported here: needs the path above
        import onnxruntime

        self.numpy = numpy
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(parameters.get("intra_op_threads", {}).get("string_value", "1"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            os.path.join(version_dir, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        np = self.numpy
        feeds = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.input_names
        }
        sizes = [array.shape[0] for array in feeds[self.input_names[0]]]
        outputs = self.session.run(
            self.output_names, {name: np.concatenate(arrays) for name, arrays in feeds.items()}
        )
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[start : start + size]))
                for name, output in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
