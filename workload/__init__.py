"""The workload: Fashion-MNIST data, model training, the model store, Triton repositories."""
