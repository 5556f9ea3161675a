"""Chat templates beyond ChatML: Llama-3, Gemma, Mistral and Qwen2.5, each a tiny byte-level
BPE tokenizer carrying the model family's special tokens and the published Jinja template
(tests/fixtures/templates: llama3.jinja from meta-llama/Meta-Llama-3-8B-Instruct, gemma.jinja
from google/gemma-7b-it, mistral.jinja from mistralai/Mixtral-8x7B-Instruct-v0.1, qwen2_5.jinja
from Qwen/Qwen2.5-7B-Instruct).

For each: after tuneforge's tokenizer fixes, the loss covers every assistant turn and the token
that ends it (<|eot_id|>, <end_of_turn>, </s>, <|im_end|>) and nothing else, and generation
(evaluation, serving: both stop at ``tok.eos_token_id``) stops at that token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneforge.data.render import IGNORE, encode_rows, prompt_ids, render_chat
from tests.unit.data.test_render_tools import spans  # the decoded runs of labelled tokens

TEMPLATES = Path(__file__).parents[2] / "fixtures" / "templates"

# name -> (template file, special tokens (bos, eos, pad or None, the others), end-of-turn token,
#          whether the tokenizer itself puts bos first like the real one)
FAMILIES = {
    "llama3": ("llama3.jinja", ("<|begin_of_text|>", "<|end_of_text|>", None,
                                ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]), "<|eot_id|>", True),
    "gemma": ("gemma.jinja", ("<bos>", "<eos>", "<pad>", ["<unk>", "<start_of_turn>", "<end_of_turn>"]),
              "<end_of_turn>", True),
    "mistral": ("mistral.jinja", ("<s>", "</s>", None, ["<unk>"]), "</s>", True),
    "qwen2.5": ("qwen2_5.jinja", (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]), "<|im_end|>", False),
}

CONV = [{"role": "user", "content": "Extract the order: 2 red mugs to Oslo"},
        {"role": "assistant", "content": '{"item": "mug", "qty": 2}'},
        {"role": "user", "content": "and 3 blue pens"},
        {"role": "assistant", "content": '{"item": "pen", "qty": 3}'}]


def build_tokenizer(family: str):
    """A 300-token byte-level BPE with the family's special tokens and published template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path, (bos, eos, pad, others), _, adds_bos = FAMILIES[family]
    specials = [t for t in (bos, eos, pad) if t] + others
    corpus = [m["content"] for m in CONV] + ["system user assistant model You are a helpful assistant. Be brief."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:  # like the real tokenizer: bos first on every encode (the template writes its own)
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **kw)
    tok.chat_template = (TEMPLATES / path).read_text()
    return tok


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path):
    """(name, the tokenizer as tuneforge loads it from a model folder, end-of-turn token)."""
    from transformers import AutoTokenizer

    from tuneforge.models.tokenizer import fix_chat_tokenizer

    build_tokenizer(request.param).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # as models/load.py's load_tokenizer does, then its fixes
    fix_chat_tokenizer(tok)
    return request.param, tok, FAMILIES[request.param][2]


def test_eos_is_the_end_of_turn_token_and_pad_differs(family):
    name, tok, eot = family
    assert tok.eos_token == eot, name
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, name


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_loss_covers_each_assistant_turn_and_its_end_of_turn_token_only(family, system):
    name, tok, eot = family
    enc = encode_rows(tok, [{"messages": CONV}], 512, "error", system_prompt=system)
    ids, labels = enc.rows[0]["input_ids"], enc.rows[0]["labels"]
    assert spans(tok, ids, labels) == [CONV[1]["content"] + eot, CONV[3]["content"] + eot], name
    # The end-of-turn tokens of the other turns (system, user: Llama-3, Gemma, Qwen close them too) are not trained.
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(lab == eot_id for lab in labels) == 2
    if system:  # the system prompt reaches the model, also where the template refuses a system turn
        assert system in tok.decode(ids)
    bos = tok.bos_token_id
    assert bos is None or ids.count(bos) <= 1, f"{name}: bos written twice: {tok.decode(ids[:3])}"


def test_generation_prompt_ends_where_the_trained_turn_starts(family):
    name, tok, _ = family
    ids, labels = render_chat(tok, CONV[:2])
    prompt = prompt_ids(tok, CONV[:2])
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE and labels[len(prompt) - 1] == IGNORE, name


def test_generation_stops_at_the_end_of_turn_token(family):
    """A tiny model that always predicts the end-of-turn token: generation ends after one token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.evaluate.generate import generate_texts
    from tuneforge.models.tokenizer import fix_chat_tokenizer

    name, tok, eot = family
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    fix_chat_tokenizer(tok, model)  # what training, evaluation and serving do with the loaded model
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(eot), name
    model.lm_head = torch.nn.Linear(16, len(tok), bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.convert_tokens_to_ids(eot)] = 10.0
    lengths = []
    generate = model.generate

    def spy(**kw):
        out = generate(**kw)
        lengths.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    model.generate = spy
    texts = generate_texts(model, tok, [prompt_ids(tok, CONV[:2])], max_new_tokens=8, batch_size=1, device="cpu")
    assert lengths == [1] and texts == [""], name


def test_generate_command_renders_prompts_as_training_did(family):
    """`tuneforge generate/chat` build the prompt through the same rendering (system folded in too)."""
    from tuneforge.api import chat_prompt
    from tuneforge.data.render import with_system

    name, tok, _ = family
    system = "You are a helpful assistant."
    assert chat_prompt(tok, system, CONV[:1]) == prompt_ids(tok, with_system(CONV[:2], system)), name
