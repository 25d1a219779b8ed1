"""Offline training: the router's escalation policy (fit, calibrate, retrain with the
outbox's reconciled examples). Never imported by a service; needs scikit-learn/skl2onnx."""
