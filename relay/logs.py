"""The relay's logs: one JSON object per line on stderr.

Every line has ``ts`` (UTC, ISO 8601 with ms), ``level``, ``logger`` and ``msg``. A
line written while serving a connection has ``conn``, the connection's correlation
id (also in that connection's own log lines about opening and closing), so an
operator can follow one agent's session through the log; a line about an event has
``event``, the event id in hex. Extra fields a call passes with ``extra=`` are kept.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import IO, Any

CONNECTION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "formicary_connection", default=None
)
"""The correlation id of the connection being served (trio tasks inherit it)."""

LEVELS = ("debug", "info", "warning", "error")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        line: dict[str, Any] = {
            "ts": f"{stamp}.{int(seconds % 1 * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        connection = CONNECTION.get()
        if connection is not None:
            line["conn"] = connection
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send the ``formicary`` loggers' lines at ``level`` and above to ``stream``
    (stderr), as JSON. Called once by ``formicary relay serve``."""
    if level not in LEVELS:
        raise ValueError(f"--log-level {level!r}: one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # websockets logs a failed connection handler with its traceback: as JSON too.
    for name, at in (("formicary", level.upper()), ("websockets", "WARNING")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(at)
        logger.propagate = False


def about(event_id: bytes) -> dict[str, str]:
    """``extra=`` for a line about an event."""
    return {"event": event_id.hex()}
