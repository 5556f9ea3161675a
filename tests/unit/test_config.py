import pytest

from tuneforge.config import ConfigError, parse_overrides

from tuneforge.plugins import load_config, validate_config


def base():
    return {"data": {"train": ["builtin:orders"]}}


def test_valid_defaults():
    cfg = validate_config(base())
    assert cfg.method.name == "lora" and cfg.method.r == 8
    assert cfg.objective.name == "sft"
    assert cfg.model.name == "smollm2-135m-instruct"


def test_typo_gets_closest_key_and_all_problems_reported_at_once():
    raw = base() | {"train": {"lrr": 1e-4, "batch_size": 0}, "method": {"name": "lora", "rank": 8}}
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    text = str(e.value)
    assert "did you mean 'train.lr'?" in text
    assert "train.batch_size" in text  # the second problem in the same section is not lost
    assert "method.rank" in text and "did you mean 'method.r'?" in text
    assert len(e.value.problems) == 3


def test_unknown_method_and_top_level_key():
    with pytest.raises(ConfigError) as e:
        validate_config(base() | {"method": {"name": "lroa"}, "trian": {}})
    assert "unknown method 'lroa': did you mean 'lora'?" in str(e.value)
    assert "did you mean 'train'?" in str(e.value)


def test_fsdp_refuses_what_cannot_be_sharded_all_at_once():
    assert validate_config(base()).train.distributed == "ddp"
    assert validate_config(base() | {"train": {"distributed": "fsdp"}, "method": {"name": "full"}})
    with pytest.raises(ConfigError, match="train.distributed"):
        validate_config(base() | {"train": {"distributed": "zero3"}})
    raw = base() | {"train": {"distributed": "fsdp"}, "method": {"name": "hft"}, "objective": {"name": "dpo"},
                    "continual": {"ewc_lambda": 10.0, "previous": [{"name": "old", "train": ["builtin:orders"]}]}}
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    fsdp = [p for p in e.value.problems if p.startswith("train.distributed=fsdp")]
    assert len(fsdp) == 3
    assert "method 'hft'" in fsdp[0] and "objective 'dpo'" in fsdp[1] and "ewc_lambda" in fsdp[2]
    assert all("use train.distributed=ddp" in p for p in fsdp)
    # The pair recipe trains one task: the continual part is refused for dpo however it is distributed.
    others = [p for p in e.value.problems if p not in fsdp]
    assert len(others) == 1 and others[0].startswith("continual") and "objective 'dpo'" in others[0]
    ddp = raw | {"train": {"distributed": "ddp"}}
    with pytest.raises(ConfigError) as e:
        validate_config(ddp)
    assert e.value.problems == others
    assert validate_config(ddp | {"objective": {"name": "sft"}})  # the same token run replicated is fine


def test_missing_data_is_named():
    with pytest.raises(ConfigError, match="'data' is required"):
        validate_config({})


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["train.lr=1e-4", "data.packing=true", "run_name=x"]) == {
        "train": {"lr": 1e-4}, "data": {"packing": True}, "run_name": "x"}
    assert parse_overrides(["data.train=[builtin:orders?n=60&seed=1, b.jsonl]"]) == {
        "data": {"train": ["builtin:orders?n=60&seed=1", "b.jsonl"]}}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["train.lr"])


def test_load_config_file_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [builtin:orders]}\ntrain: {lr: 0.1}\n")
    cfg = load_config(p, ["train.lr=0.5", "method.r=4"])
    assert cfg.train.lr == 0.5 and cfg.method.r == 4
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_lora_target_module_typo_lists_existing_modules(tiny_model_dir):
    from tuneforge.train.run_folder import preflight

    cfg = validate_config({"model": {"name": tiny_model_dir}, "data": {"train": ["nope.jsonl"]},
                           "method": {"name": "lora", "target_modules": ["q_prj", "v_proj"]}})
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    text = str(e.value)
    assert "'q_prj' is not a module of this model" in text and "did you mean 'q_proj'?" in text
    assert "o_proj" in text  # the modules that do exist are listed
    assert "nope.jsonl" in text  # the missing data file is reported in the same error


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "train.lr=-.inf", "method.alpha=.inf"])
def test_non_finite_floats_are_refused(tmp_path, override):
    # lr: .inf used to be accepted and trained a NaN adapter; every float field is finite now
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: [builtin:orders]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert override.split("=")[0] in str(e.value) and "finite" in str(e.value)


@pytest.mark.parametrize("section,name,kind", [("method", ["lora"], "list"), ("objective", {"sft": 1}, "dict"),
                                               ("method", 5, "int"), ("objective", None, "NoneType")])
def test_wrong_typed_plugin_name_is_a_config_error_naming_the_field(section, name, kind):
    with pytest.raises(ConfigError) as e:
        validate_config(base() | {section: {"name": name}})
    assert f"'{section}.name' must be a name (text)" in str(e.value) and f"got {kind}" in str(e.value)


def test_method_of_on_an_unvalidated_config_is_a_config_error():
    from types import SimpleNamespace

    from tuneforge.plugins import method_of, objective_of

    cfg = SimpleNamespace(method=SimpleNamespace(name=["lora"]), objective=SimpleNamespace(name="nope"))
    with pytest.raises(ConfigError, match=r"'method.name' must be a name \(text\).*got list"):
        method_of(cfg)
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        objective_of(cfg)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "ia3"])
def test_empty_target_modules_is_refused(method):
    with pytest.raises(ConfigError, match="needs at least one target module; .*all-linear"):
        validate_config(base() | {"method": {"name": method, "target_modules": []}})


def test_non_utf8_config_names_the_file_and_byte_offset(tmp_path, capsys):
    from tuneforge.cli import main

    path = tmp_path / "run.yaml"
    path.write_bytes(b"data:\n  train: [caf\xe9.jsonl]\n")
    with pytest.raises(ConfigError, match=r"run.yaml is not UTF-8 text: byte 0xe9 at byte offset 19 \(line 2\)"):
        load_config(path)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "byte offset 19" in err and "Traceback" not in err


def test_serve_monitor_and_improve_configs_name_a_non_utf8_byte_too(tmp_path):
    from tuneforge.deploy.config import load_serve_config
    from tuneforge.production.config import load_monitor_config
    from tuneforge.production.loop.improve import load_improve_config

    path = tmp_path / "serve.yaml"
    path.write_bytes(b"host: caf\xe9\n")
    for load in (load_serve_config, load_monitor_config, load_improve_config):
        with pytest.raises(ConfigError, match=r"serve.yaml is not UTF-8 text: byte 0xe9 at byte offset 9"):
            load(path)


def test_switching_method_on_the_command_line_leaves_out_the_files_options_with_a_notice(tmp_path, capsys):
    from tuneforge.plugins import load_config

    (tmp_path / "run.yaml").write_text("model: {name: m}\ndata: {train: [builtin:orders]}\n"
                                       "method: {name: lora, r: 8, alpha: 16, dropout: 0.05}\n")
    cfg = load_config(tmp_path / "run.yaml", ["method.name=ia3"])
    assert cfg.method.name == "ia3"
    note = capsys.readouterr().err
    assert "method.r, method.alpha, method.dropout left out" in note and "ia3" in note
    with pytest.raises(ConfigError, match="method.r"):  # given on the same command line: still an error
        load_config(tmp_path / "run.yaml", ["method.name=ia3", "method.r=4"])
    capsys.readouterr()
    assert load_config(tmp_path / "run.yaml", ["method.r=4"]).method.r == 4  # no switch: nothing left out
    assert capsys.readouterr().err == ""


def test_overrides_may_follow_options(tmp_path):
    from tuneforge.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["sweep", "cfg.yaml", "--space", "s.yaml", "--trials", "3", "run_name=x",
                                       "train.lr=1e-3"])
    assert args.overrides == ["run_name=x", "train.lr=1e-3"] and args.trials == 3 and args.space == "s.yaml"
    with pytest.raises(SystemExit):  # an unknown option is still refused
        parse_args(build_parser(), ["sweep", "cfg.yaml", "--space", "s.yaml", "--bogus"])
