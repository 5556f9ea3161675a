"""Cleaning: normalisation, control characters, whitespace, length and language filters."""

from tuneforge.data.clean import CleanOptions, clean_rows, clean_text


def sft(user, answer, where="f:1"):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "_where": where}


def test_nfc_and_nfkc():
    decomposed = "cafe\u0301"  # e + combining acute
    assert clean_text(decomposed, CleanOptions()) == "caf\u00e9"
    assert clean_text("\uff21\ufb01 x\u00b2", CleanOptions(normalize="NFKC")) == "Afi x2"
    assert clean_text("\uff21", CleanOptions(normalize="NFC")) == "\uff21"  # NFC keeps compatibility forms


def test_control_zero_width_and_whitespace():
    s = "  hello\u200b\x00 \t  world\r\n\n\n\nnext\u00a0 line  "
    assert clean_text(s, CleanOptions()) == "hello world\n\nnext line"
    assert clean_text(s, CleanOptions(control_chars=False, whitespace=False)) == s


def test_filters_count_every_drop_and_keep_roles():
    rows = [sft("Hello there", "General Kenobi"), sft("x", " \u200b "), sft("short", "y"),
            sft("a" * 50, "b" * 50, "f:4")]
    out, st = clean_rows(rows, CleanOptions(min_chars=8, max_chars=60))
    assert [r["_where"] for r in out] == ["f:1"]
    assert st.dropped == {"empty after cleaning": 1, "shorter than min_chars": 1, "longer than max_chars": 1}
    assert st.input == st.kept + sum(st.dropped.values())
    assert out[0]["messages"][0]["role"] == "user"


def test_language_filter():
    rows = [{"text": "The quick brown fox jumps over the lazy dog near the river bank.", "_where": "f:1"},
            {"text": "Le renard brun rapide saute par-dessus le chien paresseux près de la rivière.", "_where": "f:2"}]
    out, st = clean_rows(rows, CleanOptions(languages=["en"]))
    assert [r["_where"] for r in out] == ["f:1"]
    assert st.dropped == {"language not in en": 1} and "detected 'fr'" in st.examples["language not in en"][0]


def test_changed_rows_are_counted():
    out, st = clean_rows([{"text": "a  b"}, {"text": "c"}], CleanOptions())
    assert st.changed["normalised"] == 1 and out[0]["text"] == "a b"
