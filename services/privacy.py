"""Privacy names every tier agrees on.

The anonymisers run at the edge site (``router_service.anonymisers``); the cloud only
checks that the one a request names exists, so a request cannot claim an anonymiser
that never ran. A new anonymiser is added here and there (a test keeps them equal).
"""

from __future__ import annotations

ANONYMISER_NAMES: frozenset[str] = frozenset({"strip-attributes", "face-blur"})
