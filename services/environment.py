"""Misspelt ``HYBRIDMESH_*`` environment variables: pydantic-settings ignores a variable no
setting reads, so a typo would silently leave the default in place. Every service and the
``hybridmesh`` CLI call :func:`unknown_variables` at start-up and warn about each one,
naming the nearest valid variable (``difflib``).

The valid names are those of every service's settings class (all services share one
environment in the local mesh and in a site's config maps), plus the few variables the
command-line tools read themselves.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_settings import BaseSettings

PREFIX = "HYBRIDMESH_"

# Every service's settings, as import paths: the kernel imports no service. A module
# missing from a slimmed image is skipped (nothing there reads its variables).
SETTINGS_CLASSES = (
    "router_service.config:RouterSettings",
    "edge_node.config:EdgeSettings",
    "cloud_inference.config:CloudSettings",
    "registry.config:RegistrySettings",
)

# Read by the command-line tools, the tests and tools/, not by a settings class.
TOOL_VARIABLES = frozenset(
    {
        "HYBRIDMESH_STATE_DIR",  # hybridmesh: the local mesh's state directory
        "HYBRIDMESH_TRITON_OTLP_HTTP_URL",  # hybridmesh up: Triton's OTLP/HTTP traces
        "HYBRIDMESH_OPERATOR_TOKEN_FILE",  # hybridmesh registry: the operator's credentials
        "HYBRIDMESH_OPERATOR_TLS_DIR",
        "HYBRIDMESH_OPERATOR_KEYS",
        "HYBRIDMESH_FUZZ_SEED",  # tests/test_fuzz.py
        "HYBRIDMESH_FUZZ_CASES",
        "HYBRIDMESH_SMOKE_MIRROR",  # tools/k8s_smoke.py
    }
)


@dataclass(frozen=True)
class UnknownVariable:
    """A ``HYBRIDMESH_*`` variable nothing reads; ``nearest`` is the closest valid name,
    or None when none is close."""

    name: str
    nearest: str | None

    def message(self) -> str:
        hint = f"did you mean {self.nearest}?" if self.nearest else "no setting has a similar name"
        return f"unknown environment variable {self.name} (ignored); {hint}"


def settings_variables(settings: type[BaseSettings]) -> set[str]:
    """The variables one settings class reads: ``<env_prefix><FIELD>``, and for a nested
    model (with ``env_nested_delimiter``) also ``<env_prefix><FIELD><delimiter><SUBFIELD>``."""
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    delimiter = settings.model_config.get("env_nested_delimiter") or ""
    names: set[str] = set()
    for field_name, field in settings.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        nested = field.annotation
        if delimiter and isinstance(nested, type) and issubclass(nested, BaseModel):
            names.update(f"{name}{delimiter}{sub.upper()}" for sub in nested.model_fields)
    return names


def known_variables(classes: Iterable[str] = SETTINGS_CLASSES) -> frozenset[str]:
    """Every valid ``HYBRIDMESH_*`` name: the settings classes' and the tools' own."""
    names = set(TOOL_VARIABLES)
    for path in classes:
        module_name, _, class_name = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        names |= settings_variables(getattr(module, class_name))
    return frozenset(names)


def unknown_variables(
    environ: Mapping[str, str], known: Iterable[str] | None = None
) -> list[UnknownVariable]:
    """The ``HYBRIDMESH_*`` variables of ``environ`` that no setting reads, sorted by name
    (compared upper-case, as pydantic-settings reads them case-insensitively)."""
    valid = set(known_variables() if known is None else known)
    # Compared without the shared prefix, which would make every name look close.
    tails = sorted(name.removeprefix(PREFIX) for name in valid)
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in valid:
            close = difflib.get_close_matches(upper.removeprefix(PREFIX), tails, n=1)
            unknown.append(UnknownVariable(name, PREFIX + close[0] if close else None))
    return unknown


def warn_unknown_variables(environ: Mapping[str, str], component: str) -> list[UnknownVariable]:
    """Log one warning per unknown ``HYBRIDMESH_*`` variable (a service's start-up, after
    ``configure_logging``); returns them."""
    from services.logging import get_logger

    unknown = unknown_variables(environ)
    log = get_logger(component)
    for variable in unknown:
        log.warning(
            "unknown environment variable",
            variable=variable.name,
            did_you_mean=variable.nearest,
            message=variable.message(),
        )
    return unknown
