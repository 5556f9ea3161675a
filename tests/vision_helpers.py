"""A tiny vision-language model built from config, and generated image data (no download).

The VLM is a LLaVA: a 2-layer CLIP vision tower on 32x32 images (16 patches of 8x8), a
two-layer projector and the tiny 2-layer Llama of conftest.build_tiny, whose tokenizer gets an
``<image>`` token; the processor expands each ``<image>`` into 16 placeholder tokens.
"""

from __future__ import annotations

import json
from pathlib import Path



def build_tiny(out_dir):
    """tests/conftest.py's tiny Llama + tokenizer (loaded by path: ``conftest`` names the nearest one)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tests_conftest", Path(__file__).parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny(out_dir)

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_vlm(out_dir):
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    text_dir = build_tiny(out_dir / "text")
    tok = AutoTokenizer.from_pretrained(text_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = TEMPLATE
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    model_dir = out_dir / "vlm"
    LlavaForConditionalGeneration(cfg).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    return model_dir


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ("square", "circle")


def make_shapes(folder, n: int = 24, seed: int = 0) -> dict[str, Path]:
    """Coloured shapes on white, captioned "a red circle" etc.: the same rows as LLaVA-shaped
    ``train.jsonl`` (conversations + image, paths relative to the file) and OpenAI-shaped
    ``chat.jsonl`` (image_url parts)."""
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    llava, chat = [], []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (48, 48), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        x, y, r = rng.randint(14, 34), rng.randint(14, 34), rng.randint(8, 12)
        (draw.rectangle if shape == "square" else draw.ellipse)([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
        name = f"images/{i:03d}-{colour}-{shape}.png"
        img.save(folder / name)
        caption = f"a {colour} {shape}"
        llava.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": caption}]})
        chat.append({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": name}},
                                         {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": caption}]})
    paths = {"llava": folder / "train.jsonl", "chat": folder / "chat.jsonl"}
    paths["llava"].write_text("".join(json.dumps(r) + "\n" for r in llava))
    paths["chat"].write_text("".join(json.dumps(r) + "\n" for r in chat))
    return paths


def build_tiny_idefics3(out_dir):
    """A tiny Idefics3 (SmolVLM's family): a 2-layer SigLIP-style vision model, the pixel-shuffle
    connector and a 2-layer Llama; images are split into 32px tiles plus a global view, each
    written as <fake_token_around_image><row_i_col_j> + 4 <image> tokens."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(build_tiny(out_dir / "text"))
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<global-img>",
                                                          "<end_of_utterance>"]})
    tok.add_tokens([f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    tok.chat_template = TEMPLATE
    images = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                    do_image_splitting=True)
    proc = Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=TEMPLATE, image_seq_len=4)
    torch.manual_seed(0)
    cfg = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    model_dir = out_dir / "idefics3"
    Idefics3ForConditionalGeneration(cfg).save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    return model_dir
