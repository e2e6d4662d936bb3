"""Structured logs on stdout: one JSON object per line (journald keeps stdout of a service;
`journalctl -u sva -o cat | jq` reads them back), or plain text for a terminal.

Each line has time, level, logger, message and the `event` fields the daemon attached
(`log.info("...", extra={"event": {"vm": "web01", "reason": "reattached"}})`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from sva.daemon.config import LogFormat, LogLevel


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            doc.update({k: v for k, v in event.items() if k not in doc})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        event = getattr(record, "event", None)
        if isinstance(event, dict) and event:
            text += " " + " ".join(f"{k}={v}" for k, v in event.items())
        return text


def setup(fmt: LogFormat, level: LogLevel, stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to stdout in `fmt`; returns the handler (to replace on reload)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_sva_daemon", False):
            root.removeHandler(h)
    handler._sva_daemon = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.value.upper()))
    return handler
