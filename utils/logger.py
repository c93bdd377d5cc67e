"""Per-app log files: api.log (one JSON line per request) and errors.log (tracebacks).

Loggers get a name unique to the app that built them, so two apps in one test process write to
their own LOG_DIRs and never share handlers.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path

_app_numbers = itertools.count(1)


class JsonLineFormatter(logging.Formatter):
    """Formats a record's `fields` (or its message) as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname}
        line.update(getattr(record, "fields", None) or {"message": record.getMessage()})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


@dataclass
class AppLoggers:
    access: logging.Logger
    errors: logging.Logger

    def close(self) -> None:
        """Close the log files (tests build many apps; each must let its files go)."""
        for logger in (self.access, self.errors):
            for handler in list(logger.handlers):
                handler.close()
                logger.removeHandler(handler)


def configure_logging(log_dir: str, max_bytes: int, backup_count: int) -> AppLoggers:
    """Create LOG_DIR and this app's rotating api.log / errors.log loggers."""
    directory = Path(log_dir)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"llm_backend.app{next(_app_numbers)}"

    def build(name: str, filename: str, file_level: int) -> logging.Logger:
        logger = logging.getLogger(f"{prefix}.{name}")
        logger.setLevel(file_level)
        logger.propagate = name == "errors"
        handler = RotatingFileHandler(directory / filename, maxBytes=max_bytes,
                                      backupCount=backup_count, encoding="utf-8", delay=True)
        handler.setFormatter(JsonLineFormatter())
        logger.addHandler(handler)
        return logger

    return AppLoggers(access=build("access", "api.log", logging.INFO),
                      errors=build("errors", "errors.log", logging.WARNING))
