"""The cloud service's admission control is the shared kernel's (services.admission):
bounded calls to Triton, a bounded wait queue, no wait past the caller's budget."""

from __future__ import annotations

from services.admission import Admission as _SharedAdmission

TRITON = "Triton"


class Admission(_SharedAdmission):
    """Admission to Triton (the signature cloud_inference.app constructs)."""

    def __init__(self, max_in_flight: int, max_queued: int, retry_after_ms: int) -> None:
        super().__init__(max_in_flight, max_queued, retry_after_ms, resource=TRITON)
