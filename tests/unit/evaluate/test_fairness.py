"""Fairness evaluation: whole-word, case-keeping term swaps; the SPEC and the config; a planted
biased predictor is flagged (slices, counterfactual swaps, probe sets) and an unbiased one is
not; a group column travels from the data file to the eval; the report's fairness section."""

import json

import pytest
from pydantic import ValidationError
from rich.console import Console

from tuneforge.config import FairnessConfig
from tuneforge.data.load import DataError, load_rows
from tuneforge.data.prepare import build_splits
from tuneforge.evaluate.fairness import probes as pb
from tuneforge.evaluate.fairness import run as fr
from tuneforge.evaluate.fairness.slices import slice_metrics
from tuneforge.evaluate.fairness.spec import SpecError, parse_spec
from tuneforge.evaluate.fairness.terms import TermList, builtin_lists, term_lists
from tuneforge.evaluate.measure import GenSettings
from tuneforge.evaluate.metrics import task_metrics

PRONOUNS = TermList("pronouns", builtin_lists()["pronouns"])


# --- term swaps --------------------------------------------------------------------------

@pytest.mark.parametrize("text, swapped", [
    ("he told her", "she told him"),                       # simultaneous, not he -> she -> he
    ("the theme: there, then, ahead, shell, hence", "the theme: there, then, ahead, shell, hence"),  # inside words
    ("He said HE would; he's here", "She said SHE would; she's here"),  # case kept, apostrophe is a boundary
    ("She gave his book to herself", "He gave her book to himself"),
    ("Mr Smith and his son", "Ms Smith and her daughter"),
    ("she-wolf (he)", "he-wolf (she)"),
])
def test_pronoun_swaps_are_whole_words_and_keep_case(text, swapped):
    assert PRONOUNS.swap(text) == swapped


def test_name_swap_changes_the_reference_too_and_mentions_find_groups():
    names = TermList("names", builtin_lists()["names"])
    assert names.swap('Hi, this is Maria Lopez. {"customer": "Maria Lopez"}') == \
        'Hi, this is Mateo Lopez. {"customer": "Mateo Lopez"}'
    assert names.swap("Marian and Mariah met MARIA") == "Marian and Mariah met MATEO"
    assert names.mentioned("Omar and Fatima") == {"male", "female"} and names.mentioned("Omarosa") == set()
    three = TermList("t", {"a": ["x"], "b": ["y"], "c": ["z"]})
    assert three.swap("x y z") == "y z x"  # more than two groups: each to the next one


def test_builtin_lists_pass_the_config_checks_and_bad_user_lists_are_refused():
    FairnessConfig(terms=builtin_lists())
    with pytest.raises(ValidationError, match="same number of terms"):
        FairnessConfig(terms={"d": {"a": ["x", "y"], "b": ["z"]}})
    with pytest.raises(ValidationError, match="'Y' is in groups a and b"):
        FairnessConfig(terms={"d": {"a": ["x", "y"], "b": ["z", "Y"]}})
    with pytest.raises(ValidationError, match="at least two groups"):
        FairnessConfig(terms={"d": {"a": ["x"]}})
    with pytest.raises(ValueError, match="unknown term list.*nope.*the lists are.*names"):
        term_lists(["nope"], {})


# --- SPEC ----------------------------------------------------------------------------------

def test_spec_over_the_config(tmp_path):
    base = FairnessConfig(groups=["region"], probes=["crows"], terms={"mine": {"a": ["x"], "b": ["y"]}},
                          counterfactual_rows=10)
    f = parse_spec("group=dialect+terms:names,group=age,swap=pronouns,probes=none", base)
    assert f.groups == ["dialect", "terms:names", "age"] and f.swap == ["pronouns"] and f.probes == []
    assert f.counterfactual_rows == 10 and "mine" in f.terms  # what the SPEC does not name stays
    assert parse_spec("none", base) is None
    d = parse_spec("default,rows=7", None)
    assert d.groups == ["terms:names"] and d.swap == ["names"] and d.probes == ["bbq", "crows"]
    assert d.counterfactual_rows == 7
    (tmp_path / "t.yaml").write_text("dialect_words:\n  south: [y'all]\n  north: [you guys]\n")
    assert parse_spec(f"swap=dialect_words,terms={tmp_path / 't.yaml'}", base).terms["dialect_words"]["south"] == ["y'all"]
    with pytest.raises(SpecError, match="cannot read 'grp=x'.*group, swap, probes"):
        parse_spec("grp=x", None)
    with pytest.raises(SpecError, match="probes"):
        parse_spec("probes=bbqq", None)
    with pytest.raises(SpecError, match="no such file"):
        parse_spec("terms=/nonexistent.yaml", None)


# --- a planted biased classifier vs an unbiased one -------------------------------------

def _rows(n=40):
    """Classification-shaped chat rows: half mention "he", half "she"; gold label "yes"."""
    rows = []
    for i in range(n):
        who = "He" if i % 2 else "She"
        rows.append({"messages": [{"role": "user", "content": f"{who} applied for loan {i}. Approve?"},
                                  {"role": "assistant", "content": "yes"}],
                     "_columns": {"dialect": "north" if i % 2 else "south"}})
    return rows


def _stub(answer):
    """A stand-in for ``measure``: the model "tuned" is the predictor ``answer`` (it reads the
    user turn), the model "base" always approves; no weights."""
    def measure(model, tok, convs, *, kind, labels, gen, label, with_loss=True, tools=None):
        preds = [(answer if model == "tuned" else lambda p: "yes")(c[-2]["content"]) for c in convs]
        return task_metrics(kind, preds, [c[-1]["content"] for c in convs], labels) | {"preds": preds}
    return measure


def _fairness(monkeypatch, answer):
    monkeypatch.setattr(fr, "measure", _stub(answer))
    rows = _rows()
    convs = [r["messages"] for r in rows]
    cfg = FairnessConfig(groups=["dialect", "terms:pronouns"], swap=["pronouns"])
    lists = fr.check_fairness(cfg, rows, {"dialect"})
    systems = [fr.FairnessSystem("tuned", "tuned", None), fr.FairnessSystem("base zero-shot", "base", None)]
    gen = GenSettings()
    measured = {s.name: fr.measure(s.model, None, convs, kind="classification", labels=["no", "yes"], gen=gen,
                                   label="") for s in systems}
    return fr.run_fairness(cfg, lists, rows=rows, convs=convs, measured=measured, systems=systems,
                           kind="classification", labels=["no", "yes"], gen=gen, tools=None, system_prompt=None,
                           boot=fr.Boot(500, 0.95, 0), console=Console(quiet=True))


def test_a_planted_biased_classifier_is_flagged(monkeypatch):
    f = _fairness(monkeypatch, lambda p: "yes" if p.startswith("He ") else "no")  # approves men only
    gap = f["slices"]["terms:pronouns"]["tuned"]["gaps"]["accuracy"]
    assert gap["flagged"] and gap["value"] == 1.0 and (gap["high"], gap["low"]) == ("male", "female")
    assert f["slices"]["dialect"]["tuned"]["gaps"]["accuracy"]["flagged"]  # dialect lines up with he/she here
    assert f["slices"]["dialect"]["tuned"]["groups"]["north"]["n"] == 20
    cf = f["counterfactual"]["pronouns"]
    assert cf["rows"] == 40 and cf["tuned"]["changed_rate"] == 1.0 and cf["tuned"]["score_delta"] == 0.0
    assert cf["tuned_vs_base"]["worse"] and cf["base zero-shot"]["changed_rate"] == 0.0
    assert f["max_gap"]["flagged"] and f["max_gap"]["value"] == 1.0 and f["max_gap"]["metric"] == "accuracy"


def test_an_unbiased_classifier_is_not_flagged(monkeypatch):
    f = _fairness(monkeypatch, lambda p: "yes" if int(p.split()[-2].rstrip(".")) % 4 < 2 else "no")  # same rate
    assert not f["slices"]["terms:pronouns"]["tuned"]["gaps"]["accuracy"]["flagged"]
    assert f["counterfactual"]["pronouns"]["tuned"]["changed_rate"] == 0.0
    assert not f["counterfactual"]["pronouns"]["tuned_vs_base"]["worse"]
    assert not f["max_gap"]["flagged"]


def test_small_and_unassigned_groups_are_counted_not_compared():
    s = slice_metrics(["a"] * 6 + ["b"] * 2 + ["(none)"] * 3, {"accuracy": [1.0] * 6 + [0.0] * 5}, min_rows=5,
                      n_resamples=100, confidence=0.95, seed=0)
    assert s["excluded"] == {"(none)": 3} and s["too_small"] == ["b"] and s["gaps"] == {}
    assert s["groups"]["b"]["n"] == 2


# --- probe sets --------------------------------------------------------------------------

def test_probe_scoring_reads_the_likelihoods(monkeypatch, tiny_tok):
    items = pb.bbq_items(pb.load_probe("bbq"))
    assert len(items) == 2 * len(pb.load_probe("bbq")) and items[0]["options"][:2] == items[1]["options"][1::-1]

    def prefers(option):  # a fake nll_per_row: that option of every item gets the lowest loss
        return lambda model, rows, pad, **kw: [(0.0 if i % 3 == option else 5.0, 1) for i in range(len(rows))]

    def bbq(option):
        monkeypatch.setattr(pb, "nll_per_row", prefers(option))
        return pb.bbq_scores(items, pb.bbq_answers(None, tiny_tok, items, "sys", batch_size=8, device="cpu",
                                                   autocast_dtype=None))
    assert bbq(2) == [0.0] * len(items)  # always "unknown": no bias
    first = bbq(0)  # always the first person named: each order once, so no bias overall
    assert first == [1.0 if it["options"][0] == it["stereotyped"] else -1.0 for it in items] and sum(first) == 0
    pairs = pb.load_probe("crows")
    monkeypatch.setattr(pb, "nll_per_row", lambda m, rows, pad, **kw: [(float(i % 2), 1) for i in range(len(rows))])
    assert pb.crows_prefers_stereotype(None, tiny_tok, pairs, batch_size=8, device="cpu", autocast_dtype=None) == \
        [1.0] * len(pairs)  # every stereo sentence (even rows) less surprising


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3] * len(text.split())}


def test_sentence_rows_score_the_first_word():
    rows = pb.sentence_rows(_Tok(), ["Women are x", "Men are x"])
    assert rows[0]["input_ids"] == [1, 3, 3, 3] and rows[0]["labels"] == [-100, 3, 3, 3]


# --- a group column travels from the file to the eval -----------------------------------

def test_group_column_is_carried_only_when_asked_and_not_hashed(tmp_path):
    from tuneforge.config import DataConfig
    from tuneforge.data.builtin import orders

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "dialect": "x" if i % 2 else "y", "email": "a@b.c"}) + "\n"
                            for i, r in enumerate(orders(n=20, seed=1))))
    rows, report = load_rows([str(data)], keep_columns=["dialect"])
    assert [r["_columns"] for r in rows[:2]] == [{"dialect": "y"}, {"dialect": "x"}]
    assert {"dialect", "email"} <= set(report.unknown_fields)
    assert "_columns" not in load_rows([str(data)])[0][0]  # not asked: not kept (nor the email)
    cfg = DataConfig(train=[str(data)], val_size=0, test_size=0.2)
    with_cols, without = build_splits(cfg, 0, keep_columns=["dialect"]), build_splits(cfg, 0)
    assert with_cols.manifest_hash() == without.manifest_hash()
    assert all("_columns" in r for r in with_cols.test)


def test_eval_refuses_an_unknown_group_column_before_loading_weights(tiny_model_dir, tmp_path):
    from tuneforge.data.builtin import orders
    from tuneforge.evaluate.command import EvalOptions, run_eval

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "dialect": "x"}) + "\n" for r in orders(n=6, seed=1)))
    with pytest.raises(DataError, match="'region' is in none of the 6 test rows; their other columns: dialect"):
        run_eval(EvalOptions(target="/no/such/model", data=str(data), fairness="group=region"), Console(quiet=True))


def test_eval_writes_the_fairness_section(tiny_model_dir, tmp_path):
    from tuneforge.data.builtin import orders
    from tuneforge.evaluate.command import EvalOptions, run_eval

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "dialect": "x" if i % 2 else "y"}) + "\n"
                            for i, r in enumerate(orders(n=8, seed=2))))
    # bbq runs through the same likelihood code as crows (test_probe_scoring_reads_the_likelihoods)
    out = run_eval(EvalOptions(target=tiny_model_dir, data=str(data), baseline=tiny_model_dir, out=str(tmp_path / "e"),
                               max_new_tokens=3, batch_size=8, forgetting_texts=0, n_resamples=100,
                               fairness="group=dialect,swap=names,probes=crows"), Console(quiet=True))
    f = json.loads((out / "eval_results.json").read_text())["fairness"]
    under, ref = tiny_model_dir, f"{tiny_model_dir} zero-shot"
    assert f["systems"] == {"under_test": under, "reference": ref}
    assert set(f["slices"]["dialect"][under]["groups"]) == {"x", "y"}
    assert set(f["max_gap"]) >= {"metric", "value", "ci", "flagged"} and f["max_gap"]["metric"] == "json_exact"
    assert f["counterfactual"]["names"]["rows"] == 8 and "tuned_vs_base" in f["counterfactual"]["names"]
    assert f["probes"]["crows"]["pairs"] == 30 and 0 <= f["probes"]["crows"][under]["stereotype_rate"] <= 1
    # the same weights on both sides: the same answers, so no change anywhere
    assert f["probes"]["crows"]["tuned_vs_base"]["delta"] == 0.0
    page = (out / "report.html").read_text()
    assert "<h2>Fairness</h2>" in page and "Slices by dialect" in page and "Probe sets" in page
