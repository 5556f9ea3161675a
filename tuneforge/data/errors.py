"""The error a format raises for one bad row: it names the field, so the load report can
count alike rows together and point at ``file:line field``."""

from __future__ import annotations


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"field '{field}': {reason}")
