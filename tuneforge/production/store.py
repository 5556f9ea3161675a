"""Production tables in the registry database: request log, user feedback, human review queue.

They live beside the registry's tables (same SQLAlchemy ``Base``, same URL) so one database
holds which version served a request, what the user said about it and what a reviewer
decided, and `tuneforge improve` can trace a new version back to the feedback rows that
made it. Prompts and responses are stored after PII redaction when the server enables it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from tuneforge.registry.store import Base, _now


class RequestLog(Base):
    __tablename__ = "request_logs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response id, e.g. chatcmpl-...
    at: Mapped[datetime] = mapped_column(DateTime, default=_now, index=True)
    endpoint: Mapped[str] = mapped_column(String(20))  # chat | completion
    model: Mapped[str] = mapped_column(String(200))  # as requested
    route: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    version: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)  # e.g. support-bot:v2
    arm: Mapped[str | None] = mapped_column(String(100), nullable=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[int] = mapped_column(Integer, default=200)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(20), nullable=True)
    fallback_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    json_requested: Mapped[bool] = mapped_column(Boolean, default=False)  # response_format json
    messages: Mapped[list | None] = mapped_column(JSON, nullable=True)  # chat input, redacted
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)  # completion input / rendered text, redacted
    response: Mapped[str | None] = mapped_column(Text, nullable=True)  # redacted
    redactions: Mapped[int] = mapped_column(Integer, default=0)  # PII spans replaced before storage


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("request_logs.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # normalised to [0, 1]
    thumbs: Mapped[str | None] = mapped_column(String(4), nullable=True)  # up | down
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ReviewItem(Base):
    """One logged request queued for a human. Nothing enters training data without a decision."""

    __tablename__ = "review_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("request_logs.id"), index=True, unique=True)
    reason: Mapped[str] = mapped_column(String(40))  # low_feedback | guard | fallback | drift | sample
    detail: Mapped[str] = mapped_column(Text, default="")
    queued_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    decision: Mapped[str | None] = mapped_column(String(10), nullable=True)  # accept | correct | reject
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)  # the right answer, for 'correct'
    reviewer: Mapped[str | None] = mapped_column(String(200), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    used_in: Mapped[str | None] = mapped_column(String(200), nullable=True)  # version trained on it (lineage)
