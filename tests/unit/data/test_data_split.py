"""Split invariants: disjoint, complete, seeded, stratified, groups on one side; leakage."""

import json
from collections import Counter

import pytest

from tuneforge.data.split import SplitOptions, find_leaks, leakage_stage, prompt_groups, split_rows


def sft(q, a, where):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "_where": where}


def key(r):
    return json.dumps(r, sort_keys=True)


ROWS = [sft(f"question number {i} about topic {i % 7} with some words", str(i), f"f:{i}") for i in range(300)]


def test_split_is_complete_disjoint_and_seeded():
    parts, st = split_rows(ROWS, SplitOptions(validation=0.1, test=0.2, seed=5))
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (210, 30, 60)
    keys = [{key(r) for r in p} for p in parts.values()]
    assert sum(map(len, keys)) == 300 and len(set().union(*keys)) == 300
    again, _ = split_rows(ROWS, SplitOptions(validation=0.1, test=0.2, seed=5))
    assert again == parts
    other, _ = split_rows(ROWS, SplitOptions(validation=0.1, test=0.2, seed=6))
    assert other["test"] != parts["test"]
    assert st.input == st.kept == 300


def test_fixed_sizes_and_impossible_sizes():
    parts, _ = split_rows(ROWS, SplitOptions(validation=25, test=40))
    assert (len(parts["validation"]), len(parts["test"])) == (25, 40)
    with pytest.raises(ValueError, match="leave no training rows"):
        split_rows(ROWS, SplitOptions(validation=150, test=150))
    with pytest.raises(ValueError, match="whole number"):
        split_rows(ROWS, SplitOptions(test=2.5))


def test_stratified_for_classification():
    rows = [{"text": f"review {i} text body here", "label": "rare" if i % 10 == 0 else "common", "_where": f"f:{i}"}
            for i in range(500)]
    parts, st = split_rows(rows, SplitOptions(validation=0.1, test=0.2, seed=1))
    assert st.info["stratified"]
    assert Counter(r["label"] for r in parts["test"]) == {"common": 90, "rare": 10}
    assert Counter(r["label"] for r in parts["validation"]) == {"common": 45, "rare": 5}
    plain, st = split_rows(rows, SplitOptions(validation=0.1, test=0.2, seed=1, stratify="no"))
    assert not st.info["stratified"]


def test_alike_prompts_stay_on_one_side():
    rows = []
    for g in range(60):
        prompt = f"please summarise article {g} about subject {g * 7} for the weekly newsletter readers"
        rows += [sft(prompt, f"answer {k}", f"f:{g}:{k}") for k in range(3)]
        rows.append(sft(prompt + " thanks", "answer x", f"f:{g}:near"))  # near-identical prompt
    labels = prompt_groups(rows, 0.8)
    assert len(set(labels.tolist())) == 60
    parts, _ = split_rows(rows, SplitOptions(validation=0.1, test=0.2, seed=3))
    side = {}
    for name, part in parts.items():
        for r in part:
            side.setdefault(r["_where"].split(":")[1], set()).add(name)
    assert all(len(s) == 1 for s in side.values())


def test_leakage_exact_and_near_is_found_and_removed_by_default():
    train = [sft("What is the capital of France and why is it famous?", "Paris", "t:1"),
             sft("Name three colours of the rainbow in order please", "red", "t:2")]
    test = [sft("what is the capital of  france and why is it famous?", "Paris", "x:1"),  # exact up to case/space
            sft("Name three colours of the rainbow in order please now", "red", "x:2"),  # near
            sft("How many legs does a spider have?", "8", "x:3")]
    leaks = find_leaks(train, test, 0.7)
    assert set(leaks) == {0, 1} and leaks[0] == (0, 1.0) and leaks[1][0] == 1
    kept, st = leakage_stage(train, test, SplitOptions(leakage_threshold=0.7))
    assert [r["_where"] for r in kept] == ["x:3"] and st.dropped == {"prompt also in train": 2}
    kept, st = leakage_stage(train, test, SplitOptions(leakage="report", leakage_threshold=0.7))
    assert len(kept) == 3 and st.changed["prompt also in train (kept)"] == 2


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_option_values_are_refused(value, tmp_path, capsys):
    from pydantic import ValidationError

    from tuneforge.cli import main
    from tuneforge.data.dedup import DedupOptions

    for make in (lambda v: SplitOptions(validation=v), lambda v: SplitOptions(leakage_threshold=v),
                 lambda v: DedupOptions(threshold=v)):
        with pytest.raises(ValidationError, match="finite number"):
            make(float(value))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a?", "completion": "b"}\n')
    assert main(["data", "prepare", str(rows), "--val", value, "-o", str(tmp_path / "out")]) == 2
    assert "validation: Input should be a finite number" in capsys.readouterr().err
