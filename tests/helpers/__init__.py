"""Shared test code (no tests here); fixtures are registered in ``tests/conftest.py``.

- ``waiting``: ``eventually``, the one wait-until (polls a sync or async condition).
- ``requests``: request builders for the router, the edge node and the cloud service.
- ``paths``: the repository, the committed model store, the committed router policy.
- ``router_node``: a router's settings for tests (own outbox and audit log per router).
- ``edge_node`` / ``cloud_service`` / ``triton`` / ``local_mesh``: real servers in process
  on port 0 (edge node, cloud service with toy Triton models, Triton, the whole mesh).
- ``scripted_tiers``: scripted edge and cloud gRPC servers (answer, fail, hang on command)
  and a health-only cloud.
- ``kernel_servicer``: the EdgeService servicer the kernel (``services/``) tests drive.
- ``credentials``: control-plane tokens and token-presenting channels.
- ``ota_site``: a registry and a site's store, edge model versions, the golden set.
- ``otlp_receiver``: a real OTLP/HTTP trace receiver.
- ``outbox_examples``: outbox items and reconciled examples.
- ``decision_invariants``: the decision invariants checked on one answer.
- ``digits_pair``: the second model pair (scikit-learn digits).
- ``item_difficulty``: easy and hard Fashion-MNIST items under the committed models.
- ``breaker``: a fake clock and one call through a circuit breaker.
- ``kustomize``: building a kustomize overlay with kubectl.
- ``photos``: a photograph with a face.
- ``processes``: process-group inspection from /proc.
"""
