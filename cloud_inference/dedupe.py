"""Answers by request id, so a replayed request (edge outbox reconciliation) costs Triton
nothing and gets the same answer: the cloud side of exactly-once reconciliation.

Keyed by request id; an entry holds a hash of the request's payload, so a reused id with
different data is never answered from the cache. Bounded (least recently stored goes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from hybridmesh.cloud.v1 import cloud_service_pb2


def payload_sha256(request: cloud_service_pb2.InferRequest) -> str:
    digest = hashlib.sha256(request.model.SerializeToString(deterministic=True))
    digest.update(request.top_k.to_bytes(4, "little"))
    for tensor in request.inputs:
        digest.update(tensor.SerializeToString(deterministic=True))
    return digest.hexdigest()


class AnswerCache:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[str, tuple[str, cloud_service_pb2.InferResponse]] = OrderedDict()

    def get(self, request_id: str, payload: str) -> cloud_service_pb2.InferResponse | None:
        found = self._answers.get(request_id)
        if found is None or found[0] != payload:
            return None
        return found[1]

    def put(self, request_id: str, payload: str, response: cloud_service_pb2.InferResponse) -> None:
        if self._capacity == 0 or not request_id:
            return
        self._answers[request_id] = (payload, response)
        self._answers.move_to_end(request_id)
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._answers)
