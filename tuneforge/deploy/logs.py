"""Server logs: one JSON object per line (python-json-logger), uvicorn's own loggers included,
so request ids, versions and fallback reasons can be searched by field."""

from __future__ import annotations

from pythonjsonlogger.core import RESERVED_ATTRS

FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def log_config(fmt: str = "json") -> dict:
    """A logging.config.dictConfig dict for uvicorn's ``log_config=`` (it applies it at start)."""
    formatter = ({"()": "pythonjsonlogger.json.JsonFormatter", "fmt": FIELDS,
                  "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
                  # uvicorn adds an ANSI-coloured copy of some messages: not for JSON
                  "reserved_attrs": [*RESERVED_ATTRS, "color_message"]}
                 if fmt == "json" else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "loggers": {
            "tuneforge": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
