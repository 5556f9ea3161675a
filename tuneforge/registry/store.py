"""The registry: an index over run folders (it never holds the only copy).

SQLite by default, any SQLAlchemy URL (e.g. postgresql+psycopg://...) otherwise. Models,
versions (run dir, adapter hash, eval scores), aliases and their history
(promote/rollback), API keys (hashed, scoped to models, revocable), route overrides (A/B
arms set at run time). Every write is one transaction: a failed promotion leaves no
half-moved alias behind. The tables are in tuneforge/registry/tables.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import Field
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from tuneforge.config import Strict
from tuneforge.registry.card import run_library, write_card
from tuneforge.registry.migrate import WRITE_LOCK, file_lock, upgrade
from tuneforge.registry.tables import Alias, AliasEvent, ApiKey, Model, RouteOverride, Version, utc_now
from tuneforge.runs import read_run


class RegistryError(ValueError):
    pass


class PromotionRefused(RegistryError):
    pass


def tuneforge_home() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge"))


def default_url() -> str:
    if os.environ.get("TUNEFORGE_REGISTRY"):
        return os.environ["TUNEFORGE_REGISTRY"]
    return f"sqlite:///{tuneforge_home() / 'registry.db'}"


class Arm(Strict):
    """One arm of an A/B route: serve.yaml's routes.NAME.arms and a route override's arms."""

    name: str
    target: str = Field(description="a registry reference: name, name:vN or name@alias")
    weight: float = Field(gt=0)


@dataclass(frozen=True)
class VersionInfo:
    name: str
    number: int
    run_dir: str
    base_model: str
    adapter_sha256: str
    scores: dict
    main_metric: str | None
    main_score: float | None
    created: datetime
    card: str | None = None  # the README.md model card `add` wrote; None where the folder keeps the user's

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.number}"


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    models: list
    requests_per_minute: int | None
    admin: bool = False
    reviewer: bool = False  # may review items of the models in ``models`` (keys create --reviewer)


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'name' | 'name:vN' | 'name@alias' -> (name, alias, version number)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if ":" in ref:
        name, v = ref.rsplit(":", 1)
        # ASCII digits only: str.isdigit() is true for 'v²', which int() then refuses
        if not re.fullmatch(r"v[0-9]{1,18}", v):
            raise RegistryError(f"'{ref}': a version is written name:vN, e.g. {name}:v2")
        return name, None, int(v[1:])
    return ref, None, None


def alias_stack(events: list[tuple[str, int]]) -> list[int]:
    """Replay (action, to_version) events into the stack of versions an alias went through.

    promote pushes; rollback pops. So rolling back twice walks two promotions back instead
    of bouncing between the last two versions.
    """
    stack: list[int] = []
    for action, to in events:
        if action == "rollback":
            stack.pop()
            if not stack or stack[-1] != to:
                raise RegistryError(f"alias history is inconsistent at rollback to v{to}")
        else:
            stack.append(to)
    return stack


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Registry:
    def __init__(self, url: str | None = None):
        url = url or default_url()
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url)
        upgrade(self.engine)  # alembic: creates a new database, brings an older one to the current schema

    @contextlib.contextmanager
    def _write(self):
        """A session in one transaction that no other writer (another CLI process, the server)
        runs beside. Writes read before they write (the next version number, the alias being
        replaced, its history) and two interleaved ones would number two versions alike or
        record a promotion from a version the alias no longer pointed at. Writes are rare and
        short, so one lock for the whole registry: a file lock beside a SQLite file, a
        transaction-scoped advisory lock on PostgreSQL."""
        with file_lock(self.engine, "write"), Session(self.engine) as s, s.begin():
            if self.engine.dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK})
            yield s

    # --- models and versions ---------------------------------------------------------------
    def add(self, run_dir: str | Path, name: str) -> VersionInfo:
        run = read_run(run_dir)
        with self._write() as s:
            model = s.scalar(select(Model).where(Model.name == name))
            if model is None:
                model = Model(name=name)
                s.add(model)
                s.flush()
            number = (s.scalar(select(Version.number).where(Version.model_id == model.id)
                               .order_by(Version.number.desc()).limit(1)) or 0) + 1
            v = Version(model_id=model.id, number=number, run_dir=str(run.run_dir), base_model=run.base_model,
                        adapter_sha256=run.adapter_sha256, scores=run.scores, main_metric=run.main_metric,
                        main_score=run.main_score)
            s.add(v)
            s.flush()
            info = self._info(name, v)
        # The version's model card lives in its run folder (the registry indexes folders).
        card = write_card(run.run_dir, run.run_dir, title=info.ref, library=run_library(run.run_dir),
                          command=f"tuneforge train {run.run_dir / 'config.yaml'} run_name={run.run_dir.name}-repro\n"
                                  f"tuneforge registry add {run.run_dir.parent / (run.run_dir.name + '-repro')} "
                                  f"--name {name}")
        return dataclasses.replace(info, card=str(card) if card else None)

    def models(self) -> list[str]:
        with Session(self.engine) as s:
            return list(s.scalars(select(Model.name).order_by(Model.name)))

    def versions(self, name: str) -> list[VersionInfo]:
        with Session(self.engine) as s:
            model = self._model(s, name)
            rows = s.scalars(select(Version).where(Version.model_id == model.id).order_by(Version.number))
            return [self._info(name, v) for v in rows]

    def aliases(self, name: str) -> dict[str, int]:
        with Session(self.engine) as s:
            model = self._model(s, name)
            rows = s.execute(select(Alias.alias, Version.number).join(Version, Alias.version_id == Version.id)
                             .where(Alias.model_id == model.id))
            return dict(rows.all())

    def resolve(self, ref: str, default_alias: str = "prod") -> VersionInfo:
        """name:vN, name@alias, or name (its ``default_alias`` if set, else its latest version)."""
        name, alias, number = parse_ref(ref)
        with Session(self.engine) as s:
            model = self._model(s, name)
            if alias is None and number is None:
                row = self._alias_row(s, model.id, default_alias)
                if row is not None:
                    return self._info(name, s.get(Version, row.version_id))
                number = s.scalar(select(Version.number).where(Version.model_id == model.id)
                                  .order_by(Version.number.desc()).limit(1))
            if alias is not None:
                row = self._alias_row(s, model.id, alias)
                if row is None:
                    raise RegistryError(f"{name} has no alias '{alias}' (promote a version to it first)")
                return self._info(name, s.get(Version, row.version_id))
            return self._info(name, self._version(s, model.id, name, number))

    # --- aliases -----------------------------------------------------------------------------
    def promote(self, ref: str, alias: str, force: bool = False, verdict=None,
                max_fairness_gap: float | None = None) -> str:
        """``verdict``: registry.gate's paired comparison (run before this, outside the write
        lock: it may score both versions); without one, the quick point-estimate ``gate``.
        ``max_fairness_gap``: also refuse a version whose eval's fairness gap (a share, 0.05
        = 5 points of its main metric) is larger, or that has no fairness section."""
        name, a, number = parse_ref(ref)
        if a is not None or number is None:
            raise RegistryError(f"promote takes a version (e.g. {name}:v2), not '{ref}'")
        if max_fairness_gap is not None and not max_fairness_gap >= 0:
            raise RegistryError(f"--max-fairness-gap {max_fairness_gap}: give a share >= 0 (0.05 = 5 points)")
        with self._write() as s:
            model = self._model(s, name)
            new = self._version(s, model.id, name, number)
            row = self._alias_row(s, model.id, alias)
            old = s.get(Version, row.version_id) if row else None
            if verdict is not None and (old.number if old else None) != verdict.old_number:
                raise RegistryError(f"{name}@{alias} moved to v{old.number if old else None} while the gate compared "
                                    f"with v{verdict.old_number}: promote again")
            if verdict is not None:
                quality = None if verdict.ok else verdict.summary
            else:
                quality = gate(new, old) if old is not None else None
            problems = [quality, fairness_gate(new, max_fairness_gap) if max_fairness_gap is not None else None]
            problem = "; ".join(p for p in problems if p) or None
            if problem and not force:
                raise PromotionRefused(f"refused to point {name}@{alias} at v{number}: {problem} (--force to override)")
            if row is None:
                s.add(Alias(model_id=model.id, alias=alias, version_id=new.id))
            else:
                row.version_id = new.id
            note = f"forced: {problem}" if problem else (f"gate {verdict.summary}" if verdict is not None else "")
            s.add(AliasEvent(model_id=model.id, alias=alias, action="promote",
                             from_version=old.number if old else None, to_version=number, note=note))
            return f"{name}@{alias} -> v{number}" + (f" ({note})" if note else "")

    def rollback(self, name: str, alias: str) -> str:
        with self._write() as s:
            model = self._model(s, name)
            row = self._alias_row(s, model.id, alias)
            events = s.execute(select(AliasEvent.action, AliasEvent.to_version)
                               .where(AliasEvent.model_id == model.id, AliasEvent.alias == alias)
                               .order_by(AliasEvent.id)).all()
            stack = alias_stack([tuple(e) for e in events])
            if row is None or len(stack) < 2:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
            current, target = stack[-1], stack[-2]
            row.version_id = self._version(s, model.id, name, target).id
            s.add(AliasEvent(model_id=model.id, alias=alias, action="rollback", from_version=current,
                             to_version=target))
            return f"{name}@{alias} -> v{target} (was v{current})"

    def history(self, name: str) -> list[dict]:
        with Session(self.engine) as s:
            model = self._model(s, name)
            rows = s.scalars(select(AliasEvent).where(AliasEvent.model_id == model.id).order_by(AliasEvent.id))
            return [{"at": e.at, "alias": e.alias, "action": e.action, "from": e.from_version, "to": e.to_version,
                     "note": e.note} for e in rows]

    # --- API keys -------------------------------------------------------------------------------
    def create_key(self, name: str, models: list[str], requests_per_minute: int | None = None,
                   admin: bool = False, reviewer: bool = False) -> tuple[int, str]:
        """(key id, the key itself). Only its hash is stored: the key is shown once.
        ``requests_per_minute``: None for serve.yaml's requests_per_minute, else at least 1."""
        if requests_per_minute is not None and (isinstance(requests_per_minute, bool) or requests_per_minute < 1):
            raise RegistryError(f"requests per minute must be at least 1 (got {requests_per_minute}): 0 would "
                                "mean no limit and a negative rate would lock the key out; leave --rpm out "
                                "for the server's default (serve.yaml requests_per_minute)")
        key = "tf-" + secrets.token_urlsafe(32)
        with self._write() as s:
            row = ApiKey(name=name, key_hash=hash_key(key), prefix=key[:8], models=models or ["*"],
                         requests_per_minute=requests_per_minute, admin=admin, reviewer=reviewer)
            s.add(row)
            s.flush()
            return row.id, key

    def revoke_key(self, key_id: int) -> None:
        with self._write() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise RegistryError(f"no API key with id {key_id}")
            row.revoked = row.revoked or utc_now()

    def keys(self) -> list[dict]:
        with Session(self.engine) as s:
            return [{"id": k.id, "name": k.name, "prefix": k.prefix, "models": k.models,
                     "requests_per_minute": k.requests_per_minute, "created": k.created, "revoked": k.revoked,
                     "admin": k.admin, "reviewer": k.reviewer}
                    for k in s.scalars(select(ApiKey).order_by(ApiKey.id))]

    def has_keys(self) -> bool:
        with Session(self.engine) as s:
            return s.scalar(select(ApiKey.id).limit(1)) is not None

    def check_key(self, key: str) -> KeyInfo | None:
        """The active key matching ``key``, or None (unknown or revoked)."""
        with Session(self.engine) as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(None)))
            return KeyInfo(row.id, row.name, list(row.models), row.requests_per_minute, row.admin,
                           row.reviewer) if row else None

    # --- route overrides --------------------------------------------------------------------
    def set_route_arms(self, route: str, arms: list[dict], note: str = "", restart: bool = False) -> None:
        """Replace ``route``'s arms. ``started`` (the canary's clock: feedback since then is
        compared) is kept when the override exists, unless ``restart``."""
        arms = [Arm.model_validate(a).model_dump() for a in arms]  # the same rules as serve.yaml
        if not arms:
            raise RegistryError(f"route {route}: an override needs at least one arm (clear it instead)")
        with self._write() as s:
            row = s.scalar(select(RouteOverride).where(RouteOverride.route == route))
            if row is None:
                s.add(RouteOverride(route=route, arms=arms, note=note))
            else:
                row.arms, row.note, row.updated = arms, note, utc_now()
                if restart:
                    row.started = row.updated

    def route_override(self, route: str) -> dict | None:
        """{"arms", "note", "started", "updated"} or None."""
        with Session(self.engine) as s:
            row = s.scalar(select(RouteOverride).where(RouteOverride.route == route))
            return None if row is None else {"arms": list(row.arms), "note": row.note, "started": row.started,
                                             "updated": row.updated}

    def route_arms(self, route: str) -> list[dict] | None:
        """The override's arms for ``route`` (the server asks once per request), or None."""
        with Session(self.engine) as s:
            return s.scalar(select(RouteOverride.arms).where(RouteOverride.route == route))

    def clear_route_arms(self, route: str) -> bool:
        with self._write() as s:
            row = s.scalar(select(RouteOverride).where(RouteOverride.route == route))
            if row is not None:
                s.delete(row)
            return row is not None

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _model(s: Session, name: str) -> Model:
        model = s.scalar(select(Model).where(Model.name == name))
        if model is None:
            raise RegistryError(f"no model named '{name}' in the registry (tuneforge registry add RUN_DIR --name {name})")
        return model

    @staticmethod
    def _version(s: Session, model_id: int, name: str, number: int | None) -> Version:
        v = s.scalar(select(Version).where(Version.model_id == model_id, Version.number == number))
        if v is None:
            raise RegistryError(f"{name} has no version v{number}")
        return v

    @staticmethod
    def _alias_row(s: Session, model_id: int, alias: str) -> Alias | None:
        return s.scalar(select(Alias).where(Alias.model_id == model_id, Alias.alias == alias))

    @staticmethod
    def _info(name: str, v: Version) -> VersionInfo:
        return VersionInfo(name, v.number, v.run_dir, v.base_model, v.adapter_sha256, dict(v.scores or {}),
                           v.main_metric, v.main_score, v.created)


def fairness_gate(new: Version, max_gap: float) -> str | None:
    """Why ``new`` fails ``--max-fairness-gap``, or None: the largest fairness gap that
    `tuneforge eval --fairness` wrote in its run's eval/eval_results.json."""
    path = Path(new.run_dir) / "eval" / "eval_results.json"
    how = f"run `tuneforge eval {new.run_dir} --fairness default` (or group=COLUMN for a column of your test rows)"
    if not path.is_file():
        return f"v{new.number} has no evaluation at {path} to read a fairness gap from: {how}"
    fairness = json.loads(path.read_text(encoding="utf-8")).get("fairness") or {}
    g = fairness.get("max_gap")
    if g is None:
        return f"v{new.number}'s evaluation ({path}) measured no fairness gap: {how}"
    if g["value"] > max_gap:
        return (f"its fairness gap {g['metric']} {g['value']:.4f} [{g['ci'][0]:.4f}, {g['ci'][1]:.4f}] "
                f"({g['source']}) is above --max-fairness-gap {max_gap}")
    return None


def gate(new: Version, old: Version) -> str | None:
    """Why ``new`` may not replace ``old``, or None. Refuse what cannot be shown to be no worse."""
    if new.main_score is None:
        return f"v{new.number} has no eval score (its run has no eval.json)"
    if old.main_score is None:
        return None
    if new.main_metric != old.main_metric:
        return f"scores are not comparable ({new.main_metric} vs {old.main_metric})"
    if new.main_score < old.main_score:
        return (f"its {new.main_metric} {new.main_score:.4f} is worse than v{old.number}'s "
                f"{old.main_score:.4f}")
    return None

