"""Forgetting probe: perplexity on general-domain English before and after tuning.

The text is real dialogue from ``chatterbot-corpus`` (BSD, on PyPI, read offline from the
installed package): fine-tuning on one narrow task should not make the model much worse
at ordinary language. A relative perplexity increase beyond the threshold is flagged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml


class ProbeUnavailable(RuntimeError):
    pass


def general_texts(n: int = 200, language: str = "english") -> list[str]:
    """Up to ``n`` question/answer exchanges, in a fixed order (files sorted by name)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ProbeUnavailable("the forgetting probe needs its text: pip install chatterbot-corpus==1.3.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    texts: list[str] = []
    for f in sorted(folder.glob("*.yml")):
        for conv in (yaml.safe_load(f.read_text()) or {}).get("conversations", []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            if len(turns) >= 2:
                texts.append("\n".join(turns))
    # A stride (rather than the first n) spreads the sample over every topic file.
    stride = max(1, len(texts) // n)
    return texts[::stride][:n]


def forgetting_verdict(ppl_before: float, ppl_after: float, threshold: float) -> dict:
    """Relative change in perplexity; ``flagged`` when it grew by more than ``threshold``."""
    change = ppl_after / ppl_before - 1
    return {"perplexity_before": ppl_before, "perplexity_after": ppl_after, "relative_change": change,
            "threshold": threshold, "flagged": change > threshold}
