"""The ``hybridmesh.*`` span attribute names, in one place for every service.

Dashboards, trace queries and the tests read these names; a service sets an attribute
only through a constant here, so a name cannot drift between services.
"""

from __future__ import annotations

PREFIX = "hybridmesh."

# The request
REQUEST_ID = "hybridmesh.request_id"
PAIR = "hybridmesh.pair"
BATCH_SIZE = "hybridmesh.batch_size"
PRIVACY_CLASS = "hybridmesh.privacy_class"
DATA_LEFT_SITE = "hybridmesh.data_left_site"
# The caller left (cancelled or its deadline passed) while the request was routed.
CANCELLED = "hybridmesh.cancelled"
ATTEMPT = "hybridmesh.attempt"

# The model that ran
MODEL_NAME = "hybridmesh.model.name"
MODEL_VERSION = "hybridmesh.model.version"
EDGE_MODEL_VERSION = "hybridmesh.edge_model_version"
CLOUD_MODEL_VERSION = "hybridmesh.cloud_model_version"

# The router's decision
SERVED_BY = "hybridmesh.served_by"
REASON = "hybridmesh.reason"
ESCALATION_SCORE = "hybridmesh.escalation_score"
THRESHOLD = "hybridmesh.threshold"
POLICY_VERSION = "hybridmesh.policy_version"
DEGRADED = "hybridmesh.degraded"
QUEUED_FOR_RECONCILIATION = "hybridmesh.queued_for_reconciliation"
COST_MICROS = "hybridmesh.cost_micros"

# Where the time went
EDGE_COMPUTE_MS = "hybridmesh.edge.compute_ms"
EDGE_QUEUE_MS = "hybridmesh.edge.queue_ms"
TRITON_LATENCY_MS = "hybridmesh.triton.latency_ms"

# The cloud's dedupe cache answered a replayed request
DEDUPLICATED = "hybridmesh.deduplicated"
