"""edge_node: runs small ONNX models with onnxruntime, in process, next to the data."""
