"""The one request-id rule of every service: at most 128 characters of [A-Za-z0-9._:-].

An empty id is allowed (the router then makes one). The rule keeps ids safe to put in
logs, headers, span attributes and file names, and short enough to echo.
"""

from __future__ import annotations

import re

from services.errors import InvalidArgumentError

REQUEST_ID_MAX_CHARS = 128
# \Z, not $: "$" also matches before a trailing newline.
REQUEST_ID_PATTERN = re.compile(rf"^[A-Za-z0-9._:-]{{0,{REQUEST_ID_MAX_CHARS}}}\Z")
REQUEST_ID_RULE = f"at most {REQUEST_ID_MAX_CHARS} characters of [A-Za-z0-9._:-]"


def is_valid_request_id(request_id: str) -> bool:
    return REQUEST_ID_PATTERN.fullmatch(request_id) is not None


def check_request_id(request_id: str, field: str = "request_id") -> None:
    """INVALID_ARGUMENT naming ``field`` unless ``request_id`` follows the rule."""
    if not is_valid_request_id(request_id):
        raise InvalidArgumentError(REQUEST_ID_RULE, field=field)
