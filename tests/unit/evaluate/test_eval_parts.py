"""Loss/perplexity, forgetting probe, in-context prompts, retrieval, costs, reports."""

import math

import pytest
import torch

from tuneforge.train.compare import Prices, cost_of_ownership, recommend
from tuneforge.evaluate.forgetting import forgetting_verdict, general_texts
from tuneforge.evaluate.incontext import BM25Retriever, MiniLMRetriever, draw_shots, query_text, with_examples
from tuneforge.evaluate.perplexity import answer_rows, nll_per_row, summarize, text_rows
from tuneforge.evaluate.report import image, table, text, write_report


def conv(q, a, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_nll_matches_the_models_own_loss(tiny_model_dir, tiny_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    convs = [conv("hello world", "a b c"), conv("order two mugs", "sure, two mugs for you")]
    rows = answer_rows(tiny_tok, convs)
    # Only the final answer (and its end-of-turn token) is scored, not the prompt.
    assert all(lab == -100 for lab in rows[0]["labels"][:5])
    nll = nll_per_row(model, rows, tiny_tok.pad_token_id, batch_size=2, device="cpu")
    for (total, count), row in zip(nll, rows):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        with torch.no_grad():
            ref = model(input_ids=ids, labels=labels).loss.item()  # mean over scored tokens
        assert total / count == pytest.approx(ref, rel=1e-4)
    s = summarize(nll)
    assert s["perplexity"] == pytest.approx(math.exp(sum(t for t, _ in nll) / sum(c for _, c in nll)))
    assert len(text_rows(tiny_tok, ["hello world a b c", "a"], 4)[0]["input_ids"]) == 4


def test_forgetting_probe_text_and_flag():
    texts = general_texts(50)
    assert len(texts) == 50 and all("\n" in t for t in texts)
    assert forgetting_verdict(10.0, 12.0, 0.1)["flagged"]
    v = forgetting_verdict(10.0, 10.5, 0.1)
    assert not v["flagged"] and v["relative_change"] == pytest.approx(0.05)


def test_few_shot_examples_become_earlier_turns():
    c = conv("q?", "a", system="sys")
    shots = [conv("q1", "a1"), conv("q2", "a2", system="other")]
    out = with_examples(c, shots)
    assert [m["content"] for m in out] == ["sys", "q1", "a1", "q2", "a2", "q?", "a"]
    assert query_text(c) == "q?"
    pool = [conv(f"q{i}", f"a{i}") for i in range(10)]
    assert draw_shots(pool, 3, seed=1) == draw_shots(pool, 3, seed=1) != draw_shots(pool, 3, seed=2)


def test_retrievers_find_the_related_example():
    docs = ["ship two coffee mugs to Lisbon", "the weather in Oslo is cold", "order five yoga mats for Berlin"]
    assert BM25Retriever(docs).top_k(["please send yoga mats to Berlin"], 1) == [[2]]
    dense = MiniLMRetriever(docs)
    assert dense.top_k(["is it freezing in Norway's capital?", "I'd like some cups for my coffee"], 1) == [[1], [0]]


def test_cost_of_ownership_and_recommendation():
    row = {"train_seconds": 100.0, "index_seconds": 0.0, "seconds_per_request": 0.5,
           "prompt_tokens_per_request": 200, "output_tokens_per_request": 20}
    assert cost_of_ownership(row, 1000, Prices()) == {"compute_seconds": 600.0, "compute_hours": 600 / 3600}
    priced = cost_of_ownership(row, 1000, Prices(input_per_1m=1.0, output_per_1m=2.0, compute_per_hour=3.6))
    assert priced["cost"] == pytest.approx(600 / 3600 * 3.6 + 1000 * (200 * 1.0 + 20 * 2.0) / 1e6)
    rows = [{"name": "zero-shot", "accuracy": 0.1, "tco": 10}, {"name": "rag", "accuracy": 0.85, "tco": 50},
            {"name": "fine-tuned", "accuracy": 0.86, "tco": 30}, {"name": "fine-tuned + rag", "accuracy": 0.9,
                                                                  "tco": 80}]
    assert recommend(rows, 0.02)["strategy"] == "fine-tuned + rag"
    rec = recommend(rows, 0.05)  # fine-tuned is within 5 points and cheaper
    assert rec["strategy"] == "fine-tuned" and any("zero-shot" in r for r in rec["reasons"])


def test_html_report_is_self_contained(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([1, 2])
    plt.savefig(tmp_path / "curve.png")
    md, page = write_report([text("hello <b>"), table(["a", "b"], [[1, "x|y"]]), image(tmp_path / "curve.png"),
                             image(tmp_path / "missing.png")], tmp_path, "T")
    assert "| 1 | x\\|y |" in md.read_text() and "![curve](curve.png)" in md.read_text()
    h = page.read_text()
    assert "data:image/png;base64," in h and "hello &lt;b&gt;" in h and 'src="curve.png"' not in h
