"""The vision recipe on a tiny LLaVA: the loss falls on the assistant tokens only (never on an
image placeholder), the vision tower stays frozen unless made trainable, and what a vision run
cannot honour is refused by the config validator with the reason."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import ConfigError, VisionOptions
from tuneforge.data.load import load_rows
from tuneforge.methods.lora import LoraOptions
from tuneforge.models.vision import find_parts, image_token_ids, load_processor, load_vision_model
from tuneforge.plugins import validate_config
from tuneforge.train.recipes.vision import apply_lora, collate, encode_row, encode_rows, token_loss_sum


@pytest.fixture(scope="module")
def proc(tiny_vlm_dir):
    return load_processor(tiny_vlm_dir)


def test_labels_cover_the_answer_and_never_an_image_token(proc, shapes):
    rows, _ = load_rows([str(shapes["llava"])], kind="vision")
    image_ids = image_token_ids(proc)
    assert image_ids == {proc.tokenizer.convert_tokens_to_ids("<image>")}
    ids, labels = encode_row(proc, rows[0]["messages"], image_ids)
    placeholders = [i for i, t in enumerate(ids) if t in image_ids]
    assert len(placeholders) == 16  # 32x32 image, 8x8 patches: 16 placeholder tokens, all masked
    assert all(labels[i] == -100 for i in placeholders)
    trained = [t for t, y in zip(ids, labels) if y != -100]
    answer = rows[0]["messages"][-1]["content"][0]["text"]
    assert proc.tokenizer.decode(trained) == answer + "<|im_end|>\n"  # the answer through its end of turn
    # A (malformed) template that put an image in the answer could not leak it into the loss either.
    batch = collate(proc, encode_rows(proc, rows[:3], 128, "drop", 8).rows)
    assert not ((batch["labels"] != -100) & torch.isin(batch["input_ids"], torch.tensor(sorted(image_ids)))).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding is never trained


def _train_steps(tiny_vlm_dir, proc, shapes, vopts: VisionOptions, steps: int = 2):
    torch.manual_seed(0)
    rows, _ = load_rows([str(shapes["llava"])], kind="vision")
    enc = encode_rows(proc, rows[:8], 128, "drop", 8).rows
    model = load_vision_model(tiny_vlm_dir, torch.float32, "cpu")
    names = [n for n, _ in model.named_modules() if n]
    parts = find_parts(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = apply_lora(model, LoraOptions(r=4, alpha=8, dropout=0.0), parts, vopts)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for s in range(steps):
        loss, n = token_loss_sum(model, collate(proc, enc[4 * (s % 2): 4 * (s % 2) + 4]))
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    # The weights the forward pass uses: peft's trained copy where the module is trained in full.
    merged = model.merge_and_unload()
    after = dict(merged.named_parameters())
    changed = {n for n, w in before.items() if not torch.equal(w, after[n].detach())}
    return parts, changed


def _under(names, prefix):
    return {n for n in names if n.startswith(prefix + ".")}


def test_vision_tower_frozen_by_default_and_trained_when_asked(tiny_vlm_dir, proc, shapes):
    parts, changed = _train_steps(tiny_vlm_dir, proc, shapes, VisionOptions())
    assert parts.vision == "model.vision_tower" and parts.projector == "model.multi_modal_projector"
    assert not _under(changed, parts.vision) and not _under(changed, parts.projector)
    assert _under(changed, parts.language)  # the LoRA updates, merged, moved the language model only

    parts, changed = _train_steps(tiny_vlm_dir, proc, shapes, VisionOptions(train_vision_tower=True,
                                                                              train_projector=True))
    assert _under(changed, parts.vision) and _under(changed, parts.projector) and _under(changed, parts.language)


def test_what_a_vision_run_cannot_do_is_refused_with_the_reason(tiny_vlm_dir, tmp_path):
    base = {"model": {"name": tiny_vlm_dir, "kind": "vision"}, "data": {"train": ["x.jsonl"]}}
    cfg = validate_config(base)
    assert cfg.model.kind == "vision" and cfg.model.vision is None
    bad = {**base, "method": {"name": "ia3"}, "objective": {"name": "dpo"},
           "data": {"train": ["x.jsonl"], "packing": True, "overlength": "truncate"}}
    with pytest.raises(ConfigError) as e:
        validate_config(bad)
    msg = str(e.value)
    for expected in ("method 'ia3' with model.kind=vision", "objective 'dpo' with model.kind=vision",
                     "data.packing with model.kind=vision", "data.overlength=truncate with model.kind=vision: "
                     "truncating a row can cut its image tokens"):
        assert expected in msg
    with pytest.raises(ConfigError, match="model.vision is set but model.kind is text"):
        validate_config({"model": {"name": tiny_vlm_dir, "vision": {"train_projector": True}},
                         "data": {"train": ["x.jsonl"]}})


def test_the_vision_example_validates():
    from pathlib import Path

    from tuneforge.plugins import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "examples" / "vision.yaml")
    assert cfg.model.kind == "vision" and cfg.model.name == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert cfg.model.vision.train_vision_tower is False and cfg.method.name == "lora"


def test_idefics3_family_split_images_are_never_trained(shapes, tmp_path):
    """SmolVLM's family: each image is tiles + a global view, written with row/column and
    around-image tokens; none of them is trained, the answer is, and the batch runs."""
    from vision_helpers import build_tiny_idefics3

    from tuneforge.models.vision import meta_vision_module_names

    model_dir = str(build_tiny_idefics3(tmp_path))
    proc = load_processor(model_dir)
    ids_image = image_token_ids(proc)
    tok = proc.tokenizer
    assert {tok.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>", "<global-img>",
                                                    "<row_1_col_1>")} <= ids_image
    parts = find_parts(meta_vision_module_names(model_dir))
    assert (parts.vision, parts.projector, parts.language) == ("model.vision_model", "model.connector",
                                                              "model.text_model")
    rows, _ = load_rows([str(shapes["chat"])], kind="vision")
    enc = encode_rows(proc, rows[:2], 1024, "drop", 8).rows
    batch = collate(proc, enc)
    assert batch["pixel_values"].shape[1] == 5  # 4 tiles + the global view
    trained = batch["labels"] != -100
    assert not (trained & torch.isin(batch["input_ids"], torch.tensor(sorted(ids_image)))).any()
    answer = rows[0]["messages"][-1]["content"][0]["text"]
    assert tok.decode(batch["input_ids"][0][trained[0]]) == answer + "<|im_end|>\n"
    model = apply_lora(load_vision_model(model_dir, torch.float32, "cpu"), LoraOptions(r=4), parts, VisionOptions())
    loss, n = token_loss_sum(model, batch)
    assert n == int(trained[:, 1:].sum()) and torch.isfinite(loss)


def test_system_prompt_is_rendered_and_data_messages_refused(proc, shapes, tiny_vlm_dir):
    from tuneforge.train.recipes.vision import prompted

    rows, _ = load_rows([str(shapes["llava"])], kind="vision")
    (row,) = encode_rows(proc, prompted(rows[:1], "Name the shape."), 128, "drop", 8).rows
    assert proc.tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nName the shape.<|im_end|>")
    with pytest.raises(ConfigError, match="data.messages with model.kind=vision"):
        validate_config({"model": {"name": tiny_vlm_dir, "kind": "vision"},
                         "data": {"train": ["x.jsonl"], "messages": {"field": "chat"}}})
