"""The registry and keys commands: exit codes and what they print (over fake run folders)."""

from deploy_helpers import fake_run, with_eval

from tuneforge.cli import main


def test_registry_and_keys_commands(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_REGISTRY", f"sqlite:///{tmp_path / 'reg.db'}")
    monkeypatch.setenv("COLUMNS", "250")  # rich would wrap table cells at 80
    good, worse = (fake_run(tiny_model_dir, tmp_path / n, seed=s, score=x)
                   for n, s, x in (("good", 1, 0.8), ("worse", 2, 0.4)))
    assert main(["registry", "add", str(good), "--name", "support-bot"]) == 0
    assert "support-bot:v1" in capsys.readouterr().out
    assert main(["registry", "add", str(worse), "--name", "support-bot"]) == 0
    assert main(["registry", "promote", "support-bot:v1", "--alias", "prod"]) == 0
    with_eval(good, [1.0] * 32 + [0.0] * 8, "a")  # 80% and 40% on the same 40 rows
    with_eval(worse, [1.0] * 16 + [0.0] * 24, "a")
    assert main(["registry", "promote", "support-bot:v2", "--alias", "prod"]) == 3  # worse: refused
    err = " ".join(capsys.readouterr().err.split())
    assert "not shown to be no worse" in err and "exact_match 0.4000 vs 0.8000 on 40 rows" in err
    assert main(["registry", "promote", "support-bot:v2", "--alias", "prod", "--min-rows", "50"]) == 3
    assert "40 scored, 50 needed (--min-rows)" in " ".join(capsys.readouterr().err.split())
    assert main(["registry", "promote", "support-bot:v2", "--alias", "prod", "--confidence", "2"]) == 2
    assert "--confidence: Input should be less than 1" in capsys.readouterr().err
    assert main(["registry", "promote", "support-bot:v2", "--alias", "prod", "--force"]) == 0
    assert main(["registry", "rollback", "support-bot", "--alias", "prod"]) == 0
    assert "-> v1 (was v2)" in capsys.readouterr().out
    assert main(["registry", "history", "support-bot"]) == 0
    assert main(["registry", "list"]) == 0
    out = capsys.readouterr().out
    assert "rollback" in out and "support-bot:v2" in out
    assert main(["registry", "rollback", "nobody"]) == 2
    assert main(["registry", "add", str(tmp_path), "--name", "x"]) == 2  # not a run folder
    assert main(["keys", "create", "--name", "app1", "--models", "support-bot"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("tf-") and len(key) > 40
    assert main(["keys", "revoke", "1"]) == 0
    assert main(["keys", "list"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_export_refuses_pruning_options_it_would_not_use(tiny_model_dir, tmp_path, capsys):
    run = fake_run(tiny_model_dir, tmp_path / "run", seed=1)
    assert main(["export", str(run), "--format", "merged", "--sparsity", "0.3", "--recover", "5"]) == 2
    assert "--sparsity and --recover: options of --format pruned, not of --format merged" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "pruned"]) == 2
    assert "--format pruned needs --sparsity" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "pruned", "--sparsity", "1.5", "--structured", "mlp,rows"]) == 2
    err = capsys.readouterr().err
    assert "--sparsity 1.5: must be in [0, 1)" in err and "--structured mlp,rows: choose from heads, mlp, layers" in err
    assert not (run / "export").exists()
