"""Prometheus text-format metrics (exposition format 0.0.4) over HTTP: `GET /metrics`.

A small writer of our own rather than prometheus_client: the daemon has a dozen series,
all of them counters and gauges it already keeps, and the format is a few lines of text
(no new dependency on the appliance image for that). Values are kept in one lock-guarded
dict; gauges computed at scrape time come from collector callables.
"""

from __future__ import annotations

import enum
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sva.errors import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


class MetricType(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class MetricFamily:
    name: str
    type: MetricType
    help: str


class Metrics:
    """Thread-safe counters and gauges by (family, labels), rendered as exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, MetricFamily] = {}
        self._values: dict[str, dict[Labels, float]] = {}
        self._collectors: list[Callable[[], Iterable[tuple[str, dict[str, str], float]]]] = []

    def family(self, name: str, type: MetricType, help: str) -> None:
        with self._lock:
            self._families.setdefault(name, MetricFamily(name, type, help))
            self._values.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = float(value)

    def remove(self, **labels: str) -> None:
        """Drop every series carrying these labels (a target removed from the config)."""
        want = set(labels.items())
        with self._lock:
            for series in self._values.values():
                for key in [k for k in series if want <= set(k)]:
                    del series[key]

    def collector(self, fn: Callable[[], Iterable[tuple[str, dict[str, str], float]]]) -> None:
        """`fn()` yields (family, labels, value) at each scrape (gauges read live)."""
        self._collectors.append(fn)

    def render(self) -> str:
        extra: dict[str, dict[Labels, float]] = {}
        for fn in self._collectors:
            try:
                for name, labels, value in fn():
                    extra.setdefault(name, {})[_labels(labels)] = float(value)
            except Exception as e:  # noqa: BLE001 - one broken collector must not break the scrape
                log.warning("metrics collector %r failed: %s", fn, e)
        out: list[str] = []
        with self._lock:
            for name, fam in sorted(self._families.items()):
                series = {**self._values.get(name, {}), **extra.get(name, {})}
                out.append(f"# HELP {name} {_escape_help(fam.help)}")
                out.append(f"# TYPE {name} {fam.type.value}")
                for key, value in sorted(series.items()):
                    out.append(f"{name}{_render_labels(key)} {_number(value)}")
        return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _render_labels(key: Labels) -> str:
    if not key:
        return ""
    inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in key)
    return "{" + inner + "}"


def _escape_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


class MetricsServer:
    """`GET /metrics` on (address, port) in a thread; port 0 picks a free one (`port`)."""

    def __init__(self, metrics: Metrics, address: str, port: int) -> None:
        registry = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would flood the log

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET

        try:
            self._server = Server((address, port), Handler)
        except OSError as e:
            raise ConfigError(f"metrics: cannot listen on {address}:{port}: {e.strerror or e}") from None
        self._server.daemon_threads = True
        self.address = address
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sva-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
