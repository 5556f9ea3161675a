"""Tool-calling metrics on generated text: did the model call when it should (and not when it
should not), the right function, with arguments that parse, fit the function's JSON schema and
equal the reference's. Pure functions; each per-example score is 0/1 or a share in [0, 1].

Which turn is scored: the FIRST assistant turn after the last user message (a call or a
plain answer). ``answer_after_tool`` separately scores the final answer of rows that have one
after a tool result, with the reference call and result in the prompt.
"""

from __future__ import annotations

from collections import Counter

import jsonschema

from tuneforge.data.tools import parse_tool_calls

# Per-example scores of the scored turn; each is defined on a subset of the rows (see ``applies``).
NEEDED_METRICS = ("tool_call_rate_when_needed", "function_name_accuracy", "arguments_valid_json",
                  "arguments_exact", "argument_accuracy")
NOT_NEEDED_METRICS = ("no_call_when_not_needed",)


def is_tool_row(row: dict) -> bool:
    """A row about tools: it offers tools, or a turn calls one / is a tool result."""
    return bool(row.get("tools")) or any(m.get("tool_calls") or m["role"] == "tool" for m in row.get("messages", ()))


def scored_turn(messages: list[dict]) -> int:
    """Index of the first assistant turn after the last user message."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return next(i for i in range(last_user + 1, len(messages)) if messages[i]["role"] == "assistant")


def has_answer_after_tool(messages: list[dict]) -> bool:
    """The conversation ends with a plain assistant answer that follows a tool result."""
    last = messages[-1]
    return (last["role"] == "assistant" and bool(last["content"].strip()) and not last.get("tool_calls")
            and any(m["role"] == "tool" for m in messages[scored_turn(messages):]))


def norm_value(v):
    """Numbers compared by value (3 == 3.0), recursively; booleans stay booleans."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        return {k: norm_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [norm_value(x) for x in v]
    return v


def ref_calls(message: dict) -> list[dict]:
    """A reference assistant message's calls as ``{"name", "arguments"}``."""
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message.get("tool_calls") or ()]


def predicted_calls(text: str, names: set[str]) -> tuple[list[dict], list[str]]:
    """(well-formed calls, why each broken call block failed). A reply attempted a call when
    either is non-empty: a call block, even a broken one, or a bare JSON call to an offered
    function (small models drop the tags)."""
    _, calls, errors = parse_tool_calls(text)
    if not calls and not errors:
        _, calls, errors = parse_tool_calls(text, names)
    return calls, errors


def schema_valid(call: dict, tools: list[dict]) -> bool:
    """The call names an offered function and its arguments fit that function's parameters."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if call["name"] not in params:
        return False
    try:
        jsonschema.validate(call["arguments"], params[call["name"]])
    except jsonschema.ValidationError:
        return False
    return True


def _key(call: dict) -> tuple:
    return call["name"], repr(sorted(norm_value(call["arguments"]).items()))


def argument_share(pred: list[dict], ref: list[dict]) -> float:
    """Per reference call, the predicted call of that name: arguments equal in value over the
    union of both argument names (a missing or an invented argument counts wrong)."""
    by_name = {c["name"]: c for c in pred}
    right = total = 0
    for r in ref:
        p = by_name.get(r["name"], {"arguments": {}})["arguments"]
        keys = set(r["arguments"]) | set(p)
        total += len(keys)
        right += sum(k in p and k in r["arguments"] and norm_value(p[k]) == norm_value(r["arguments"][k]) for k in keys)
    return right / total if total else float(bool(by_name.keys() >= {r["name"] for r in ref}))


def call_scores(pred_text: str, reference: dict, tools: list[dict]) -> dict[str, float]:
    """Scores of one generated turn against the reference assistant message (with or without
    ``tool_calls``). Keys: ``NEEDED_METRICS`` when the reference calls, else ``NOT_NEEDED_METRICS``;
    plus ``first_turn_correct`` (the right decision, and when calling: exactly the right calls)."""
    names = {t["function"]["name"] for t in tools}
    calls, errors = predicted_calls(pred_text, names)
    attempted = bool(calls or errors)
    ref = ref_calls(reference)
    if not ref:
        return {"no_call_when_not_needed": float(not attempted), "first_turn_correct": float(not attempted)}
    exact = Counter(map(_key, calls)) == Counter(map(_key, ref))
    return {"tool_call_rate_when_needed": float(attempted),
            "function_name_accuracy": float(sorted(c["name"] for c in calls) == sorted(c["name"] for c in ref)),
            "arguments_valid_json": float(bool(calls) and not errors and all(schema_valid(c, tools) for c in calls)),
            "arguments_exact": float(exact),
            "argument_accuracy": argument_share(calls, ref),
            "first_turn_correct": float(exact)}


def tool_task_scores(preds: list[str], references: list[dict], tools: list[list[dict]]) -> dict[str, list[float]]:
    """Per metric, the per-example scores over the rows it applies to (the same rows for every
    model, as the reference decides: paired comparisons line up)."""
    per: dict[str, list[float]] = {}
    for p, r, t in zip(preds, references, tools):
        for k, v in call_scores(p, r, t).items():
            per.setdefault(k, []).append(v)
    return per
