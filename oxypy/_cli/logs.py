"""The command's log lines: a stderr handler on the ``oxypy`` logger, text or JSON.

The library configures no logging; the ``oxypy`` command installs one handler
on the ``oxypy`` logger (unless the process configured logging already) at
``--log-level`` (WARNING by default), formatting each record as one text line
or, with ``--log-format json``, as one JSON object per line: ``time`` (UTC,
ISO 8601), ``level``, ``logger``, ``message`` and every extra the record
carries (``logger.info(..., extra={"upstream": url})``), plus ``exception``
(the traceback, as one string) when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

__all__ = ["JSONFormatter", "TEXT_FORMAT", "configure"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has: anything else was passed as ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: str = "warning", fmt: str = "text") -> None:
    """Give the ``oxypy`` logger a stderr handler unless logging is configured."""
    package = logging.getLogger("oxypy")
    configured = logging.getLogger().handlers or any(
        not isinstance(h, logging.NullHandler) for h in package.handlers
    )
    if configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    package.addHandler(handler)
    if package.level == logging.NOTSET or level != "warning":
        package.setLevel(level.upper())
