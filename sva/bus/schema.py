"""The bus's JSON Schemas (draft 2020-12), shipped as package data in sva/bus/schema/.

    event.json      the envelope; refers to the payload schema of each event type
    alert.json      OCSF Detection Finding + unmapped.sva
    health.json  sigs.json  heartbeat.json
    replay.json     replay protocol messages ($defs: request, end, error)

`validate_event(obj)` checks one decoded event against them (needs the `jsonschema`
package, a test dependency; the publisher does not validate at run time).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from sva.errors import BusError

SCHEMA_NAMES = ("event", "alert", "health", "sigs", "heartbeat", "replay")
BASE_URI = "https://sva.invalid/schema/bus/1/"


def schema_text(name: str) -> str:
    """The text of one schema file, by name (`alert`) or file name (`alert.json`)."""
    stem = name.removesuffix(".json")
    if stem not in SCHEMA_NAMES:
        raise BusError(f"no bus schema {name!r} (one of {', '.join(SCHEMA_NAMES)})")
    return resources.files("sva.bus").joinpath("schema", f"{stem}.json").read_text(encoding="utf-8")


@cache
def load_schemas() -> dict[str, dict[str, Any]]:
    return {name: json.loads(schema_text(name)) for name in SCHEMA_NAMES}


@cache
def _validator(name: str) -> Any:
    try:
        import jsonschema
        from referencing import Registry, Resource
    except ImportError:
        raise BusError("validating events needs the jsonschema package (pip install jsonschema)") from None
    schemas = load_schemas()
    registry: Registry[Any] = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas.values()
    )
    cls = jsonschema.validators.validator_for(schemas[name])
    return cls(schemas[name], registry=registry, format_checker=cls.FORMAT_CHECKER)


def validate(obj: Any, name: str = "event") -> None:
    """BusError naming the first failing path if `obj` does not match schema `name`."""
    v = _validator(name)
    errors = sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise BusError(f"event does not match the {name} schema at {where}: {e.message}")


def validate_event(obj: Any) -> None:
    """Validate a decoded event envelope (a dict) including its payload."""
    validate(obj, "event")
