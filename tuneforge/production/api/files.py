"""/v1/files: JSONL uploads for fine-tuning, validated by the data stage before they are kept.

An upload is streamed to a temp file (413 past ``jobs.max_file_mb``), read by the data
stage's loader (the same row formats and per-row checks as `tuneforge train`), and kept
only if every line is a usable row; otherwise 400 names each bad line and field. Files
are renamed into place (atomic) and then recorded in one transaction; if the record
cannot be written the file is removed again, so the folder and the database agree.

OpenAI's preference rows ({input: {messages}, preferred_output, non_preferred_output})
are converted to tuneforge's (prompt, chosen, rejected) into a sibling file that training
reads; the upload itself is kept byte for byte (GET .../content returns it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from tuneforge.data.load import DataError, load_rows
from tuneforge.io import atomic_write_text
from tuneforge.production.api.job_queue import JobDB
from tuneforge.production.config import JobsConfig, jobs_home
from tuneforge.production.http import MAX_JSON_DEPTH, ApiError, Authenticate, page, too_deep, visible, whole_number
from tuneforge.registry.store import KeyInfo
from tuneforge.registry.tables import FileRow, JobRow

# Data-stage field names -> the names in an OpenAI preference upload (for error messages).
_PREF_FIELDS = {"prompt": "input.messages", "chosen": "preferred_output", "rejected": "non_preferred_output"}


class FileInvalid(ValueError):
    pass


@dataclass
class Checked:
    kind: str  # sft | preference
    format: str
    rows: int
    converted: str | None  # JSONL text for training when the upload needed conversion


def _from_openai_preference(line: str) -> str:
    """One OpenAI preference line as a tuneforge preference line (others unchanged).
    Lines stay one per line so the data stage's line numbers are the upload's."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(row, dict) or not any(k in row for k in ("preferred_output", "non_preferred_output")):
        return line
    inp = row.get("input")
    return json.dumps({"prompt": inp.get("messages") if isinstance(inp, dict) else inp,
                       "chosen": row.get("preferred_output"), "rejected": row.get("non_preferred_output")})


def check_jsonl(path: Path, filename: str, max_errors: int = 10) -> Checked:
    """Every line must be a chat (sft) or preference row; else FileInvalid naming lines and fields."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise FileInvalid(f"{filename}: line {line} is not UTF-8 "
                          f"(byte {raw[e.start]:#x}); re-encode the file as UTF-8") from None
    lines = text.split("\n")
    deep = [str(i) for i, line in enumerate(lines, 1) if too_deep(line)]
    if deep:  # before any parser sees them: Python's JSON parser recurses and would crash on them
        shown = ", ".join(deep[:max_errors]) + (" ..." if len(deep) > max_errors else "")
        raise FileInvalid(f"{filename}: line(s) {shown} nest deeper than {MAX_JSON_DEPTH} levels; "
                          "a chat or preference row nests a few")
    converted = [_from_openai_preference(line) for line in lines]
    is_pref = converted != lines
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "upload.jsonl"
        probe.write_text("\n".join(converted))
        try:
            rows, report = load_rows([str(probe)])
        except DataError as e:
            raise FileInvalid(_rename(str(e), str(probe), filename, is_pref)) from None
    if report.kind not in ("sft", "preference"):
        raise FileInvalid(f"{filename} holds {report.kind} rows ({report.format}); fine-tuning jobs take chat rows "
                          "({messages: [...]}) or preference rows ({input, preferred_output, non_preferred_output})")
    if report.dropped:
        bad = sum(report.dropped.values())
        shown = [ex for exs in report.examples.values() for ex in exs][:max_errors]
        details = "; ".join(_rename(ex, str(probe), filename, is_pref) for ex in shown)
        raise FileInvalid(f"{filename}: {bad} of {report.read} lines are invalid (format {report.format}): {details}"
                          + (" ..." if bad > len(shown) else ""))
    return Checked(report.kind, report.format, len(rows), "\n".join(converted) if is_pref else None)


def _rename(message: str, probe: str, filename: str, is_pref: bool) -> str:
    """'/tmp/x/upload.jsonl:3: field 'chosen'...' -> 'line 3: field 'preferred_output'...'."""
    message = re.sub(re.escape(probe) + r":(\d+):", r"line \1:", message).replace(probe, filename)
    if is_pref:
        message = re.sub(r"field '(prompt|chosen|rejected)", lambda m: f"field '{_PREF_FIELDS[m.group(1)]}", message)
    return message


def file_object(f: FileRow) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


def files_router(db: JobDB, cfg: JobsConfig, authenticate: Authenticate) -> APIRouter:
    router = APIRouter()
    run = db.run_or_503
    store = Uploads(jobs_home(cfg) / "files", cfg.max_file_mb, run)

    def get(file_id: str, key: KeyInfo | None) -> FileRow:
        f = run(lambda s: s.get(FileRow, file_id))
        if f is None or f.deleted or not visible(f, key):
            raise ApiError(404, f"no file with id '{file_id}'", "invalid_request_error")
        return f

    @router.post("/v1/files")
    async def upload(request: Request):
        key = authenticate(request)
        form = await store.read_form(request)
        try:
            return file_object(await store.add(form, key))
        finally:
            await form.close()  # the spooled upload's temp file goes now, not at garbage collection

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                         order: str = "desc"):
        key = authenticate(request)

        def q(s):
            stmt = select(FileRow).where(FileRow.deleted.is_(False))
            if key is not None:
                stmt = stmt.where(FileRow.key_id == key.id)
            if purpose:
                stmt = stmt.where(FileRow.purpose == purpose)
            return list(s.scalars(stmt.order_by(FileRow.created_at, FileRow.id)))

        rows, more = page(run(q), after, limit, reverse=order != "asc")
        return {"object": "list", "data": [file_object(f) for f in rows], "has_more": more,
                "first_id": rows[0].id if rows else None, "last_id": rows[-1].id if rows else None}

    @router.get("/v1/files/{file_id}")
    async def retrieve(request: Request, file_id: str):
        return file_object(get(file_id, authenticate(request)))

    @router.get("/v1/files/{file_id}/content")
    async def content(request: Request, file_id: str):
        f = get(file_id, authenticate(request))
        return Response(Path(f.path).read_bytes(), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete(request: Request, file_id: str):
        key = authenticate(request)
        f = run(lambda s: _mark_deleted(s, file_id, key))
        # Rows of finished jobs keep pointing at the id (lineage); the bytes go.
        for p in {f.path, f.train_path}:
            Path(p).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    return router


def _mark_deleted(s, file_id: str, key: KeyInfo | None) -> FileRow:
    f = s.get(FileRow, file_id)
    if f is None or f.deleted or not visible(f, key):
        raise ApiError(404, f"no file with id '{file_id}'", "invalid_request_error")
    users = s.scalars(select(JobRow.id).where(
        (JobRow.training_file == file_id) | (JobRow.validation_file == file_id),
        JobRow.status.in_(("queued", "running")))).all()
    if users:  # deleting it would fail those jobs later: refuse now, with the way out
        raise ApiError(409, f"file {file_id} is used by job(s) {', '.join(users)} that have not finished; "
                            "cancel them or wait")
    f.deleted = True
    return f


FORM_OVERHEAD = 65536  # room for the multipart headers and the 'purpose' field beside the file


class Uploads:
    """The files folder: an upload is streamed, checked and renamed into place, then recorded."""

    def __init__(self, root: Path, max_file_mb: float, run):
        self.root, self.run = root, run
        self.limit = int(max_file_mb * 1024 * 1024)
        self.too_large = f"the upload is larger than the {max_file_mb:g} MB limit (jobs.max_file_mb)"

    async def read_form(self, request: Request) -> FormData:
        """The multipart form, read as it arrives and abandoned (413) once the body passes the
        limit plus room for the form's headers: a Content-Length over it is refused before a
        byte is read, and a chunked body stops at the limit; the parser's spooled temp file of
        the partial upload is closed (deleted) on the way out."""
        declared = whole_number(request.headers.get("content-length", "").strip())
        if declared is not None and declared > self.limit + FORM_OVERHEAD:
            raise ApiError(413, self.too_large)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(400, "the request is not multipart/form-data with 'file' and 'purpose'")

        async def bounded():
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > self.limit + FORM_OVERHEAD:
                    raise ApiError(413, self.too_large)
                yield chunk

        try:
            return await MultiPartParser(request.headers, bounded()).parse()
        except MultiPartException as e:
            raise ApiError(400, f"the request is not multipart/form-data with 'file' and 'purpose' ({e.message})"
                           ) from None

    async def add(self, form, key: KeyInfo | None) -> FileRow:
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose must be 'fine-tune' (got {purpose!r}); this server stores fine-tuning "
                                "files only")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "'file' must be an uploaded file (multipart form field 'file')")
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        name = upload.filename or "upload.jsonl"
        path, train_path, size, checked = await self._keep(upload, file_id, name)
        row = FileRow(id=file_id, created_at=int(time.time()), filename=name, purpose="fine-tune", bytes=size,
                      path=str(path), train_path=str(train_path), kind=checked.kind, format=checked.format,
                      rows=checked.rows, key_id=key.id if key else None)
        try:
            self.run(lambda s: s.add(row))
        except BaseException:
            path.unlink(missing_ok=True)
            train_path.unlink(missing_ok=True)
            raise
        return row

    async def _keep(self, upload, file_id: str, name: str) -> tuple[Path, Path, int, Checked]:
        """Stream to a temp file (413 past the limit), check it, rename it into place; nothing
        is left behind when any of it fails."""
        fd, tmp = tempfile.mkstemp(prefix=f".{file_id}.", suffix=".jsonl", dir=self.root)
        size, train_path = 0, None
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > self.limit:
                        raise ApiError(413, self.too_large)
                    out.write(chunk)
            try:
                # In a thread: a large file takes seconds to check, and chat requests must not wait on it.
                checked = await asyncio.to_thread(check_jsonl, Path(tmp), name)
            except FileInvalid as e:
                raise ApiError(400, str(e)) from None
            path = self.root / f"{file_id}.jsonl"
            if checked.converted is not None:
                train_path = self.root / f"{file_id}.train.jsonl"
                atomic_write_text(train_path, checked.converted)
            os.replace(tmp, path)
        except BaseException:
            for p in (Path(tmp), train_path):
                if p is not None:
                    p.unlink(missing_ok=True)
            raise
        return path, train_path or path, size, checked
