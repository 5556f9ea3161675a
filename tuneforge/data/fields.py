"""Row fields that carry meaning: when the chosen format does not read one, training
without it would silently lose what the data says (KTO labels trained as SFT, preference
pairs as a chat, tool schemas dropped), so loading stops and says what trains it and how
to opt out (``data.ignore_fields``)."""

from __future__ import annotations

# Fields that carry meaning a format of the chosen kind cannot use: loading stops rather than
# train without it. field -> (what it is, what trains it, what ignoring it means, kinds refused;
# None = wherever no format reads it).
MEANINGFUL = {
    "kto_tag": ("desirable/undesirable answers", "objective.name=kto (`--task unpaired`)",
                "train every row's answer as SFT", None),
    "label": ("desirable/undesirable answers", "objective.name=kto (`--task unpaired`)",
              "train every row's answer as SFT", {"sft", "preference", "unpaired"}),
    "chosen": ("preference pairs", "a preference objective (objective.name=dpo, `--task preference`)",
               "train only the conversation", None),
    "rejected": ("preference pairs", "a preference objective (objective.name=dpo, `--task preference`)",
                 "train only the conversation", None),
    "tools": ("function schemas", "objective sft on chat rows (`--task sft`)", "train without them", None),
    "functions": ("function schemas", "objective sft on chat rows (`--task sft`)", "train without them", None),
    "weight": ("which answers are trained", "objective sft on chat rows (`--task sft`)",
               "train every row in full", {"classification", "text"}),
    "segments": ("per-segment training", "objective sft (Axolotl input_output rows)", "drop it", None),
    "images": ("images", "a vision-language run (model.kind=vision, a VLM as model.name)", "train the text alone",
               None),
    "image": ("an image (LLaVA rows)", "a vision-language run (model.kind=vision, a VLM as model.name)",
              "train the text alone", None),
    "videos": ("videos", "a vision model trainer (tuneforge does not train vision yet)", "train the text alone", None),
    "audios": ("audio", "an audio model trainer (tuneforge does not train audio yet)", "train the text alone", None),
}


def unread_field(keys, consumed: set[str], fmt: str, kind: str) -> str | None:
    """The problem with the first meaningful field (in MEANINGFUL's order) a row carries and
    its format does not read, or None."""
    for name in (n for n in MEANINGFUL if n in keys and n not in consumed):
        what, who, ignoring, kinds = MEANINGFUL[name]
        if kinds is None or kind in kinds:
            return (f"rows carry '{name}' ({what}) that the {fmt} format ({kind} rows) does not read: train them "
                    f"with {who}, or set data.ignore_fields=[{name}] (--ignore-field {name}) to {ignoring}")
    return None
