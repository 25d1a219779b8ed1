"""Easy and hard Fashion-MNIST items under the committed models and router policy (both
models run here in onnxruntime, as in Triton)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from router_service.escalation import EscalationClassifier, latest_policy
from router_service.features import router_features
from services.classification import softmax
from services.views import apply_view
from tests.helpers.paths import POLICY_ROOT, STORE


def easy_and_hard(images: npt.NDArray[np.uint8], count: int) -> tuple[list[int], list[int]]:
    """Indices of the items the committed policy scores lowest and highest."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(STORE / "fashion-edge" / "1" / "model.onnx"))

    def probabilities(inputs: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        (logits,) = session.run(["logits"], {"image": inputs})
        return softmax(np.asarray(logits))

    classifier = EscalationClassifier(latest_policy(POLICY_ROOT))
    # The edge's outputs on the policy's test-time views, as the router asks for them.
    views = {view: probabilities(apply_view(view, images)) for view in classifier.metadata.views}
    scores = classifier.score(router_features(probabilities(images), images, views))
    order = np.argsort(scores)
    return order[:count].tolist(), order[-count:].tolist()


def hard_by_agreement(
    images: npt.NDArray[np.uint8], hard: list[int]
) -> tuple[list[int], list[int]]:
    """Split hard items into those where the cloud model corrects the edge model's top-1
    and those where both agree (both models run here in onnxruntime, as in Triton)."""
    import onnxruntime as ort

    top1 = {}
    for name in ("fashion-edge", "fashion-cloud"):
        session = ort.InferenceSession(str(STORE / name / "1" / "model.onnx"))
        (logits,) = session.run(["logits"], {"image": images[hard]})
        top1[name] = np.asarray(logits).argmax(axis=1)
    differ = top1["fashion-edge"] != top1["fashion-cloud"]
    return [i for i, d in zip(hard, differ, strict=True) if d], [
        i for i, d in zip(hard, differ, strict=True) if not d
    ]
