"""Defaults that win? tuneforge's ``auto`` against the previous fixed defaults and the defaults
of transformers' Trainer and TRL's SFTTrainer, on small real tasks, held-out accuracy with a
95% bootstrap interval and wall time, every column on the same rows and the same machine.

Tasks (chat rows; each split fixed by --seed; the test rows are never trained on):
- ``topic``: which topic a question is about, 6 labels; the questions and their labels are
  chatterbot-corpus's human-curated topic files (ai, coding, emotion, literature, psychology,
  trivia). Metric: exact match of the label.
- ``orders``: free-text customer messages -> JSON (tuneforge's generated quick-start task).
  Metric: the JSON object equals the reference.
- ``reviews``: movie-review snippets -> positive / negative, labelled by people: the snippets
  (Pang & Lee's) and their mean rating by 20 human raters from the VADER paper's data set
  (Hutto & Gilbert, ICWSM 2014, MIT licence), which ships in the ``vaderSentiment==3.3.2``
  source distribution on PyPI (fetched once with pip into $TUNEFORGE_HOME/benchmark-data).
  Snippets the raters left near neutral (|mean| < 1 on their -4..4 scale) are left out,
  counted. Metric: exact match.
- ``sentiment``: product reviews -> positive / negative / neutral (tuneforge's generated
  ``builtin:sentiment`` rows as chat; templated, so easy). Metric: exact match.

Columns (every one LoRA on SmolLM2-135M-Instruct through tuneforge's loop, its padding-free
batches and its loss on the answer tokens + end of turn, so only the hyper-parameters differ):
- ``auto``: ``auto: all`` (tuneforge/train/auto.py decides from the data).
- ``fixed``: the previous defaults: 1 epoch, batch 4, lr 2e-4 cosine, LoRA r=8 alpha 16 on all
  linear layers, max_length 512, no early stopping.
- ``trainer``: transformers' TrainingArguments defaults (lr 5e-5, 3 epochs, batch 8, linear
  decay, no warmup) with peft's LoraConfig defaults (r=8, alpha 8, no dropout, q_proj/v_proj
  for this family).
- ``sft_trainer``: TRL SFTConfig defaults (lr 2e-5, 3 epochs, batch 8, linear, max_length
  1024) with the same peft defaults. TRL trains the whole sequence by default; here the loss
  is on the answers (tuneforge's), which only helps it on these tasks.
- ``jobs_api``: what a user of OpenAI's fine-tuning API gets: ``tuneforge serve`` (jobs on, an
  API key), the train file uploaded with the ``openai`` client, a job with no hyperparameters
  (so auto decides what the server's ``jobs.run_defaults`` leaves open), polled to the end, and
  each held-out row asked of ``job.fine_tuned_model`` on ``/v1/chat/completions`` (greedy, 64
  tokens, like the other columns' eval). Its cell also shows jobs_api - fixed (paired).
  --reuse reads a finished job's scores back (the same data files, model, seed and auto rules).

    python benchmarks/defaults.py --quick                    # topic only, 120 train / 60 test rows
    python benchmarks/defaults.py --quick --max-steps 2 --model DIR   # the pipeline only (no result)
    python benchmarks/defaults.py --quick --max-steps 2 --columns fixed,jobs_api
    python benchmarks/defaults.py --tasks topic --rows 400   # the issue's 400-row job
    python benchmarks/defaults.py                            # all tasks, 400 rows, every column

Prints a markdown table and writes it with every score to --out (results.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneforge.data.builtin import _chatterbot_conversations, orders, sentiment  # noqa: E402
from tuneforge.evaluate.metrics import normalize, to_label  # noqa: E402
from tuneforge.evaluate.stats import bootstrap_mean_ci, paired_bootstrap  # noqa: E402

TOPICS = ("ai", "coding", "emotion", "literature", "psychology", "trivia")
PEFT_DEFAULT_LORA = {"name": "lora", "r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
COLUMNS = {
    "auto": {"auto": "all"},
    "fixed": {"train": {"epochs": 1, "batch_size": 4, "lr": 2e-4, "scheduler": "cosine"},
              "method": {"name": "lora", "r": 8, "alpha": 16}, "data": {"max_length": 512}},
    "trainer": {"train": {"epochs": 3, "batch_size": 8, "lr": 5e-5, "scheduler": "linear", "warmup_ratio": 0.0},
                "method": PEFT_DEFAULT_LORA, "data": {"max_length": 512}},
    "sft_trainer": {"train": {"epochs": 3, "batch_size": 8, "lr": 2e-5, "scheduler": "linear", "warmup_ratio": 0.0},
                    "method": PEFT_DEFAULT_LORA, "data": {"max_length": 1024}},
    "jobs_api": {},  # no run config of its own: run_jobs_api asks the server's jobs API
}


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def topic_rows(seed: int) -> list[dict]:
    """The first question of each conversation in chatterbot-corpus's topic files, labelled with its file."""
    rows = []
    for name, turns in _chatterbot_conversations():
        if name in TOPICS and turns and isinstance(turns[0], str):
            rows.append(chat(f"Which topic is this question about? Answer with one of: {', '.join(TOPICS)}.\n\n"
                             f"Question: {turns[0].strip()}", name))
    random.Random(seed).shuffle(rows)
    return rows


def order_rows(seed: int) -> list[dict]:
    return [chat(f"{r['instruction']}\n\n{r['input']}", r["output"]) for r in orders(n=1000, seed=seed)]


VADER_SDIST = "vaderSentiment==3.3.2"
VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def vader_movie_ratings() -> Path:
    """The VADER paper's human-rated movie snippets, from the package's source distribution
    (the wheel leaves them out): downloaded once with pip, the inner archive unpacked."""
    home = Path(os.environ.get("TUNEFORGE_HOME", Path.home() / ".cache" / "tuneforge")) / "benchmark-data" / "vader"
    target = home / VADER_MOVIES
    if not target.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", VADER_SDIST, "--no-deps", "--no-binary", ":all:",
                        "-d", str(home), "-q"], check=True)
        with tarfile.open(next(home.glob("vaderSentiment-*.tar.gz"))) as sdist:
            inner = next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=sdist.extractfile(inner)) as data:
                data.extract(VADER_MOVIES, home, filter="data")
    return target


def review_rows(seed: int) -> list[dict]:
    rows, neutral = [], 0
    for line in vader_movie_ratings().read_text(encoding="utf-8").splitlines():
        _, rating, text = line.split("\t", 2)
        if abs(float(rating)) < 1:
            neutral += 1
            continue
        rows.append(chat(f"Is this movie review positive or negative?\n\n{text.strip()}",
                         "positive" if float(rating) > 0 else "negative"))
    print(f"[reviews] {len(rows)} snippets; {neutral} left out: raters' mean within 1 of neutral")
    random.Random(seed).shuffle(rows)
    return rows


def sentiment_rows(seed: int) -> list[dict]:
    return [chat(f"What is the sentiment of this review? Answer positive, negative or neutral.\n\n{r['text']}",
                 r["label"]) for r in sentiment(n=1000, seed=seed)]


TASKS = {"topic": (topic_rows, "exact_match"), "reviews": (review_rows, "exact_match"),
         "orders": (order_rows, "json"), "sentiment": (sentiment_rows, "exact_match")}


def write_task(name: str, rows: list[dict], n_train: int, n_test: int, folder: Path) -> dict:
    test, train = rows[:n_test], rows[n_test:n_test + n_train]
    if len(train) < n_train:
        print(f"[{name}] only {len(train)} training rows after {n_test} test rows (asked {n_train})")
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", train), ("test", test)):
        (folder / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    answers = Counter(r["messages"][-1]["content"] for r in train)
    return {"train": len(train), "test": len(test),
            "labels": dict(answers.most_common(8)) if len(answers) <= 20 else f"{len(answers)} distinct answers"}


def lenient(metric: str, predictions: list[str], references: list[str], data: Path, task: str) -> dict:
    """For a label task, the accuracy when an answer is read leniently: the one label it names
    counts ("This question is about coding." -> coding), as an application parsing free text
    would; a peer whose defaults never learnt the one-word format is not scored 0 for that alone.
    For a JSON task, the share of fields right: an answer off in one field is not all wrong."""
    if metric == "json":
        from tuneforge.evaluate.metrics import score_per_example
        fields = score_per_example(metric, predictions, references)["json_fields"]
        return {"json_fields": sum(fields) / len(fields)}
    if metric != "exact_match":
        return {}
    labels = sorted({normalize(json.loads(x)["messages"][-1]["content"])
                     for x in (data / f"{task}-train.jsonl").read_text().splitlines()})
    hits = [float(to_label(p, labels) == normalize(r)) for p, r in zip(predictions, references, strict=True)]
    return {"label_named": sum(hits) / len(hits)}


def run_column(task: str, column: str, metric: str, data: Path, out: Path, seed: int, model: str,
               max_steps: int | None, reuse: bool = False) -> dict:
    raw = {"model": {"name": model},
           "data": {"train": [str(data / f"{task}-train.jsonl")], "test": [str(data / f"{task}-test.jsonl")],
                    "val_size": 0.1},
           "train": {"seed": seed, "save_every": 0},
           "eval": {"metric": metric, "baseline": False, "batch_size": 16},
           "output_dir": str(out), "run_name": f"{task}-{column}"}
    for section, values in COLUMNS[column].items():
        raw[section] = (raw.get(section) or {}) | values if isinstance(values, dict) else values
    if max_steps:  # a smoke run of the pipeline: every column cut to the same steps (no result)
        raw["train"]["max_steps"] = max_steps
    cfg = out / f"{task}-{column}.yaml"
    run = out / f"{task}-{column}"
    text = yaml.safe_dump(raw, sort_keys=False)
    timing = run / "benchmark_wall.json"
    # An auto column's result depends on the rules too: it is reused only under the same auto.py.
    rules = hashlib.sha256((ROOT / "tuneforge/train/auto.py").read_bytes()).hexdigest()[:16] if "auto" in raw else None
    # --reuse: a column whose folder holds a finished run of this very config (the same data
    # files, read below) is read back, so that an interrupted or extended benchmark trains only
    # what is missing; its wall time and load are the ones recorded when it ran.
    if reuse and cfg.exists() and cfg.read_text() == text and timing.exists() and (run / "eval_samples.jsonl").exists() \
            and json.loads(timing.read_text()).get("auto_rules") == rules:
        print(f"[{task}] {column}: reusing {run}")
        wall, load = (json.loads(timing.read_text())[k] for k in ("wall_s", "load"))
    else:
        if run.exists():  # this benchmark's own earlier run of the column (its --out, its name): replaced
            shutil.rmtree(run)
        cfg.write_text(text)
        t0 = time.perf_counter()
        log = out / f"{task}-{column}.log"
        with open(log, "w") as f:
            rc = subprocess.call([sys.executable, "-m", "tuneforge", "train", str(cfg), "--force"], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"{task}/{column} failed (exit {rc}); see {log}")
        load = Path("/proc/loadavg").read_text().split()[:3]
        timing.write_text(json.dumps({"wall_s": wall, "load": load, "auto_rules": rules}))
    samples = [json.loads(x) for x in (run / "eval_samples.jsonl").read_text().splitlines()]
    tuned = [s for s in samples if s["model"] == "tuned"]
    scores = [s["score"] for s in tuned]
    summary = json.loads((run / "summary.json").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    return {"scores": scores, "acc": sum(scores) / len(scores), "ci": bootstrap_mean_ci(scores),
            **lenient(metric, [s["prediction"] for s in tuned], [s["reference"] for s in tuned], data, task),
            "wall_s": round(wall, 1), "load_after": load, "train_s": summary["train_seconds"], "steps": summary["steps"],
            "stopped_early": summary.get("stopped_early"),
            "epochs": resolved["train"]["epochs"], "lr": resolved["train"]["lr"],
            "batch": resolved["train"]["batch_size"], "max_length": resolved["data"]["max_length"]}


# --- the jobs_api column: the same task asked through OpenAI's fine-tuning API ----------------
JOB_MAX_TOKENS = 64  # the other columns' eval budget (eval.max_new_tokens' default)


def run_jobs_api(task: str, column: str, metric: str, data: Path, out: Path, seed: int, model: str,
                 max_steps: int | None, reuse: bool = False) -> dict:
    """Fine-tune through ``tuneforge serve``'s /v1/fine_tuning/jobs as an OpenAI user does, and
    score the fine-tuned model on the held-out rows through /v1/chat/completions.

    The job request names only the model, the uploaded file and the seed (the other columns'
    --seed): every hyperparameter is left to the server, i.e. to auto. The jobs API has no
    max_steps, so --max-steps reaches the job through serve.yaml's ``jobs.run_defaults``
    (train.max_steps), as a server operator would set it. With ``reuse`` a finished job of the
    same data files, model, seed, max_steps and auto rules is read back from its folder."""
    import shutil
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from tqdm import tqdm

    from tuneforge.allocator import machine_busy
    from tuneforge.evaluate.metrics import score_per_example
    from tuneforge.models.zoo import EMBEDDED
    try:  # the dev extra's client: what the users of this API run
        import openai
    except ImportError:
        raise SystemExit("the jobs_api column needs the openai client: pip install -e '.[dev]'") from None

    home = out / f"{task}-{column}"
    cache_key = jobs_api_key(task, data, seed, model, max_steps)
    done = home / "result.json"
    if reuse and done.exists() and json.loads(done.read_text()).get("key") == cache_key:
        print(f"[{task}] {column}: reusing {home}")
        return json.loads(done.read_text())["result"]
    shutil.rmtree(home, ignore_errors=True)  # a fresh registry and job folder, as --force gives the others
    home.mkdir(parents=True)
    registry = f"sqlite:///{home / 'registry.db'}"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    made = subprocess.run([sys.executable, "-m", "tuneforge", "keys", "create", "--registry", registry,
                           "--name", "defaults-benchmark"], capture_output=True, text=True, cwd=ROOT, env=env)
    if made.returncode != 0:
        raise SystemExit(f"{task}/{column}: tuneforge keys create failed: {made.stderr[-2000:]}")
    key = made.stdout.strip().splitlines()[-1]
    public = model if model in EMBEDDED else "benchmark-base"  # a folder or hub id is offered by name
    jobs = {"home": str(home / "jobs"), "base_models": {} if model in EMBEDDED else {public: model},
            "run_defaults": {"train": {"max_steps": max_steps}} if max_steps else {}}
    cfg = home / "serve.yaml"
    # timeout_s: the server's per-request limit (60 s) is for interactive traffic; here a batch
    # of 64-token answers on a busy CPU, the first with the model's load, may take longer.
    cfg.write_text(yaml.safe_dump({"registry": registry, "auth": "required", "timeout_s": 600, "jobs": jobs},
                                  sort_keys=False))
    with socket.socket() as s:  # a free port; the server binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = home / "server.log"
    if machine_busy() and "OMP_WAIT_POLICY" not in env:
        # The rule `tuneforge train` applies to itself (tuneforge/allocator.py), which `tuneforge
        # serve` does not (yet): on a busy machine OpenMP threads spin for a descheduled peer.
        # Measured here (2-core AVX2, load 6-9, the smoke run's 60 topic rows of up to 64
        # tokens): ~40 s a row spinning, 7 s a row passive. Speed only: greedy answers, hence
        # the scores, are the same.
        env = env | {"OMP_WAIT_POLICY": "PASSIVE"}
        print(f"[{task}] {column}: the machine is busy: the server runs with OMP_WAIT_POLICY=PASSIVE", flush=True)
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--config", str(cfg), "--port", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise SystemExit(f"{task}/{column}: tuneforge serve exited ({server.returncode}); see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
        with open(data / f"{task}-train.jsonl", "rb") as f:
            upload = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=public, training_file=upload.id, seed=seed)
        job, events = wait_for_job(client, job, server, f"[{task}] {column}", log)
        t_trained = time.perf_counter()

        test = [json.loads(x) for x in (data / f"{task}-test.jsonl").read_text().splitlines()]

        def ask(row: dict) -> str:
            r = client.chat.completions.create(model=job.fine_tuned_model, messages=row["messages"][:-1],
                                               temperature=0, max_tokens=JOB_MAX_TOKENS)
            return r.choices[0].message.content or ""

        # Concurrent requests, as an application sends them: the server batches them.
        with ThreadPoolExecutor(8) as pool:
            preds = list(tqdm(pool.map(ask, test), total=len(test), desc=f"[{task}] {column}: asking"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    wall = time.perf_counter() - t0
    scores = next(iter(score_per_example(metric, preds, [r["messages"][-1]["content"] for r in test]).values()))
    (home / "samples.jsonl").write_text("".join(
        json.dumps({"prompt": r["messages"][-2]["content"], "reference": r["messages"][-1]["content"],
                    "prediction": p, "score": s}) + "\n" for r, p, s in zip(test, preds, scores)))
    decided = {d["key"]: d["value"] for d in (getattr(job, "auto", None) or [])}
    steps = [(e.data or {}).get("step", 0) for e in events if e.type == "metrics"]
    result = {"scores": scores, "acc": sum(scores) / len(scores), "ci": bootstrap_mean_ci(scores),
              **lenient(metric, preds, [r["messages"][-1]["content"] for r in test], data, task),
              "wall_s": round(wall, 1), "load_after": Path("/proc/loadavg").read_text().split()[:3],
              "train_s": round(t_trained - t0, 1), "steps": max(steps, default=0),
              "job": job.id, "fine_tuned_model": job.fine_tuned_model, "auto": getattr(job, "auto", None),
              "epochs": job.hyperparameters.n_epochs, "lr": decided.get("train.lr"),
              "batch": job.hyperparameters.batch_size, "max_length": decided.get("data.max_length")}
    done.write_text(json.dumps({"key": cache_key, "result": result}))
    return result


def jobs_api_key(task: str, data: Path, seed: int, model: str, max_steps: int | None) -> str:
    """What a jobs_api result depends on: the uploaded and held-out rows, the request, the auto rules."""
    h = hashlib.sha256(json.dumps([seed, model, max_steps, JOB_MAX_TOKENS]).encode())
    for f in (data / f"{task}-train.jsonl", data / f"{task}-test.jsonl", ROOT / "tuneforge/train/auto.py"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def wait_for_job(client, job, server, label: str, log: Path) -> tuple:
    """Poll the job to its end, printing each status change, auto's decisions and each event
    (per-step losses of the first two and every 10th step) as the user's progress; the finished
    job and all its events."""
    seen, status, decided = set(), None, False
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status != status:
            status = job.status
            print(f"{label}: job {job.id} {status}", flush=True)
        if not decided and getattr(job, "auto", None):  # the job object's auto: what the run decided, and why
            decided = True
            for d in job.auto:
                print(f"{label}: auto {d['key']} = {d['value']}: {d['reason']}", flush=True)
        for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))):
            if e.id not in seen:
                seen.add(e.id)
                step = (e.data or {}).get("step", 0)
                if e.type != "metrics" or step in (1, 2) or step % 10 == 0:
                    print(f"{label}: {e.message}", flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        if server.poll() is not None:
            raise SystemExit(f"{label}: tuneforge serve exited ({server.returncode}) during the job; see {log}")
        time.sleep(2)
    if job.status != "succeeded":
        raise SystemExit(f"{label}: job {job.id} {job.status}: {job.error}")
    return job, list(client.fine_tuning.jobs.list_events(job.id, limit=10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="topic,reviews,orders", help=f"comma-separated: {', '.join(TASKS)}")
    ap.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated: {', '.join(COLUMNS)}")
    ap.add_argument("--rows", type=int, default=400, help="training rows per task (10%% of them validate)")
    ap.add_argument("--test-rows", type=int, default=200, help="held-out rows per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="topic only, 120 rows, 60 test rows: a smoke run")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="any model spec tuneforge takes")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="cut every column to N optimizer steps: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=Path("/tmp/tuneforge-defaults"))
    ap.add_argument("--reuse", action="store_true",
                    help="read back columns already trained in --out with the same config instead of training them again")
    a = ap.parse_args()
    if a.quick:
        a.tasks, a.rows, a.test_rows = "topic", 120, 60
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: str(v) for k, v in vars(a).items()}, "load_before": Path("/proc/loadavg").read_text().split()[:3],
               "tasks": {}}
    for task in a.tasks.split(","):
        make, metric = TASKS[task]
        info = write_task(task, make(a.seed), a.rows, a.test_rows, a.out / "data")
        print(f"[{task}] {info}")
        results["tasks"][task] = {"data": info, "columns": {}}
        for column in a.columns.split(","):
            run = run_jobs_api if column == "jobs_api" else run_column
            r = run(task, column, metric, a.out / "data", a.out, a.seed, a.model, a.max_steps, a.reuse)
            results["tasks"][task]["columns"][column] = r
            print(f"[{task}] {column}: {100 * r['acc']:.1f}% [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}] "
                  f"in {r['wall_s']:.0f}s ({r['steps']} steps, {r['epochs']} epochs, lr {r['lr']:g}, "
                  f"batch {r['batch']})", flush=True)
        cols = results["tasks"][task]["columns"]
        if "auto" in cols:
            for other in (c for c in cols if c != "auto"):
                cols[other]["auto_minus_this"] = paired_bootstrap(cols[other]["scores"], cols["auto"]["scores"])
        if "jobs_api" in cols and "fixed" in cols:  # the claim: the jobs API beats the fixed defaults
            cols["jobs_api"]["vs_fixed"] = paired_bootstrap(cols["fixed"]["scores"], cols["jobs_api"]["scores"])
    results["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    cols = list(next(iter(results["tasks"].values()))["columns"])
    lines = ["| task (train/test rows) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for task, t in results["tasks"].items():
        cells = []
        for c in cols:
            r = t["columns"][c]
            d = r.get("auto_minus_this")
            vs = f"; auto {100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else ""
            if f := r.get("vs_fixed"):
                vs += f"; minus fixed {100 * f['delta']:+.1f} [{100 * f['low']:+.1f}, {100 * f['high']:+.1f}]"
            named = f" (label named: {100 * r['label_named']:.1f}%)" if "label_named" in r else \
                f" (fields right: {100 * r['json_fields']:.1f}%)" if "json_fields" in r else ""
            cells.append(f"{100 * r['acc']:.1f}% [{100 * r['ci'][0]:.0f}, {100 * r['ci'][1]:.0f}]{named}, "
                         f"{r['wall_s']:.0f} s{vs}")
        lines.append(f"| {task} ({t['data']['train']}/{t['data']['test']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
