"""cloud_inference: the cloud tier in front of NVIDIA Triton."""
