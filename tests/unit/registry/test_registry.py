"""Registry: versions index run folders, the promotion gate refuses worse evals unless forced,
rollback walks the alias history back, keys are hashed, scoped and revocable."""

import subprocess
import sys

import pytest
from sqlalchemy import text

from deploy_helpers import fake_run, fresh_url
from tuneforge.registry.store import PromotionRefused, Registry, RegistryError, alias_stack, parse_ref


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request, tmp_path):
    return Registry(fresh_url(request.param, tmp_path))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("regruns")
    return {s: fake_run(tiny_model_dir, root / f"run{i}", seed=i, score=s)
            for i, s in enumerate((0.5, 0.7, 0.6))} | {None: fake_run(tiny_model_dir, root / "noeval", 9, None)}


def test_versions_number_up_and_resolve(reg, runs):
    v1 = reg.add(runs[0.5], "bot")
    v2 = reg.add(runs[0.7], "bot")
    assert (v1.ref, v2.ref) == ("bot:v1", "bot:v2")
    assert v2.main_metric == "exact_match" and v2.main_score == 0.7 and len(v2.adapter_sha256) == 64
    assert v1.adapter_sha256 != v2.adapter_sha256
    assert reg.resolve("bot").number == 2  # no prod alias yet: the latest
    reg.promote("bot:v1", "prod")
    assert reg.resolve("bot").number == 1 and reg.resolve("bot@prod").number == 1
    assert reg.resolve("bot:v2").run_dir == str(runs[0.7].resolve())
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        reg.resolve("bot@staging")
    with pytest.raises(RegistryError, match="no version v7"):
        reg.resolve("bot:v7")
    with pytest.raises(RegistryError, match="no model named"):
        reg.resolve("nope")


def test_promotion_gate_refuse_force_and_rollback_history(reg, runs):
    for s in (0.5, 0.7, 0.6):
        reg.add(runs[s], "bot")  # v1=0.5, v2=0.7, v3=0.6
    reg.promote("bot:v1", "prod")
    reg.promote("bot:v2", "prod")  # better: allowed
    with pytest.raises(PromotionRefused, match="worse than v2"):
        reg.promote("bot:v3", "prod")
    assert reg.aliases("bot") == {"prod": 2}  # the refused promotion changed nothing
    assert "forced" in reg.promote("bot:v3", "prod", force=True)
    assert reg.aliases("bot") == {"prod": 3}
    reg.rollback("bot", "prod")
    assert reg.aliases("bot") == {"prod": 2}
    reg.rollback("bot", "prod")  # walks back, does not bounce to v3
    assert reg.aliases("bot") == {"prod": 1}
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("bot", "prod")
    hist = reg.history("bot")
    assert [(h["action"], h["from"], h["to"]) for h in hist] == [
        ("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1)]
    assert hist[2]["note"].startswith("forced")


def test_a_version_without_eval_needs_force(reg, runs):
    reg.add(runs[0.5], "bot")
    reg.add(runs[None], "bot")
    reg.promote("bot:v1", "prod")
    with pytest.raises(PromotionRefused, match="no eval score"):
        reg.promote("bot:v2", "prod")
    reg.promote("bot:v2", "prod", force=True)


def test_keys_are_hashed_scoped_and_revocable(reg, tmp_path):
    assert not reg.has_keys()
    kid, key = reg.create_key("app1", ["bot"], requests_per_minute=5)
    assert reg.has_keys()
    info = reg.check_key(key)
    assert info.name == "app1" and info.models == ["bot"] and info.requests_per_minute == 5
    assert reg.check_key(key + "x") is None
    with reg.engine.connect() as c:
        stored = c.execute(text("select key_hash, prefix from api_keys")).one()
    assert key not in stored[0] and stored[1] == key[:8]  # the key itself is never stored
    reg.revoke_key(kid)
    assert reg.check_key(key) is None
    with pytest.raises(RegistryError):
        reg.revoke_key(999)


def test_alias_stack_and_parse_ref():
    assert alias_stack([("promote", 1), ("promote", 2), ("promote", 3), ("rollback", 2)]) == [1, 2]
    assert parse_ref("a:v3") == ("a", None, 3) and parse_ref("a@prod") == ("a", "prod", None)
    assert parse_ref("a") == ("a", None, None)
    with pytest.raises(RegistryError):
        parse_ref("a:3")


WRITER = """
import sys
from tuneforge.registry.store import Registry
reg = Registry(sys.argv[1])
for _ in range(5):
    v = reg.add(sys.argv[2], "bot")
    reg.promote(v.ref, "prod", force=True)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_writers_number_versions_once_and_keep_alias_history_whole(kind, tmp_path, runs):
    """Four processes adding and promoting at once (two CLI users, the server): every write
    lands, versions are numbered 1..20 without a gap or a twin, and each promotion records the
    version the alias really left. Without the registry's write lock, 3 of 4 writers failed:
    on SQLite with "UNIQUE constraint failed: models.name", on PostgreSQL with a duplicate
    (model, version number)."""
    url = fresh_url(kind, tmp_path)
    Registry(url)  # schema first: this test is about writes, not the (separately tested) migration race
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(runs[0.5])], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    reg = Registry(url)
    assert [v.number for v in reg.versions("bot")] == list(range(1, 21))
    hist = reg.history("bot")
    assert len(hist) == 20 and hist[0]["from"] is None
    assert all(h["from"] == prev["to"] for prev, h in zip(hist, hist[1:]))
    reg.rollback("bot", "prod")
    assert reg.aliases("bot") == {"prod": hist[-1]["from"]}
