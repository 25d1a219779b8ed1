"""Outbox items and their reconciled results, and reconciled examples in a real outbox, as
the router and the reconciler write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from router_service.outbox import Outbox, OutboxItem, Priority, ReconciledItem
from services.tensors import encode_tensor


def reconcile_examples(  # noqa: PLR0917 (one example's facts)
    path: Path,
    pair: str,
    input_name: str,
    inputs: npt.NDArray[np.generic],
    edge: tuple[str, npt.NDArray[np.int64]],
    cloud: tuple[str, npt.NDArray[np.int64]],
) -> None:
    """Queue each item of ``inputs`` (its own dtype, batch 1) and reconcile it with the
    edge's and the cloud's classes; ``edge``/``cloud`` are ("model:version", classes)."""
    outbox = Outbox(path, max_items=max(len(inputs), 1))
    try:
        for index in range(len(inputs)):
            request_id = f"r-{index}"
            tensor = encode_tensor(input_name, inputs[index : index + 1]).SerializeToString()
            edge_class, cloud_class = int(edge[1][index]), int(cloud[1][index])
            outbox.put(
                OutboxItem(
                    request_id, Priority.ESCALATION, pair, 1, 1, (0,), (edge_class,),
                    edge[0], tensor,
                )
            )  # fmt: skip
            outbox.complete(
                request_id,
                [
                    ReconciledItem(
                        request_id, 0, pair, 0.0, 0.0, edge[0], edge_class, cloud[0],
                        cloud_class, tensor,
                    )
                ],
            )  # fmt: skip
    finally:
        outbox.close()


def item(request_id: str, priority: Priority = Priority.ESCALATION) -> OutboxItem:
    return OutboxItem(
        request_id=request_id,
        priority=priority,
        pair="fashion-mnist",
        privacy_class=1,
        top_k=1,
        item_indices=(0, 2),
        edge_classes=(3, 4),
        edge_model="fashion-edge:1",
        inputs=b"tensor-bytes",
    )


def results(request_id: str, now: float, cloud: tuple[int, int] = (3, 5)) -> list[ReconciledItem]:
    return [
        ReconciledItem(request_id, index, "fashion-mnist", 1.0, now, "e:1", edge, "c:1", c, b"x")
        for index, edge, c in zip((0, 2), (3, 4), cloud, strict=True)
    ]
