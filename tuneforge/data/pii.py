"""Find and redact personal data and secrets: typed placeholders (``<EMAIL>``) and counts
per type. Patterns that look like numbers people write for other reasons are validated
before they count: card numbers must pass the Luhn check, IBANs the mod-97 check, IP
addresses must parse, and a secret-looking string must be a known key shape or sit right
after a word such as ``api_key``/``token``/``password``.

Order matters: secrets and emails go first (they contain digit runs that would otherwise
look like phone numbers), then IBANs and cards (long digit runs), then SSNs, phones, IPs.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Literal

from pydantic import Field

from tuneforge.config import Strict
from tuneforge.data.formats import map_texts
from tuneforge.data.manifest import Stage

TYPES = ("SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "SSN", "PHONE", "IP_ADDRESS")


class PIIOptions(Strict):
    action: Literal["redact", "drop", "off"] = Field(
        "redact", description="redact: replace with <TYPE>; drop: remove rows that contain any; off")
    types: list[Literal["SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "SSN", "PHONE", "IP_ADDRESS"]] = list(TYPES)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _phone(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group())
    # International numbers (+CC) have 8-15 digits; without a country code we ask for 10-11
    # (NANP and most national formats), which keeps dates, prices and order numbers out.
    return 8 <= len(digits) <= 15 if m.group().lstrip("(").startswith("+") else 10 <= len(digits) <= 11


def _ip(m: re.Match) -> bool:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return False
    return True


_KEYWORD = r"(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|token|password|passwd|pwd|bearer|private[_-]?key)"
# A number that starts a token (not the digits inside "word123"): every digit-based type needs one.
_NUMBER = re.compile(r"(?<!\w)[\d(+]")
_IBAN_START = re.compile(r"[A-Z]{2}\d\d")
_COLONS = re.compile(r":[0-9A-Fa-f]*:")
_DOT_NUMBER = re.compile(r"\d\.\d")
_KEYWORDS = ("key", "secret", "token", "passw", "pwd", "bearer")

# (type, pattern, validator, group to replace, hint). A hint is a cheap test on (text, lower-cased
# text, whether a number starts a token) that must hold for the pattern to match at all; it
# skips most regex scans on ordinary text.
PATTERNS: list[tuple] = [
    ("SECRET", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), None, 0, lambda t, lo, num: "AKIA" in t or "ASIA" in t),
    ("SECRET", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"), None, 0, lambda t, lo, num: "sk-" in t),
    ("SECRET", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"), None, 0,
     lambda t, lo, num: "_" in t),
    ("SECRET", re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"), None, 0, lambda t, lo, num: "xox" in t),
    # A long hex/base64 value right after a key word: "api_key=...", "token: ...", "password is ..."
    ("SECRET", re.compile(rf"(?i)\b{_KEYWORD}\b[\"']?\s*(?:[:=]|is|was)?\s*[\"']?([A-Za-z0-9+/_\-]{{16,}}={{0,2}})"),
     lambda m: bool(re.search(r"\d", m.group(1)) and re.search(r"[A-Za-z]", m.group(1))), 1,
     lambda t, lo, num: any(k in lo for k in _KEYWORDS)),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"), None, 0,
     lambda t, lo, num: "@" in t),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
     lambda m: iban_ok(m.group()), 0, lambda t, lo, num: _IBAN_START.search(t)),
    ("CREDIT_CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card, 0, lambda t, lo, num: num),
    ("SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"), None, 0,
     lambda t, lo, num: num and "-" in t),
    ("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]\d{2,4}){1,4}(?![\w\-])"
                         r"|(?<![\w+])\+\d{8,15}\b"), _phone, 0, lambda t, lo, num: num),
    ("IP_ADDRESS", re.compile(r"(?<![\w.:])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
                              r"|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ip, 0,
     lambda t, lo, num: (":" in t and _COLONS.search(t)) or (num and "." in t and _DOT_NUMBER.search(t))),
]


def redact(text: str, types=TYPES) -> tuple[str, Counter]:
    """The text with each finding replaced by ``<TYPE>``, and the count per type."""
    counts: Counter = Counter()
    lower, num = text.lower(), _NUMBER.search(text) is not None
    for kind, pattern, valid, group, hint in PATTERNS:
        if kind not in types or not hint(text, lower, num):
            continue

        def sub(m: re.Match, kind=kind, valid=valid, group=group) -> str:
            if valid is not None and not valid(m):
                return m.group()
            counts[kind] += 1
            whole, start = m.group(), m.start(group) - m.start()
            return whole[:start] + f"<{kind}>" + whole[start + len(m.group(group)):]

        text = pattern.sub(sub, text)
    return text, counts


def pii_rows(rows: list[dict], opts: PIIOptions) -> tuple[list[dict], Stage]:
    stage = Stage("pii", input=len(rows), info={"action": opts.action, "types": list(opts.types)})
    found: Counter = Counter()
    out = []
    for row in rows:
        counts: Counter = Counter()

        def one(s: str) -> str:
            new, c = redact(s, opts.types)
            counts.update(c)
            return new

        new = map_texts(row, one)
        found.update(counts)
        if not counts:
            out.append(row)
        elif opts.action == "drop":
            stage.drop("contains personal data", f"{row.get('_where', '?')}: {dict(counts)}")
        else:
            stage.changed["rows redacted"] += 1
            stage.note("rows redacted", f"{row.get('_where', '?')}: {dict(counts)}")
            out.append(new)
    stage.info["found"] = dict(found)
    stage.kept = len(out)
    return out, stage.check()
