"""merge-adapters on the weight updates ΔW = scale·B·A: linear of an adapter with itself is that
adapter, the merge of two is the weighted ΔW sum within the reported truncation error, TIES/DARE
are seeded and differ from linear, and the merged folder is a run (generate, registry add)."""

import json

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import ConfigError, to_yaml
from tuneforge.deploy.merge import MERGE_FILE, merge_adapters, merge_loras, read_lora
from tuneforge.deploy.multilora import LoraBank
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm
from tuneforge.plugins import validate_config
from tuneforge.runs import load_run, read_run

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 41, 7]])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with several threads on a shared 2-core machine, each matmul waits on
    OpenMP's barrier (measured: the tiny fused model's forward 2.2 s on 2 threads, 34 ms on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_run(root, model_dir, seed=0, r=4, alpha=8, rslora=False, target="all-linear"):
    """A finished LoRA run folder with random A and B (so ΔW is not zero)."""
    raw = {"model": {"name": model_dir}, "data": {"train": [f"builtin:orders?n=40&seed={seed}"]},
           "method": {"name": "lora", "r": r, "alpha": alpha, "rslora": rslora, "target_modules": target},
           "run_name": f"lora{seed}"}
    cfg = validate_config(raw)
    model = METHODS["lora"].apply(load_causal_lm(model_dir, torch.float32, "cpu"), cfg.method)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    run = root / f"lora{seed}"
    METHODS["lora"].save(model, run / "adapter")
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def deltas(folder):
    lo = read_lora(folder / "adapter")
    return {m: lo.delta(m) for m in lo.pairs}


def logits(run):
    with torch.no_grad():
        return load_run(run)[0](input_ids=IDS).logits


@pytest.mark.parametrize("copies,weights", [(1, [1.0]), (2, [0.5, 0.5])])
def test_linear_merge_of_an_adapter_with_itself_is_that_adapter(copies, weights, tiny_model_dir, tmp_path):
    run = lora_run(tmp_path, tiny_model_dir, rslora=True)  # rsLoRA scale alpha/sqrt(r) must survive too
    out = merge_adapters([run] * copies, weights, "linear", tmp_path / "merged")
    ref, got = deltas(run), deltas(out)
    assert set(ref) == set(got) and len(ref) == 14  # 2 layers x 7 linear modules
    for m in ref:
        assert torch.allclose(got[m], ref[m], atol=1e-5), (m, (got[m] - ref[m]).abs().max())
    assert torch.allclose(logits(out), logits(run), atol=1e-5)
    manifest = json.loads((out / MERGE_FILE).read_text())
    assert manifest["how"] == "linear" and manifest["truncation"]["rank"] == 4 * copies
    assert manifest["truncation"]["relative_frobenius_error"] < 1e-6


def test_linear_merge_of_two_is_the_weighted_sum_within_the_reported_error(tiny_model_dir, tmp_path):
    a, b = (lora_run(tmp_path, tiny_model_dir, seed=s, r=r, alpha=2 * r) for s, r in ((1, 4), (2, 2)))
    da, db = deltas(a), deltas(b)
    target = {m: 0.7 * da[m] + 0.3 * db[m] for m in da}
    exact = merge_adapters([a, b], [0.7, 0.3], "linear", tmp_path / "exact")  # rank 4 + 2: exact
    for m, d in deltas(exact).items():
        assert torch.allclose(d, target[m], atol=1e-5)
    low = merge_adapters([a, b], [0.7, 0.3], "linear", tmp_path / "low", rank=2)
    t = json.loads((low / MERGE_FILE).read_text())["truncation"]
    got = deltas(low)
    num = den = 0.0
    for m in target:
        err = (got[m] - target[m]).norm() / target[m].norm()
        assert abs(err - t["modules"][m.removeprefix("base_model.model.")]) < 1e-5
        num, den = num + (got[m] - target[m]).norm() ** 2, den + target[m].norm() ** 2
    assert 0.05 < t["relative_frobenius_error"] < 1 and abs((num / den).sqrt() - t["relative_frobenius_error"]) < 1e-5


def test_ties_and_dare_are_seeded_and_differ_from_linear(tiny_model_dir, tmp_path):
    loras = [read_lora(lora_run(tmp_path, tiny_model_dir, seed=s) / "adapter") for s in (1, 2)]

    def merged(how, seed):
        tensors, _ = merge_loras(loras, [0.5, 0.5], how, rank=4, density=0.5, seed=seed)
        return tensors

    linear = merged("linear", 0)
    for how in ("ties", "dare_linear", "dare_ties"):
        one, two, other = merged(how, 3), merged(how, 3), merged(how, 4)
        assert all(torch.equal(one[k], two[k]) for k in one), how
        assert all(not torch.allclose(one[k], linear[k], atol=1e-4) for k in one if k.endswith("B.weight")), how
        assert all(torch.equal(one[k], other[k]) for k in one) == (how == "ties"), how  # only DARE draws


def test_merged_folder_is_a_run_generate_and_registry_add(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_REGISTRY", f"sqlite:///{tmp_path / 'reg.db'}")
    runs = [lora_run(tmp_path, tiny_model_dir, seed=s) for s in (1, 2)]
    out = tmp_path / "merged"
    assert main(["merge-adapters", *map(str, runs), "--how", "ties", "--rank", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "truncation error" in printed and "rank 4" in printed
    assert read_run(out).method == "lora"
    for name in ("lora1", "lora2"):  # each run's own splits, its test rows kept apart
        assert all((out / "data" / name / f"{s}.jsonl").is_file() for s in ("train", "validation", "test"))
    assert main(["generate", str(out), "hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["registry", "add", str(out), "--name", "merged-bot"]) == 0
    assert "merged-bot:v1" in capsys.readouterr().out
    bank = LoraBank(load_causal_lm(tiny_model_dir, torch.float32, "cpu"))
    assert bank.load("merged-bot:v1", str(out / "adapter")) is None  # the server's batched LoRA path takes it


def test_merge_refuses_what_it_cannot_merge(tiny_model_dir, tmp_path, capsys):
    from test_export_methods import fake_run

    runs = [lora_run(tmp_path, tiny_model_dir), fake_run(tmp_path, tiny_model_dir, {"name": "ia3"})]
    with pytest.raises(ConfigError, match="method 'ia3' cannot be merged"):
        merge_adapters(runs, [0.5, 0.5], "linear", tmp_path / "m")
    with pytest.raises(ConfigError, match="--weights has 1 values for 2 runs"):
        merge_adapters(runs[:1] * 2, [0.5], "linear", tmp_path / "m")
    a, out = str(runs[0]), str(tmp_path / "m")
    assert main(["merge-adapters", a, a, "--how", "fusion", "--weights", "0.5,0.5", "--out", out]) == 2
    assert main(["merge-adapters", a, "train.max_steps=1", a, "--out", out]) == 2  # overrides: fusion only
    assert "only configure --how fusion" in capsys.readouterr().err
    assert main(["merge-adapters", a, a, "--out", out, "train.max_steps=1"]) == 2  # after the options too
    assert "only configure --how fusion" in capsys.readouterr().err
    assert main(["merge-adapters", a, a, "--how", "fusion", "--density", "0.3", "--out", out]) == 2
    assert main(["merge-adapters", a, a, "--density", "0.3", "--out", out]) == 2  # linear keeps every entry
    assert "--density" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
