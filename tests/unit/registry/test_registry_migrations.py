"""alembic migrations of the registry database: new databases, pre-alembic ones, and a guard
that every table on the models has a revision."""

import hashlib
import sqlite3
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from deploy_helpers import fake_run, fresh_url
from sqlalchemy import create_engine, inspect

from tuneforge.registry.migrate import all_tables, current, head
from tuneforge.registry.store import Registry

# The schema tuneforge created with Base.metadata.create_all before migrations existed
# (commit ae41b43): registry tables plus the production tables, no api_keys.admin.
PRE_ALEMBIC = """
CREATE TABLE models (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, created DATETIME NOT NULL,
  PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE versions (id INTEGER NOT NULL, model_id INTEGER NOT NULL, number INTEGER NOT NULL,
  run_dir VARCHAR(1000) NOT NULL, base_model VARCHAR(1000) NOT NULL, adapter_sha256 VARCHAR(64) NOT NULL,
  scores JSON NOT NULL, main_metric VARCHAR(100), main_score FLOAT, created DATETIME NOT NULL,
  PRIMARY KEY (id), UNIQUE (model_id, number), FOREIGN KEY(model_id) REFERENCES models (id));
CREATE TABLE aliases (id INTEGER NOT NULL, model_id INTEGER NOT NULL, alias VARCHAR(100) NOT NULL,
  version_id INTEGER NOT NULL, PRIMARY KEY (id), UNIQUE (model_id, alias),
  FOREIGN KEY(model_id) REFERENCES models (id), FOREIGN KEY(version_id) REFERENCES versions (id));
CREATE TABLE alias_events (id INTEGER NOT NULL, model_id INTEGER NOT NULL, alias VARCHAR(100) NOT NULL,
  action VARCHAR(20) NOT NULL, from_version INTEGER, to_version INTEGER NOT NULL, note VARCHAR(500) NOT NULL,
  at DATETIME NOT NULL, PRIMARY KEY (id), FOREIGN KEY(model_id) REFERENCES models (id));
CREATE TABLE api_keys (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, key_hash VARCHAR(64) NOT NULL,
  prefix VARCHAR(12) NOT NULL, models JSON NOT NULL, requests_per_minute INTEGER, created DATETIME NOT NULL,
  revoked DATETIME, PRIMARY KEY (id), UNIQUE (key_hash));
"""


def test_new_database_is_at_head_and_matches_the_models(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'new.db'}")
    assert current(reg.engine) == head()
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), all_tables())
    # A table or column added to the models without a revision shows up here: write one with
    # `python -m tuneforge.registry.migrate revision "what changed"`.
    assert diff == []


# What create_all added on main later (prodlog/review merge), still before migrations.
ROUTE_OVERRIDES = """
CREATE TABLE route_overrides (id INTEGER NOT NULL, route VARCHAR(200) NOT NULL, arms JSON NOT NULL,
  note VARCHAR(500) NOT NULL, started DATETIME NOT NULL, updated DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (route));
INSERT INTO route_overrides VALUES (1, 'bot-ab', '[]', 'canary', '2026-01-01 00:00:00', '2026-01-01 00:00:00');
"""


@pytest.mark.parametrize("later_tables", ["", ROUTE_OVERRIDES], ids=["ae41b43", "with-route-overrides"])
def test_pre_alembic_database_upgrades_and_keeps_its_rows(tmp_path, tiny_model_dir, later_tables):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(PRE_ALEMBIC + later_tables)
    # A registry written by the old code: a model, a version, an alias and a key.
    con.executescript("""
    INSERT INTO models VALUES (1, 'bot', '2026-01-01 00:00:00');
    INSERT INTO versions VALUES (1, 1, 1, '%s', '%s', 'abc', '{}', NULL, NULL, '2026-01-01 00:00:00');
    INSERT INTO aliases VALUES (1, 1, 'prod', 1);
    INSERT INTO alias_events VALUES (1, 1, 'prod', 'promote', NULL, 1, '', '2026-01-01 00:00:00');
    """ % (tmp_path / "run", tiny_model_dir))
    con.close()
    reg = Registry(f"sqlite:///{db}")
    assert current(reg.engine) == head()
    assert reg.resolve("bot@prod").ref == "bot:v1" and reg.history("bot")[0]["to"] == 1
    # The tables it lacked (production tables) exist now, and api_keys gained its admin column.
    tables = set(inspect(reg.engine).get_table_names())
    assert {"request_logs", "feedback", "review_items", "route_overrides", "alembic_version"} <= tables
    if later_tables:
        assert reg.route_override("bot-ab")["note"] == "canary"
    kid, key = reg.create_key("ops", ["*"], admin=True)
    assert reg.check_key(key).admin
    # The old rows work with new writes, and opening it again changes nothing.
    run = fake_run(tiny_model_dir, tmp_path / "run2", seed=1)
    assert reg.add(run, "bot").ref == "bot:v2"
    again = Registry(f"sqlite:///{db}")
    assert [v.ref for v in again.versions("bot")] == ["bot:v1", "bot:v2"] and again.check_key(key).id == kid


def test_old_keys_are_not_admin_after_upgrade(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(PRE_ALEMBIC)
    con.execute("INSERT INTO api_keys VALUES (1, 'app', ?, 'tf-x', '[\"*\"]', NULL, '2026-01-01 00:00:00', NULL)",
                (hashlib.sha256(b"tf-secret").hexdigest(),))
    con.commit()
    con.close()
    reg = Registry(f"sqlite:///{db}")
    info = reg.check_key("tf-secret")
    assert info is not None and info.admin is False and info.reviewer is False
    assert create_engine(f"sqlite:///{db}").connect().exec_driver_sql(
        "SELECT version_num FROM alembic_version").scalar() == head()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_processes_opening_a_new_registry_at_once_all_succeed(kind, tmp_path):
    # Without the migration lock, 3 of 4 failed here ("table ... already exists").
    url = fresh_url(kind, tmp_path)
    code = "import sys; from tuneforge.registry.store import Registry; Registry(sys.argv[1]).create_key('k', [])"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert len(Registry(url).keys()) == 4
