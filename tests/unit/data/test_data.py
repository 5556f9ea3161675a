import json

import pytest

from tuneforge.data.load import DataError, load_rows
from tuneforge.data.prepare import build_splits, split_by_prompt
from tuneforge.config import DataConfig


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bad_rows_are_counted_with_file_line_and_field(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "a"},  # missing output
        {"instruction": "a", "output": "   "},  # empty output
        {"instruction": 3, "output": "x"},  # wrong type
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"instruction": "trunc'
    path = write(tmp_path, "d.jsonl", text)
    kept, rep = load_rows([path])
    assert len(kept) == 1 and kept[0]["_where"] == f"{path}:1"
    assert rep.read == 5 and rep.kept + sum(rep.dropped.values()) == rep.read
    assert rep.dropped["output: missing"] == 1
    assert rep.dropped["output: empty"] == 1
    assert rep.dropped["instruction: expected str, got int"] == 1
    assert any("truncated last line" in k for k in rep.dropped)
    assert f"{path}:2: field 'output': missing" in rep.examples["output: missing"][0]


def test_strict_fails_on_first_bad_row(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'output': missing"):
        load_rows([path], strict=True)


def test_chat_format_checks_roles_and_last_turn(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad_role = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    path = write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in (good, bad_role, no_answer)))
    kept, rep = load_rows([path])
    assert rep.format == "chat" and len(kept) == 1
    assert rep.dropped["messages: unknown role"] == 1
    assert rep.dropped["messages: conversation does not end with an assistant turn"] == 1


def test_csv_ragged_row_and_column_mapping(tmp_path):
    path = write(tmp_path, "d.csv", "question,answer\nq1,a1\nq2,a2,extra\n")
    kept, rep = load_rows([path], columns={"prompt": "question", "completion": "answer"})
    assert rep.format == "prompt_completion" and len(kept) == 1
    assert rep.dropped["row: ragged row"] == 1


def test_sharegpt_and_json_array(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    kept, rep = load_rows([write(tmp_path, "d.json", json.dumps(rows))])
    assert rep.format == "sharegpt"
    assert kept[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_clear_errors_for_missing_empty_unknown_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows([str(tmp_path / "none.jsonl")])
    with pytest.raises(DataError, match="empty"):
        load_rows([write(tmp_path, "e.jsonl", "")])
    with pytest.raises(DataError, match="no known format fits"):
        load_rows([write(tmp_path, "u.jsonl", '{"foo": 1}\n')])
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8"):
        load_rows([str(p)])
    with pytest.raises(DataError, match="no usable rows"):
        load_rows([write(tmp_path, "bad.jsonl", '{"instruction": "a"}\n{"instruction": "a", "output": ""}\n')])


def test_split_is_seeded_disjoint_and_keeps_duplicate_prompts_together():
    rows = [{"messages": [{"role": "user", "content": f"q{i % 40}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(200)]
    a = split_by_prompt(rows, [0.1, 0.1], seed=1)
    b = split_by_prompt(rows, [0.1, 0.1], seed=1)
    assert a == b
    assert sum(map(len, a)) == 200
    prompts = [{r["messages"][0]["content"] for r in part} for part in a]
    assert not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2]) and not (prompts[0] & prompts[1])
    assert split_by_prompt(rows, [0.1, 0.1], seed=2) != a


def test_build_splits_from_builtin():
    s = build_splits(DataConfig(train=["builtin:orders?n=100&seed=0"], val_size=0.1, test_size=0.2), seed=0)
    assert (len(s.train), len(s.validation), len(s.test)) == (70, 10, 20)
    assert len(s.manifest_hash()) == 64
    with pytest.raises(DataError, match="unknown built-in task"):
        build_splits(DataConfig(train=["builtin:nope"]), seed=0)


def test_split_of_classification_rows_gives_each_part_its_share_of_every_label():
    # 10 distinct "rare" texts each repeated 20 times, 100 distinct "common" ones: unstratified,
    # whole groups of 20 decide the held-out mix; per label, each part gets about its share.
    rows = [{"text": f"rare {i % 10}", "label": "rare"} for i in range(200)]
    rows += [{"text": f"common {i}", "label": "common"} for i in range(100)]
    val, test, train = split_by_prompt(rows, [0.1, 0.2], seed=0)
    count = lambda part, label: sum(r["label"] == label for r in part)  # noqa: E731
    assert (count(val, "common"), count(test, "common"), count(train, "common")) == (10, 20, 70)
    assert (count(val, "rare"), count(test, "rare"), count(train, "rare")) == (20, 40, 140)
    assert not {r["text"] for r in test} & {r["text"] for r in train}  # equal prompts stay together


def test_chatterbot_topics_keeps_each_opener_once_and_drops_ambiguous_ones():
    from tuneforge.data.builtin import topic_rows

    convs = [("support", ["My printer is not printing.", "Restart it."])] * 50
    convs += [("support", ["my  printer is NOT printing.", "Check the paper."])]  # same opener up to case/spacing
    convs += [("support", [f"Ticket {i}", "ok"]) for i in range(3)]
    convs += [("greetings", ["Hello", "Hi"]), ("chat", ["Hello", "Hey there"])]
    convs += [("chat", [f"How was day {i}?", "fine"]) for i in range(4)]
    rows, stats = topic_rows(convs, min_count=4)
    assert sorted((r["label"], r["text"]) for r in rows) == sorted(
        [("support", "My printer is not printing.")] + [("support", f"Ticket {i}") for i in range(3)]
        + [("chat", f"How was day {i}?") for i in range(4)])
    assert stats["conversations_with_a_repeated_opener"] == 51 and stats["openers_under_several_categories"] == 1
    assert stats["categories_kept"] == {"chat": 4, "support": 4}
    assert stats["categories_below_min_count"] == {} and stats["rows"] == 8


def test_training_on_raw_files_redacts_or_drops_personal_data_and_counts_it(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"mail me at jo{i}@example.com" if i < 3 else f"hi {i}"},
                          {"role": "assistant", "content": "ok"}]} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = str(tmp_path / "t.jsonl")

    s = build_splits(DataConfig(train=[spec], val_size=0, test_size=0), seed=0)  # default: redact
    texts = [r["messages"][0]["content"] for r in s.train]
    assert len(s.train) == 20 and not any("@example.com" in t for t in texts)
    assert sum("<EMAIL>" in t for t in texts) == 3
    assert s.pii["train"]["info"]["found"] == {"EMAIL": 3} and s.pii["train"]["changed"] == {"rows redacted": 3}

    dropped = build_splits(DataConfig(train=[spec], val_size=0, test_size=0, pii="drop"), seed=0)
    assert len(dropped.train) == 17 and dropped.pii["train"]["dropped"] == {"contains personal data": 3}

    kept = build_splits(DataConfig(train=[spec], val_size=0, test_size=0, pii="off"), seed=0)
    assert sum("@example.com" in r["messages"][0]["content"] for r in kept.train) == 3 and kept.pii == {}
