"""Finding detectors: the explicit default list, the `detectors` package, entry points.

- `detectors.DEFAULT_DETECTORS` is the ordered list the engine runs by default
  (mitmproxy's default addons): module names in the `detectors` package.
- Any module of the `detectors` package that sets `DETECTOR` can be enabled by name.
- Third parties publish detectors under the entry-point group `sva.detectors`; the entry
  point names a module exposing `DETECTOR`, a detector object, or a class to instantiate.

Loading a named detector that is broken is a start-up error (`DetectorError`);
`discover()` instead lists every candidate with its problem, so one broken plug-in does
not hide the others.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sva.engine.detector import Detector, check_detector
from sva.errors import DetectorError

DETECTOR_PACKAGE = "detectors"
ENTRY_POINT_GROUP = "sva.detectors"


def _as_detector(obj: Any, source: str) -> Detector:
    if isinstance(obj, types.ModuleType):
        if not hasattr(obj, "DETECTOR"):
            raise DetectorError(source, f"module {obj.__name__} does not set DETECTOR")
        obj = obj.DETECTOR
    elif isinstance(obj, type):
        obj = obj()
    return check_detector(obj, source)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import(module: str, source: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except DetectorError:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is this detector's problem
        raise DetectorError(source, f"cannot import {module}: {type(e).__name__}: {e}") from e


def load_detector(name: str) -> Detector:
    """A detector by name: `process_policy` (module of the detectors package, else an
    entry point of that name) or `package.module` (any importable module with DETECTOR)."""
    if "." in name:
        return _as_detector(_import(name, name), name)
    module = f"{DETECTOR_PACKAGE}.{name}"
    try:
        return _as_detector(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise DetectorError(name, f"cannot import {module}: {e}") from e
    except DetectorError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DetectorError(name, f"cannot import {module}: {type(e).__name__}: {e}") from e
    ep = _entry_points().get(name)
    if ep is None:
        raise DetectorError(name, f"no module {module} and no '{ENTRY_POINT_GROUP}' entry point of that name")
    try:
        obj = ep.load()
    except Exception as e:  # noqa: BLE001
        raise DetectorError(name, f"entry point {ep.value}: {type(e).__name__}: {e}") from e
    return _as_detector(obj, name)


def load_detectors(names: Iterable[str]) -> list[Detector]:
    """Detectors by name, in the given order; DetectorError on a bad one or a repeated id."""
    out: list[Detector] = []
    ids: set[str] = set()
    for name in names:
        det = load_detector(name)
        if det.id in ids:
            raise DetectorError(det.id, f"enabled twice (as {name!r})")
        ids.add(det.id)
        out.append(det)
    return out


def default_detector_names() -> tuple[str, ...]:
    return tuple(importlib.import_module(DETECTOR_PACKAGE).DEFAULT_DETECTORS)


def default_detectors() -> list[Detector]:
    """The detectors of `detectors.DEFAULT_DETECTORS`, in that order."""
    return load_detectors(default_detector_names())


@dataclass(frozen=True)
class Discovered:
    """A detector found by `discover()`: loaded, or why it could not be."""

    name: str
    origin: str  # "package" or "entry point"
    default: bool
    detector: Detector | None = None
    error: str | None = None


def discover() -> list[Discovered]:
    """Every detector module of the package and every entry point: defaults first (in
    their order), then the rest by name. Never raises for a broken candidate."""
    package = importlib.import_module(DETECTOR_PACKAGE)
    defaults = list(default_detector_names())
    modules = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    names: list[tuple[str, str]] = [(n, "package") for n in defaults if n in modules]
    names += [(n, "package") for n in modules if n not in defaults]
    eps = _entry_points()
    names += [(n, "entry point") for n in sorted(eps) if n not in modules]
    out: list[Discovered] = []
    for name, origin in names:
        try:
            if origin == "package":
                module = _import(f"{DETECTOR_PACKAGE}.{name}", name)
                if not hasattr(module, "DETECTOR"):
                    continue  # a helper module, not a detector
                det = _as_detector(module, name)
            else:
                det = _as_detector(eps[name].load(), name)
        except Exception as e:  # noqa: BLE001 - report and go on to the next candidate
            reason = e.reason if isinstance(e, DetectorError) else f"{type(e).__name__}: {e}"
            out.append(Discovered(name, origin, name in defaults, error=reason))
            continue
        out.append(Discovered(name, origin, name in defaults, detector=det))
    return out
