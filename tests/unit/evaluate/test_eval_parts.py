"""Loss/perplexity, forgetting probe, in-context prompts, retrieval, costs, reports."""

import math
import random

import pytest
import torch

from tuneforge.train.compare import Prices, cost_of_ownership, interleaved_schedule, recommend
from tuneforge.evaluate.forgetting import forgetting_verdict, general_texts
from tuneforge.evaluate.incontext import (BM25Retriever, MiniLMRetriever, doc_rag_convs, draw_shots, load_doc_chunks,
                                          query_text, with_examples)
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


def rows_and_scores(accuracies: dict[str, float], n: int, tco: dict[str, float]):
    """Per-row 0/1 scores with exactly the given accuracies on n rows, right on other rows per strategy."""
    per = {}
    for seed, (k, a) in enumerate(accuracies.items()):
        scores = [1.0] * round(a * n) + [0.0] * (n - round(a * n))
        random.Random(seed).shuffle(scores)
        per[k] = scores
    return [{"name": k, "accuracy": a, "tco": tco[k]} for k, a in accuracies.items()], per


def test_recommendation_needs_a_significant_difference():
    tco = {"zero-shot": 10, "rag": 50, "fine-tuned": 30, "fine-tuned + rag": 80}
    # The case: 75% [25, 100] against 50% [0, 100] on 4 rows: no recommendation, say why.
    rows, per = rows_and_scores({"zero-shot": 0.5, "fine-tuned": 0.75}, 4, tco)
    rec = recommend(rows, per)
    assert rec["strategy"] is None and rec["best"] == "fine-tuned"
    assert rec["reasons"][0].startswith("no significant difference at 4 rows; run with more")
    # Enough rows: zero-shot is significantly worse, rag and fine-tuned are not distinguishable from
    # the best, so the cheapest of them (fine-tuned) is recommended, with the intervals as reasons.
    rows, per = rows_and_scores({"zero-shot": 0.1, "rag": 0.85, "fine-tuned": 0.86, "fine-tuned + rag": 0.9}, 200, tco)
    rec = recommend(rows, per)
    assert rec["strategy"] == "fine-tuned" and rec["best"] == "fine-tuned + rag"
    assert rec["differences"]["zero-shot"]["low"] > 0 >= rec["differences"]["fine-tuned"]["low"]
    assert "significantly worse" in rec["reasons"][1] and "zero-shot" in rec["reasons"][1]
    assert "rag" not in rec["reasons"][1].replace("zero-shot", "")  # rag is not called worse
    # A tolerance asks the gap to be larger than it: then even zero-shot's is not enough.
    assert recommend(rows, per, tolerance=0.9)["strategy"] is None


def test_strategies_are_timed_round_robin_over_row_chunks():
    names = ["a", "b", "c"]
    steps = interleaved_schedule(7, 3, names)
    assert steps == [("a", 0, 3), ("b", 0, 3), ("c", 0, 3),
                     ("b", 3, 6), ("c", 3, 6), ("a", 3, 6),
                     ("c", 6, 7), ("a", 6, 7), ("b", 6, 7)]
    # every strategy covers every row exactly once
    for n in names:
        assert [r for s, a, b in steps if s == n for r in range(a, b)] == list(range(7))


def test_rag_over_a_docs_folder_retrieves_the_chunk_with_the_fact(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "policy.md").write_text("# Returns\n\nItems can be returned within 30 days.\n\n"
                                    "Refunds go to the original card.")
    (docs / "sub" / "shipping.txt").write_text("Shipping to Norway takes five days. " * 3
                                               + "\n\n" + "filler words here " * 60)
    (docs / "image.png").write_bytes(b"\x89PNG")
    chunks, report = load_doc_chunks(docs, max_words=40)
    assert report["files"] == 2 and report["skipped_files"] == ["image.png"] and report["chunks"] == len(chunks)
    assert all(len(c.split()) <= 40 for c in chunks) and any("30 days" in c for c in chunks)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How long does shipping to Norway take?"},
            {"role": "assistant", "content": "five days"}]
    out = doc_rag_convs([conv], chunks, BM25Retriever(chunks), 1)[0]
    assert out[0]["content"].startswith("Be brief.\n\nUse these passages") and "Shipping to Norway" in out[0]["content"]
    assert out[1:] == conv[1:]
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no .txt or .md files in it \\(1 other file"):
        load_doc_chunks(tmp_path / "pngs")


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
