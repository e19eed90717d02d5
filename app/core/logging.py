"""Logging: plain or JSON lines; context (notification, Space, endpoint ids) travels in `extra`."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from app.core.settings import Settings

CONTEXT_FIELDS = ("notification_id", "space_id", "endpoint_id", "subscription_id", "account_id", "endpoint")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{f}={getattr(record, f)}" for f in CONTEXT_FIELDS if getattr(record, f, None) is not None]
        return f"{line} [{' '.join(extras)}]" if extras else line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("uvicorn.access", "aiosqlite", "apscheduler", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
