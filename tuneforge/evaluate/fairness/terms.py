"""Term lists: which group a text mentions, and the text with every group's terms swapped
for the next group's (whole words only, the case of each occurrence kept).

Hand-written on ``re`` rather than a library: the swap must be simultaneous (he -> she and
she -> he in one pass, so "he told her" becomes "she told him", not "she told she"), which
one alternation with a replacement function gives directly."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources

import yaml

BUILTIN_FILE = "terms.yaml"


def builtin_lists() -> dict[str, dict[str, list[str]]]:
    """The term lists shipped in the package (terms.yaml beside this module)."""
    return yaml.safe_load(resources.files(__package__).joinpath(BUILTIN_FILE).read_text(encoding="utf-8"))


def cased_like(source: str, replacement: str) -> str:
    """``replacement`` written in the case of ``source``: HE -> SHE, He -> She, he -> she."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    if source.islower():
        return replacement.lower()
    return replacement


@dataclass(frozen=True)
class TermList:
    """One list: group -> terms, aligned by position across groups."""
    name: str
    groups: dict[str, list[str]]

    @cached_property
    def _pattern(self) -> re.Pattern:
        terms = sorted({t for ts in self.groups.values() for t in ts}, key=len, reverse=True)
        # (?<!\w)...(?!\w) rather than \b: a whole word even where a term starts or ends with a
        # non-word character; longest first, so "Mr" never wins over "Mrs" were both listed.
        return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", re.IGNORECASE)

    @cached_property
    def _owner(self) -> dict[str, str]:
        return {t.lower(): g for g, ts in self.groups.items() for t in ts}

    @cached_property
    def _swap(self) -> dict[str, str]:
        """lower-case term -> its counterpart in the next group (first position wins for a
        term listed twice in one group, like "her" for him and his)."""
        names = list(self.groups)
        out: dict[str, str] = {}
        for i, g in enumerate(names):
            nxt = self.groups[names[(i + 1) % len(names)]]
            for pos, t in enumerate(self.groups[g]):
                out.setdefault(t.lower(), nxt[pos])
        return out

    def mentioned(self, text: str) -> set[str]:
        """The groups whose terms occur in ``text`` as whole words."""
        return {self._owner[m.group(0).lower()] for m in self._pattern.finditer(text)}

    def swap(self, text: str) -> str:
        return self._pattern.sub(lambda m: cased_like(m.group(0), self._swap[m.group(0).lower()]), text)


def term_lists(names: list[str], user: dict[str, dict[str, list[str]]]) -> dict[str, TermList]:
    """The lists ``names`` asks for: the user's (eval.fairness.terms) first, then the built-in
    ones; an unknown name is refused with the lists that exist."""
    known = builtin_lists() | user
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown term list(s) {', '.join(unknown)}: the lists are {', '.join(sorted(known))} "
                         "(add your own under eval.fairness.terms or in a YAML file given as terms=FILE)")
    return {n: TermList(n, known[n]) for n in names}
