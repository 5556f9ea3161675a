"""PII: true positives with typed placeholders, and the look-alikes that must stay."""

import pytest

from tuneforge.data.pii import PIIOptions, iban_ok, luhn_ok, pii_rows, redact


@pytest.mark.parametrize("text,expected,kind", [
    ("write to jane.doe+news@mail.example.co.uk today", "write to <EMAIL> today", "EMAIL"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "PHONE"),
    ("call (555) 123-4567 now", "call <PHONE> now", "PHONE"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "CREDIT_CARD"),
    ("card 5500-0000-0000-0004.", "card <CREDIT_CARD>.", "CREDIT_CARD"),
    ("iban GB82 WEST 1234 5698 7654 32 ok", "iban <IBAN> ok", "IBAN"),
    ("iban DE89370400440532013000", "iban <IBAN>", "IBAN"),
    ("from 192.168.0.12 via", "from <IP_ADDRESS> via", "IP_ADDRESS"),
    ("host 2001:db8::ff00:42:8329 up", "host <IP_ADDRESS> up", "IP_ADDRESS"),
    ("ssn 078-05-1120.", "ssn <SSN>.", "SSN"),
    ("key AKIAIOSFODNN7EXAMPLE", "key <SECRET>", "SECRET"),
    ("use sk-proj-abcDEF1234567890abcdef1234 here", "use <SECRET> here", "SECRET"),
    ("token ghp_" + "aB3" * 12 + " x", "token <SECRET> x", "SECRET"),
    ('api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', 'api_key = "<SECRET>"', "SECRET"),
])
def test_detects_and_redacts(text, expected, kind):
    out, counts = redact(text)
    assert out == expected and counts == {kind: 1}


@pytest.mark.parametrize("text", [
    "card 1234 5678 9012 3456 fails Luhn",     # 16 digits, not a card
    "order 4111111111111112 shipped",          # Luhn-invalid
    "iban GB82 WEST 1234 5698 7654 33 typo",   # mod-97 fails
    "meet on 2024-01-15 at 12:30:45",          # date and time
    "version 1.2.3 and 999.1.1.1",             # not an address
    "price $1,299.99 for 3 items",
    "order number 12345678",
    "ssn-like 000-12-3456 and 666-12-3456",    # invalid SSN areas
    "the token is short",
    "commit 3f2a9c1 on main",
])
def test_look_alikes_are_left_alone(text):
    assert redact(text) == (text, {})


def test_validators():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_rows_redact_or_drop_with_counts():
    rows = [{"text": "mail a@b.io or c@d.io", "_where": "f:1"}, {"text": "nothing here", "_where": "f:2"},
            {"messages": [{"role": "user", "content": "ip 10.0.0.1"}, {"role": "assistant", "content": "ok"}],
             "_where": "f:3"}]
    out, st = pii_rows(rows, PIIOptions())
    assert out[0]["text"] == "mail <EMAIL> or <EMAIL>" and out[2]["messages"][0]["content"] == "ip <IP_ADDRESS>"
    assert st.info["found"] == {"EMAIL": 2, "IP_ADDRESS": 1} and st.changed["rows redacted"] == 2
    out, st = pii_rows(rows, PIIOptions(action="drop"))
    assert [r["_where"] for r in out] == ["f:2"] and st.dropped == {"contains personal data": 2}
    out, st = pii_rows(rows, PIIOptions(types=["IP_ADDRESS"]))
    assert out[0]["text"] == rows[0]["text"] and st.info["found"] == {"IP_ADDRESS": 1}
