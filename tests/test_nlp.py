"""Tests for nlp_project.py: logic functions, the feedback store, and every task end to end via AppTest.

All models are tiny and random, built by tests/nlp_fixtures.py into a temp dir; no network is used.
"""
from __future__ import annotations

import csv
import io
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nlp_eval  # noqa: E402
import nlp_project  # noqa: E402
from nlp_fixtures import build_tiny_models  # noqa: E402

APP = str(ROOT / "nlp_project.py")
TIMEOUT = 120  # seconds per AppTest run: first loads of torch/diffusers on a busy 2-core CPU are slow


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with causal-lm/, sentiment/, qa/, summarization/, image/ tiny models (session-wide)."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def app_env(tiny_models, tmp_path, monkeypatch):
    """Point the app at the tiny models and a fresh feedback db; returns the db path."""
    db = tmp_path / "feedback.db"
    monkeypatch.setenv("NLP_APP_MODEL_DIR", str(tiny_models))
    monkeypatch.setenv("NLP_APP_FEEDBACK_DB", str(db))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a hostile model name that is a valid Hub id
    # ("ab") must fail at once, not try the network (with retries) before failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NLP_APP_SHARED", "0")  # private mode (sharing mode has its own tests)
    return db


def new_app(task: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    at.sidebar.radio(key="task").set_value(task).run()
    assert not at.exception, at.exception
    return at


def assert_clean(at):
    """No uncaught exception and no st.error on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def db_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT task, model, rating, comment FROM feedback").fetchall()


# ----------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------
def test_import_is_cheap_and_side_effect_free(tmp_path):
    # A fresh interpreter: importing the module must not pull in torch/streamlit nor create files.
    import subprocess

    code = "import sys, nlp_project; print('torch' in sys.modules, 'streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raw, expected", [
    ("  hello  ", "hello"),
    (b"caf\xc3\xa9 \xff\xfe", "caf\u00e9 \ufffd\ufffd"),
    ("bad \udcff surrogate\x00", "bad ? surrogate"),
    ("emoji \U0001F600\n ok", "emoji \U0001F600\n ok"),
    ("   \n\t ", ""),
])
def test_clean_text(raw, expected):
    text, cut = nlp_project.clean_text(raw)
    assert text == expected and not cut
    text.encode("utf-8")  # always valid UTF-8


def test_clean_text_cuts_long_input():
    text, cut = nlp_project.clean_text("x" * 100_000, max_chars=500)
    assert cut and len(text) == 500


def test_split_model_source(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert nlp_project.split_model_source(str(gguf)) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert nlp_project.split_model_source("org/model") == ("org/model", {})
    with pytest.raises(nlp_project.ModelLoadError):
        nlp_project.split_model_source(str(tmp_path / "missing"))
    with pytest.raises(nlp_project.ModelLoadError):
        nlp_project.split_model_source("   ")


def test_model_choices_prefer_local_dir(tiny_models):
    choices = nlp_project.model_choices("qa", env={"NLP_APP_MODEL_DIR": str(tiny_models)})
    assert choices[0] == str(tiny_models / "qa")
    assert "distilbert/distilbert-base-cased-distilled-squad" in choices
    assert nlp_project.model_choices("image", env={})[0] == "stabilityai/sd-turbo"


def test_bad_model_id_raises_load_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(nlp_project.ModelLoadError, match="cannot load"):
        nlp_project.load_text_model(str(tmp_path / "empty"), "causal-lm")


def test_next_word_distribution_is_a_distribution(tiny_models):
    model, tok, is_causal = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    assert is_causal
    top, truncated = nlp_project.next_word_distribution(model, tok, "The quick brown fox", k=7)
    probs = [p for _, p in top]
    assert len(top) == 7 and not truncated
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    _, truncated = nlp_project.next_word_distribution(model, tok, "fox " * 1000, k=3)
    assert truncated  # 128-token tiny model


def test_stream_generate_is_seeded_and_bounded(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    inputs, _ = nlp_project.encode_tail(tok, "Once upon a time", 100, model.device)
    settings = nlp_project.GenerationSettings(max_new_tokens=12, temperature=1.0, seed=3)
    first = "".join(nlp_project.stream_generate(model, tok, inputs, settings))
    second = "".join(nlp_project.stream_generate(model, tok, inputs, settings))
    assert first == second and first
    greedy = nlp_project.GenerationSettings(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    streamed = "".join(nlp_project.stream_generate(model, tok, inputs, greedy))
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] - inputs["input_ids"].shape[1] <= 12
    assert streamed == tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_inputs_drop_old_turns(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 10} for i in range(9)]
    inputs, dropped = nlp_project.chat_inputs(model, tok, history, max_new_tokens=20)
    assert dropped > 0 and inputs["input_ids"].shape[1] <= 128 - 20


def test_answer_question_spans_are_in_context(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "qa"), "qa")
    context = "The Eiffel Tower was completed in 1889 and stands in Paris, France. " * 20
    res = nlp_project.answer_question(model, tok, "When was the Eiffel Tower completed?", context)
    if res["no_answer"]:
        assert res["answer"] == "" and res["start"] == -1
    else:
        assert context[res["start"]:res["end"]] == res["answer"] and 0 < res["score"] <= 1
        assert len(tok(res["answer"], add_special_tokens=False)["input_ids"]) <= nlp_project.CONFIG[
            "qa_max_answer_tokens"]


def test_summarize_respects_length(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "summarization"), "summarization")
    lengths, generate = [], model.generate

    def spy(*args, **kwargs):  # record how many tokens generate() really produced
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    model.generate = spy
    try:
        summary, truncated = nlp_project.summarize(model, tok, "Once upon a time there lived a fisherman. " * 40,
                                                   min_tokens=3, max_tokens=8, num_beams=2)
    finally:
        del model.generate
    assert truncated and isinstance(summary, str)
    assert 1 + 3 <= lengths[0] <= 1 + 8  # decoder start token + 3..8 new tokens


def test_generate_image_rejects_bad_size(tiny_models):
    pipe = nlp_project.load_image_pipeline(str(tiny_models / "image"))
    with pytest.raises(ValueError, match="multiple of 8"):
        nlp_project.generate_image(pipe, "x", 1, 0.0, 0, 60)
    image = nlp_project.generate_image(pipe, "a lighthouse", 1, 0.0, 0, 64)
    assert image.size == (64, 64)
    assert nlp_project.png_bytes(image)[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Feedback store
# ----------------------------------------------------------------------------------------------------
def test_feedback_roundtrip_and_no_duplicates(tmp_path):
    store = nlp_project.FeedbackStore(tmp_path / "sub" / "fb.db")
    store.record("out1", "Chatbot", "m", "hi", "hello", rating=4, comment="nice")
    store.record("out1", "Chatbot", "m", "hi", "hello", rating=5, comment="better")  # re-rating: update
    store.record("out2", "Chatbot", "m", "x", "y", rating=1)
    rows = store.rows()
    assert len(rows) == 2
    assert {r["output_id"]: (r["rating"], r["comment"]) for r in rows} == {"out1": (5, "better"), "out2": (1, "")}
    assert store.summary() == [{"task": "Chatbot", "model": "m", "ratings": 2, "mean_rating": 3.0}]
    assert [c["comment"] for c in store.latest_comments()] == ["better"]
    parsed = list(csv.DictReader(io.StringIO(store.to_csv())))
    assert len(parsed) == 2 and set(parsed[0]) >= {"task", "model", "input", "output", "rating", "comment"}
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError):
        store.record("out3", "Chatbot", "m", "x", "y", rating=6)


def test_feedback_sql_is_parameterised(tmp_path):
    store = nlp_project.FeedbackStore(tmp_path / "fb.db")
    evil = "x'); DROP TABLE feedback; --"
    store.record(evil, evil, evil, evil, evil, rating=3, comment=evil)
    assert store.rows()[0]["comment"] == evil


def test_feedback_concurrent_writers(tmp_path):
    path = tmp_path / "fb.db"
    nlp_project.FeedbackStore(path)
    errors = []

    def writer(t):
        try:
            store = nlp_project.FeedbackStore(path)
            for i in range(100):
                store.record(f"{t}-{i}", "Story generation", f"model{t % 2}", "in", "out", rating=1 + i % 5)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 800


def test_corrupt_feedback_db_names_the_file(tmp_path):
    bad = tmp_path / "feedback.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(nlp_project.FeedbackStoreError, match=str(bad)):
        nlp_project.FeedbackStore(bad)


# ----------------------------------------------------------------------------------------------------
# Every task end to end in AppTest
# ----------------------------------------------------------------------------------------------------
def test_app_next_word_and_rating(app_env):
    at = new_app("Next-word prediction")
    at.text_area(key="nw_text").set_value("The quick brown fox")
    at.slider(key="nw_k").set_value(5)
    at.button(key="nw_go").click().run()
    assert_clean(at)
    result = at.session_state["result::Next-word prediction"]
    assert len(result["top"]) == 5 and isinstance(result["continuation"], str)
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    at.feedback[0].set_value(3).run()  # 4 stars (0-based widget value)
    at.text_input(key=f"comment::{result['id']}").set_value("good").run()
    at.run()  # extra reruns must not duplicate
    at.run()
    assert_clean(at)
    assert db_rows(app_env) == [("Next-word prediction", result["model"], 4, "good")]


def test_app_story_streams(app_env):
    at = new_app("Story generation")
    at.text_area(key="story_text").set_value("Once upon a time")
    at.slider(key="story_max").set_value(10)
    at.button(key="story_go").click().run()
    assert_clean(at)
    story = at.session_state["result::Story generation"]["output"]
    assert story and any(story[:20] in m.value for m in at.markdown)


def test_app_chat_two_turns_and_clear(app_env):
    at = new_app("Chatbot")
    at.sidebar.slider(key="chat_max").set_value(8)
    at.chat_input[0].set_value("Hello!").run()
    assert_clean(at)
    at.chat_input[0].set_value("How are you?").run()
    assert_clean(at)
    history = at.session_state["chat_history"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert len(at.chat_message) == 4 and len(at.feedback) == 2
    at.feedback[1].set_value(0).run()
    assert db_rows(app_env)[0][2] == 1
    at.sidebar.button(key="chat_clear").click().run()
    assert at.session_state["chat_history"] == [] and len(at.chat_message) == 0


def test_app_sentiment(app_env):
    at = new_app("Sentiment analysis")
    at.text_area(key="sent_text").set_value("I loved it " * 200)  # longer than the 64-token model
    at.button(key="sent_go").click().run()
    assert_clean(at)
    scores = at.session_state["result::Sentiment analysis"]["scores"]
    assert set(scores) == {"positive", "negative", "neutral"} and abs(sum(scores.values()) - 1) < 1e-4
    assert any("only its beginning" in i.value for i in at.info)
    assert at.metric[0].value in scores


def test_app_sentiment_by_prompt_with_causal_lm(app_env, tiny_models):
    at = new_app("Sentiment analysis")
    at.sidebar.text_input(key="model_custom::sentiment").set_value(str(tiny_models / "causal-lm")).run()
    at.text_area(key="sent_text").set_value("What a wonderful day")
    at.button(key="sent_go").click().run()
    assert_clean(at)
    result = at.session_state["result::Sentiment analysis"]
    assert result["by_prompt"] and set(result["scores"]) == {"positive", "negative", "neutral"}


def test_app_question_answering(app_env):
    at = new_app("Question answering")
    at.text_area(key="qa_context").set_value("The Eiffel Tower was completed in 1889 and stands in Paris.")
    at.text_area(key="qa_question").set_value("When was it completed?")
    at.button(key="qa_go").click().run()
    assert_clean(at)
    res = at.session_state["result::Question answering"]["qa"]
    if res["no_answer"]:
        assert at.warning and "No answer" in at.warning[0].value
    else:
        assert at.success and res["answer"] in at.success[0].value


def test_app_summarization(app_env):
    at = new_app("Summarization")
    at.text_area(key="sum_text").set_value("Once upon a time there lived a fisherman by the sea. " * 10)
    at.slider(key="sum_min").set_value(5)
    at.slider(key="sum_max").set_value(12)
    at.button(key="sum_go").click().run()
    assert_clean(at)
    assert at.session_state["result::Summarization"]["output"] is not None
    assert at.subheader and at.subheader[0].value == "Summary"
    caveat = [c.value for c in at.caption if "Not checked" in c.value]  # beside the summary, for every model
    assert caveat and "no summaries of this model were checked by hand" in caveat[0]


def test_app_image_generation_and_download(app_env):
    at = new_app("Image generation")
    at.slider(key="img_steps").set_value(1)
    at.select_slider(key="img_size").set_value(64)
    at.button(key="img_go").click().run()
    assert_clean(at)
    png = at.session_state["result::Image generation"]["png"]
    assert png[:4] == b"\x89PNG"
    assert at.get("download_button")
    at.feedback[0].set_value(4).run()
    assert db_rows(app_env)[0][:1] == ("Image generation",)


def test_app_feedback_page(app_env):
    store = nlp_project.FeedbackStore(app_env)
    store.record("a", "Chatbot", "m1", "hi", "hello", 5, "great answer")
    store.record("b", "Chatbot", "m1", "hi", "meh", 2)
    at = new_app("Feedback")
    assert_clean(at)
    frames = at.dataframe
    assert len(frames) == 2
    summary = frames[0].value
    assert list(summary["ratings"]) == [2] and list(summary["mean_rating"]) == [3.5]
    assert "great answer" in list(frames[1].value["comment"])
    assert at.get("download_button")


# ----------------------------------------------------------------------------------------------------
# Hostile input and failures: a message, never a crash
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \n ", "x" * 100_000, "\xff\xfe\x00\x81\x9d bytes \ufffd \u00c3\u00a9", "\U0001F600" * 50])
def test_app_hostile_text_inputs(app_env, text):
    at = new_app("Next-word prediction")
    at.text_area(key="nw_text").set_value(text)
    at.button(key="nw_go").click().run()
    assert_clean(at)
    if not text.strip():
        assert at.warning and "enter some text" in at.warning[0].value
    else:
        assert "result::Next-word prediction" in at.session_state
    if len(text) > nlp_project.CONFIG["max_input_chars"]:
        assert any("cut to its first" in i.value for i in at.info)


def test_app_hostile_chat_and_qa(app_env):
    at = new_app("Chatbot")
    at.chat_input[0].set_value("   ").run()
    assert_clean(at)
    assert at.warning and at.session_state["chat_history"] == []
    at = new_app("Question answering")
    at.text_area(key="qa_context").set_value("Cats sleep a lot. " * 2000)  # many windows
    at.text_area(key="qa_question").set_value("What is the capital of Mongolia? \U0001F600")
    at.button(key="qa_go").click().run()
    assert_clean(at)
    assert at.warning or at.success  # answer or explicit "No answer", never an exception
    at.text_area(key="qa_question").set_value("")
    at.button(key="qa_go").click().run()
    assert at.warning and "both a context and a question" in at.warning[0].value


def test_app_bad_model_shows_error_and_keeps_working(app_env, tmp_path):
    at = new_app("Summarization")
    at.sidebar.text_input(key="model_custom::summarization").set_value(str(tmp_path / "nope")).run()
    at.text_area(key="sum_text").set_value("Some text to summarise.")
    at.button(key="sum_go").click().run()
    assert not at.exception
    assert at.error and "Could not load the model" in at.error[0].value
    at.sidebar.radio(key="task").set_value("Next-word prediction").run()
    at.button(key="nw_go").click().run()
    assert_clean(at)


def test_app_corrupt_feedback_db_keeps_app_working(app_env):
    Path(app_env).write_bytes(b"garbage" * 1000)
    at = new_app("Feedback")
    assert not at.exception
    assert at.error and str(app_env) in at.error[0].value


def test_cli_bench_bad_input_exits_cleanly(tiny_models, tmp_path, capsys):
    assert nlp_eval.cli(["bench", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b.json")]) == 2
    assert "error:" in capsys.readouterr().err
    out = tmp_path / "b.json"
    assert nlp_eval.cli(["bench", "--model", str(tiny_models / "causal-lm"), "--max-new-tokens", "5",
                            "--repeats", "1", "--out", str(out)]) == 0
    import json

    report = json.loads(out.read_text())["backends"]["transformers"]
    assert report["new_tokens"] == 5 and report["ttft_s"] > 0 and report["decode_tokens_per_s"] > 0


# ----------------------------------------------------------------------------------------------------
# Issue 12: linear chat memory, one load per model, stopping, honest answers, notices, sharing mode
# ----------------------------------------------------------------------------------------------------
def _history_bytes(at) -> int:
    import pickle

    return len(pickle.dumps(list(at.session_state["chat_history"])))


def test_app_chat_30_turns_memory_and_rows_grow_linearly(app_env):
    at = new_app("Chatbot")
    at.sidebar.slider(key="chat_max").set_value(8)
    sizes = {}
    for turn in range(1, 31):
        at.chat_input[0].set_value(f"Turn {turn}: tell me about the sea.").run()
        assert not at.exception, [e.value for e in at.exception]
        if turn in (10, 20, 30):
            sizes[turn] = _history_bytes(at)
    history = at.session_state["chat_history"]
    assert len(history) == 60 and [m["role"] for m in history[:2]] == ["user", "assistant"]
    text_chars = sum(len(m["content"]) for m in history)
    # Each message is kept once: its text plus a fixed-size record (id, model path, cost line).
    assert sizes[30] <= 2 * text_chars + 60 * (400 + len(str(nlp_project.model_choices("causal-lm")[0])))
    growth_1, growth_2 = sizes[20] - sizes[10], sizes[30] - sizes[20]
    assert growth_2 < 1.5 * growth_1 + 2000, sizes  # linear, not compounding (it tripled per turn before)
    # Oldest turns are left out of the 128-token tiny model's prompt, and the notice survives st.rerun.
    assert any("oldest message" in i.value for i in at.info)
    # Rating the 30th reply stores only that reply and the message it answers.
    at.feedback[29].set_value(2).run()
    with sqlite3.connect(app_env) as conn:
        (inp, out), = conn.execute("SELECT input, output FROM feedback").fetchall()
    assert inp == "Turn 30: tell me about the sea." and out == history[-1]["content"]


def test_app_chat_cut_notice_survives_rerun(app_env):
    at = new_app("Chatbot")
    at.sidebar.slider(key="chat_max").set_value(8)
    at.chat_input[0].set_value("word " * 5000).run()  # 25,000 characters: cut to 20,000
    assert_clean(at)
    assert len(at.session_state["chat_history"]) == 2  # the reply came and st.rerun() redrew the page
    assert any("Message cut to its first" in i.value for i in at.info)


def test_same_model_loaded_once_for_every_task(app_env, tiny_models):
    import streamlit as st

    st.cache_resource.clear()
    lm = str(tiny_models / "causal-lm")
    at = new_app("Next-word prediction")
    at.button(key="nw_go").click().run()
    at.sidebar.radio(key="task").set_value("Story generation").run()
    at.slider(key="story_max").set_value(8)
    at.button(key="story_go").click().run()
    at.sidebar.radio(key="task").set_value("Chatbot").run()
    at.sidebar.slider(key="chat_max").set_value(8)
    at.chat_input[0].set_value("Hello!").run()
    for task, kind, button in [("Sentiment analysis", "sentiment", "sent_go"),
                               ("Question answering", "qa", "qa_go"), ("Summarization", "summarization", "sum_go")]:
        at.sidebar.radio(key="task").set_value(task).run()
        at.sidebar.text_input(key=f"model_custom::{kind}").set_value(lm + "/").run()  # another spelling
        if task == "Summarization":
            at.text_area(key="sum_text").set_value("Once upon a time there lived a fisherman.")
            at.slider(key="sum_min").set_value(5)
            at.slider(key="sum_max").set_value(12)
        at.button(key=button).click().run()
        assert_clean(at)
        assert at.session_state[f"result::{task}"]
    caption = [c.value for c in at.sidebar.caption if "model loads since start" in c.value][0]
    assert caption.endswith("model loads since start: 1"), caption


def test_load_text_model_counts_and_model_key(tiny_models, tmp_path):
    before = nlp_project.LOAD_COUNTER["loads"]
    loaded = nlp_project.load_text_model(str(tiny_models / "sentiment"), "causal-lm")
    assert loaded.kind == "sentiment" and loaded.backend == "transformers"  # the config decides, not the task
    assert nlp_project.LOAD_COUNTER["loads"] == before + 1
    assert nlp_project.check_model_fits(loaded, "sentiment") is True
    with pytest.raises(nlp_project.ModelLoadError, match="not a qa model"):
        nlp_project.check_model_fits(loaded, "qa")
    assert nlp_project.model_key(str(tiny_models / "qa") + "/") == nlp_project.model_key(str(tiny_models / "qa"))


def _slow_model(model, delay_s: float):
    """Make every forward pass of `model` take at least delay_s (so a stop can land mid-generation)."""
    import time as _time

    forward = model.forward

    def slow(*args, **kwargs):
        _time.sleep(delay_s)
        return forward(*args, **kwargs)

    model.forward = slow
    return model


def _generate_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "nlp-generate" and t.is_alive()]


def test_stream_stops_when_consumer_leaves_or_stop_is_set(tiny_models):
    import time as _time

    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    _slow_model(model, 0.05)
    inputs, _ = nlp_project.encode_tail(tok, "Once upon a time", 20, model.device)
    settings = nlp_project.GenerationSettings(max_new_tokens=100, temperature=0.0, min_new_tokens=100)
    # 1. The consumer goes away (what a Streamlit rerun / page change does to st.write_stream's iterator).
    stats = nlp_project.GenerationStats()
    stream = nlp_project.stream_generate(model, tok, inputs, settings, stats)
    next(stream)
    t0 = _time.perf_counter()
    stream.close()
    assert not _generate_threads() and _time.perf_counter() - t0 < 2
    assert stats.stopped and stats.new_tokens < 20  # 100 tokens would take > 5 s
    # 2. The Stop event is set while streaming.
    stop, stats = threading.Event(), nlp_project.GenerationStats()
    pieces = []
    for piece in nlp_project.stream_generate(model, tok, inputs, settings, stats, stop):
        pieces.append(piece)
        if len(pieces) == 3:
            stop.set()
    assert stats.stopped and stats.new_tokens < 20 and not _generate_threads()
    assert stats.first_token_s is not None and stats.total_s >= stats.first_token_s
    assert "tokens/s" in stats.describe() and "stopped early" in stats.describe()


def test_app_stopped_story_keeps_its_text_with_a_notice(app_env):
    at = new_app("Story generation")
    stats = nlp_project.GenerationStats()
    stats.token(3)
    at.session_state["partial::Story generation"] = {"input": "Once", "model": "m", "pieces": ["a", "b", "c"],
                                                    "stats": stats}
    at.run()
    assert_clean(at)
    result = at.session_state["result::Story generation"]
    assert result["output"] == "abc" and result["stopped"]
    assert any("stopped after 3 tokens" in i.value for i in at.info)
    assert any("stopped early" in c.value for c in at.caption)


def test_app_every_output_shows_its_cost(app_env):
    at = new_app("Story generation")
    at.slider(key="story_max").set_value(10)
    at.button(key="story_go").click().run()
    assert_clean(at)
    cost = at.session_state["result::Story generation"]["cost"]
    assert "first token" in cost and "tokens/s" in cost and "total" in cost
    assert any(c.value.startswith("Cost:") for c in at.caption)
    for task, button in [("Next-word prediction", "nw_go"), ("Sentiment analysis", "sent_go"),
                         ("Question answering", "qa_go")]:
        at.sidebar.radio(key="task").set_value(task).run()
        at.button(key=button).click().run()
        assert_clean(at)
        assert "total" in at.session_state[f"result::{task}"]["cost"]
        assert any(c.value.startswith("Cost:") for c in at.caption)


def test_answer_by_prompt_is_only_sure_when_in_context(monkeypatch):
    context = "The Eiffel Tower was completed in 1889 and stands in Paris, France."
    longer = context + " It is 330 metres tall."
    monkeypatch.setattr(nlp_project, "answer_confidence", lambda *a, **k: (0.5, 0.5))  # no model here
    for generated, no_answer, in_context in [("The Eiffel Tower is in Paris.", False, True),  # every word backed
                                             ("The Eiffel Tower is in London.", False, False),
                                             ("1889.", False, True), ("in  PARIS, france", False, True),
                                             ("No answer.", True, False), ("x" * 5000, False, False),
                                             ("The text does not say.", True, False),
                                             (context, False, True),  # one sentence: it may be the answer
                                             (longer, False, False)]:  # a longer context repeated back
        monkeypatch.setattr(nlp_project, "generate_by_prompt", lambda *a, g=generated, **k: g)
        res = nlp_project.answer_by_prompt(None, None, "Q?", longer if generated == longer else context)
        assert (res["no_answer"], res["in_context"], res["by_prompt"]) == (no_answer, in_context, True), generated
        assert res["repeats_context"] == (generated == longer), generated  # the reason the page gives
        assert len(res["answer"]) <= nlp_project.CONFIG["qa_max_answer_chars"]
        for start, end in res["spans"]:
            assert context[start:end].lower().replace(" ", "") in generated.lower().replace(" ", "")


def test_extractive_answer_is_bounded_in_characters(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "qa"), "qa")
    context = "The tower " + "a" * 20_000 + " was completed in 1889 in Paris."
    for max_chars in (300, 40):
        res = nlp_project.answer_question(model, tok, "When was it completed?", context, max_answer_chars=max_chars)
        assert res["no_answer"] or len(res["answer"]) <= max_chars


def test_app_by_prompt_answers_are_not_confident(app_env, tiny_models):
    at = new_app("Question answering")
    at.sidebar.text_input(key="model_custom::qa").set_value(str(tiny_models / "causal-lm")).run()
    at.text_area(key="qa_context").set_value("Cats sleep a lot.")
    at.text_area(key="qa_question").set_value("Who painted the Mona Lisa?")
    at.button(key="qa_go").click().run()
    assert_clean(at)
    res = at.session_state["result::Question answering"]["qa"]
    assert res["by_prompt"] and not at.success  # never the green "Answer" for a guess
    assert any("is guessing" in w.value and "distilbert-base-cased-distilled-squad" in w.value for w in at.warning)
    if not res["in_context"]:
        assert any("probably a guess" in w.value or "No answer" in w.value for w in at.warning)


def test_app_invalid_submission_clears_the_old_answer(app_env):
    at = new_app("Question answering")
    at.button(key="qa_go").click().run()
    assert_clean(at)
    assert at.session_state["result::Question answering"]
    at.text_area(key="qa_question").set_value("   ")
    at.button(key="qa_go").click().run()
    assert "result::Question answering" not in at.session_state
    assert not at.success and len(at.warning) == 1 and "both a context and a question" in at.warning[0].value
    assert not at.get("feedback")


def test_app_long_image_prompt_notice(app_env):
    at = new_app("Image generation")
    at.slider(key="img_steps").set_value(1)
    at.select_slider(key="img_size").set_value(64)
    at.text_area(key="img_prompt").set_value("a lighthouse at sunset " * 20)  # tiny CLIP takes 16 tokens
    at.button(key="img_go").click().run()
    assert_clean(at)
    assert any("Prompt too long for the text encoder" in i.value for i in at.info)
    assert "one image" in at.session_state["result::Image generation"]["cost"]


def test_offline_image_error_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(nlp_project.ModelLoadError) as err:
        nlp_project.load_image_pipeline("nobody-here/no-such-pipeline")
    message = str(err.value)
    assert "no local copy of nobody-here/no-such-pipeline" in message and "hf download" in message
    assert "model_index.json" not in message and "\n" not in message
    (tmp_path / "folder").mkdir()
    with pytest.raises(nlp_project.ModelLoadError, match="not a diffusers pipeline folder"):
        nlp_project.load_image_pipeline(str(tmp_path / "folder"))


def test_sentiment_by_prompt_scores_and_set(tiny_models):
    model, tok, _ = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    for prompt in nlp_project.SENTIMENT_PROMPTS:
        for calibrate in (False, True):
            scores, _ = nlp_project.sentiment_by_prompt(model, tok, "What a day", calibrate, prompt)
            assert set(scores) == set(nlp_project.SENTIMENT_LABELS) and abs(sum(scores.values()) - 1) < 1e-6
    with pytest.raises(ValueError, match="prompt must be"):
        nlp_project.sentiment_by_prompt(model, tok, "x", prompt="other")
    rows = nlp_eval.read_labelled_sentences(ROOT / "results/nlp/sentiment_set.tsv", with_kind=True)
    counts = {lab: sum(1 for label, _, kind in rows if label == lab and kind == "plain")
              for lab in nlp_project.SENTIMENT_LABELS}
    assert sum(counts.values()) >= 30 and len(set(counts.values())) == 1  # the plain ones balanced
    kinds = {kind: {label for label, _, k in rows if k == kind} for kind in nlp_eval.SENTIMENT_KINDS}
    assert kinds["sarcasm"] == {"negative"} and kinds["mixed"] == {"mixed"}
    report = nlp_eval.evaluate_sentiment(model, tok, rows[:6] + rows[-2:], calibrate=True, verdict=True)
    assert report["n"] == 8 and 0 <= report["accuracy"] <= 1 and report["per_kind"]["mixed"][1] == 2


# ---- sharing mode ------------------------------------------------------------------------------------
def test_shared_mode_rules(tiny_models, tmp_path):
    assert nlp_project.shared_mode({}, None) and nlp_project.shared_mode({}, "0.0.0.0")
    assert not nlp_project.shared_mode({}, "127.0.0.1") and not nlp_project.shared_mode({}, "localhost")
    assert nlp_project.shared_mode({"NLP_APP_SHARED": "1"}, "127.0.0.1")
    assert not nlp_project.shared_mode({"NLP_APP_SHARED": "0"}, "0.0.0.0")
    env = {"NLP_APP_MODEL_DIR": str(tiny_models)}
    nlp_project.check_model_allowed(str(tiny_models / "qa"), "qa", env)
    nlp_project.check_model_allowed(str(tiny_models / "causal-lm"), "sentiment", env)  # inside an allowed dir
    messages = set()
    for probe in ["/etc/passwd", "/etc", "/no/such/file.gguf", str(tmp_path), "../../etc/shadow", "evil/model"]:
        with pytest.raises(nlp_project.ModelLoadError) as err:
            nlp_project.check_model_allowed(probe, "qa", env)
        messages.add(str(err.value))
    assert len(messages) == 1 and "/" not in messages.pop().replace("NLP_APP_ALLOWED_MODEL_DIRS", "")
    assert nlp_project.public_name("/home/u/models/qa") == "models/qa"
    assert nlp_project.public_name("/x/y/SmolLM2.gguf") == "SmolLM2.gguf"
    assert nlp_project.scrub_paths("cannot open /srv/app/results/feedback.db: locked") == \
        "cannot open feedback.db: locked"


def test_csv_cells_are_neutralised(tmp_path):
    store = nlp_project.FeedbackStore(tmp_path / "fb.db")
    evil = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\t=1", "fine"]
    for i, text in enumerate(evil):
        store.record(f"o{i}", "Chatbot", "m", text, text, rating=3, comment=text)
    rows = list(csv.DictReader(io.StringIO(store.to_csv())))
    for row in rows:
        for column in ("input", "output", "comment"):
            assert not row[column].startswith(nlp_project.FORMULA_PREFIXES), row[column]
    assert {r["comment"] for r in rows} >= {"'=HYPERLINK(\"http://x\")", "fine"}
    shared = list(csv.DictReader(io.StringIO(store.to_csv(with_texts=False))))
    assert len(shared) == len(evil) and "input" not in shared[0] and "output" not in shared[0]


@pytest.mark.parametrize("make_bad", ["parent_is_file", "unwritable"])
def test_feedback_store_errors_are_one_line(tmp_path, make_bad):
    if make_bad == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "sub" / "fb.db"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        path = tmp_path / "ro" / "sub" / "fb.db"
    with pytest.raises(nlp_project.FeedbackStoreError) as err:
        nlp_project.FeedbackStore(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_app_feedback_store_error_is_one_line_not_a_traceback(app_env, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("NLP_APP_FEEDBACK_DB", str(tmp_path / "afile" / "fb.db"))
    at = new_app("Next-word prediction")
    at.button(key="nw_go").click().run()
    assert not at.exception and not at.error
    assert any(c.value.startswith("Ratings are off:") for c in at.caption) and not at.get("feedback")
    at.sidebar.radio(key="task").set_value("Feedback").run()
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value


def test_app_feedback_page_shows_user_text_as_text(app_env):
    store = nlp_project.FeedbackStore(app_env)
    evil = "![x](http://tracker.example/p.png) **bold** <img src=x onerror=alert(1)> [link](http://e.example)"
    store.record("a", "Chatbot", "m1", "hi", "hello", 5, evil)
    at = new_app("Feedback")
    assert_clean(at)
    assert evil in list(at.dataframe[1].value["comment"])  # a dataframe cell: plain text
    rendered = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.info]
    assert not any("tracker.example" in text or "e.example" in text for text in rendered)


def test_app_sharing_mode_hides_paths_and_other_peoples_texts(app_env, monkeypatch, tiny_models):
    monkeypatch.setenv("NLP_APP_SHARED", "1")
    store = nlp_project.FeedbackStore(app_env)
    store.record("a", "Chatbot", str(tiny_models / "causal-lm"), "my secret question", "an answer", 4, "ok")
    at = new_app("Feedback")
    assert_clean(at)
    page_text = " ".join(str(e.value) for e in list(at.markdown) + list(at.caption) + list(at.info))
    assert str(app_env) not in page_text and str(tiny_models) not in page_text
    assert [m.split("/")[-1] for m in at.dataframe[0].value["model"]] == ["causal-lm"]
    assert not any(m.startswith("/") for m in at.dataframe[0].value["model"])
    download = at.get("download_button")[0]
    assert "ratings and comments" in download.proto.label
    at.sidebar.radio(key="task").set_value("Summarization").run()
    errors = []
    for probe in ["/etc", "/no/such/folder"]:
        at.sidebar.text_input(key="model_custom::summarization").set_value(probe).run()
        at.text_area(key="sum_text").set_value("Some text.")
        at.button(key="sum_go").click().run()
        assert not at.exception and at.error
        errors.append(at.error[0].value)
    assert errors[0] == errors[1] and "/etc" not in errors[0]  # no probing of the server's files
    assert any("Sharing mode" in c.value for c in at.sidebar.caption)
    # The listed (allowed) model still works in sharing mode.
    at.sidebar.text_input(key="model_custom::summarization").set_value("").run()
    at.button(key="sum_go").click().run()
    assert_clean(at)


# ----------------------------------------------------------------------------------------------------
# Issue 17: no traceback reaches a stranger, a chat that converses, models sized to the device, share
# ----------------------------------------------------------------------------------------------------
# Strings a stranger may type into any box: tilde forms (an unknown user made expanduser raise),
# NUL bytes, a 10 kB line, a 300-character name (ENAMETOOLONG), URLs and a Markdown image, format
# strings, Windows paths, Unicode lookalikes (fullwidth solidus, Cyrillic letters, RTL override).
HOSTILE = [
    "~nosuchuser/x", "~", "~/x.gguf", "~root/../../etc/passwd", "a\x00b", "x" * 10_000, "m" * 300,
    "https://evil.example/model.gguf", "![x](https://tracker.invalid/p.png)", "{0} {__class__} %s %n {{}}",
    "C:\\Windows\\System32\\config\\SAM", "\\\\server\\share\\m.gguf", "\uff0fetc\uff0fpasswd",
    "\u0441at\u0435g\u043ery/m\u043edel", "\u202egguf.exe", "../" * 40 + "etc/shadow",
]


def server_paths() -> list[str]:
    """Paths of this server a visitor must never see: the repository, the Python install, home."""
    return [str(ROOT), sys.prefix, sys.base_prefix, str(Path.home())]


@pytest.fixture(autouse=True)
def restore_streamlit_options():
    """Sharing mode sets server-wide Streamlit options (error details, toolbar); undo after each test."""
    from streamlit import config

    keys = ("client.showErrorDetails", "client.toolbarMode", "browser.gatherUsageStats")
    saved = {k: config.get_option(k) for k in keys}
    yield
    for key, value in saved.items():
        config.set_option(key, value)


def rendered(at) -> str:
    """Everything AppTest holds of the page (every element's protobuf as text, sidebar included)."""
    parts = []

    def walk(node):
        if getattr(node, "proto", None) is not None:
            parts.append(str(node.proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(parts)


def test_hostile_corpus_has_no_server_path():
    assert not any(p in s for s in HOSTILE for p in server_paths() if len(p) > 1)


@pytest.mark.parametrize("shared", [False, True])
def test_model_box_path_handling_never_raises(tiny_models, shared):
    env = {"NLP_APP_MODEL_DIR": str(tiny_models), "HF_HUB_OFFLINE": "1"}
    for spec in HOSTILE:
        text, _ = nlp_project.clean_text(spec, max_chars=1000)  # what the sidebar hands over
        for entry in (spec, text):
            for kind in ("causal-lm", "qa", "image"):
                if shared:
                    with pytest.raises(nlp_project.ModelLoadError) as err:
                        nlp_project.check_model_allowed(entry, kind, env)
                    assert "\n" not in str(err.value)
            key = nlp_project.model_key(entry)
            assert isinstance(key, str)
            try:
                nlp_project.split_model_source(entry)
            except nlp_project.ModelLoadError as exc:
                assert len(str(exc)) < 300
            assert len(nlp_project.public_name(entry)) <= 120
    assert nlp_project.user_path("~nosuchuser/x") is None and nlp_project.resolved_path("a\x00b") is None
    assert not nlp_project.path_is(Path("m" * 300)) and not nlp_project.path_is(None)


# Every page, its text inputs, its button, and settings that keep the tiny models fast.
PAGE_INPUTS = {
    "Next-word prediction": ("causal-lm", ["nw_text"], "nw_go", {}),
    "Story generation": ("causal-lm", ["story_text"], "story_go", {"story_max": 6}),
    "Chatbot": ("causal-lm", ["chat_system"], None, {"chat_max": 6}),
    "Sentiment analysis": ("sentiment", ["sent_text"], "sent_go", {}),
    "Question answering": ("qa", ["qa_context", "qa_question"], "qa_go", {}),
    "Summarization": ("summarization", ["sum_text"], "sum_go", {"sum_min": 5, "sum_max": 8}),
    "Image generation": ("image", ["img_prompt"], "img_go", {"img_steps": 1, "img_size": 64}),
}


def _submit(at, task: str, text: str) -> None:
    kind, areas, button, knobs = PAGE_INPUTS[task]
    for key, value in knobs.items():
        found = [w for w in (at.select_slider if key == "img_size" else at.slider) if w.key == key]
        if found:  # the Chatbot's sliders are there only once its model loaded
            found[0].set_value(value)
    for key in areas:
        for widget in [w for w in at.text_area if w.key == key]:
            widget.set_value(text)
    if button is None:
        if at.chat_input:
            at.chat_input[0].set_value(text)
        at.run()
    else:
        at.button(key=button).click().run()


@pytest.mark.parametrize("shared", ["0", "1"])
def test_app_hostile_corpus_every_box_both_modes(app_env, monkeypatch, caplog, shared):
    """Each hostile string goes once into the model box and once into every text box of a page with
    its working model (pages in turn, shifted between the modes); then every page gets the whole
    corpus at once in every box, and the last output a hostile rating comment. No exception, one
    line per error, and no server path anywhere on the page or in the CSV download."""
    import streamlit as st

    monkeypatch.setenv("NLP_APP_SHARED", shared)
    downloads = []
    original = st.download_button

    def spy(label, data, *args, **kwargs):
        downloads.append(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
        return original(label, data, *args, **kwargs)

    monkeypatch.setattr(st, "download_button", spy)
    forbidden = [p for p in server_paths() if len(p) > 1]
    tasks = list(PAGE_INPUTS)
    everything = "\n".join(HOSTILE)
    runs = [(tasks[i % len(tasks)], text, text) for i, text in enumerate(HOSTILE)]  # in the model box
    runs += [(tasks[(i + 3 + int(shared)) % len(tasks)], text, "") for i, text in enumerate(HOSTILE)]
    runs += [(task, everything, "") for task in tasks]
    at = new_app("Next-word prediction")
    for task, text, box in sorted(runs, key=lambda r: tasks.index(r[0])):
        kind = PAGE_INPUTS[task][0]
        if at.sidebar.radio(key="task").value != task:
            at.sidebar.radio(key="task").set_value(task).run()
        at.sidebar.text_input(key=f"model_custom::{kind}").set_value(box).run()
        _submit(at, task, text)
        where = (task, text[:30], box[:30])
        assert not at.exception, (where, [e.value for e in at.exception])
        assert len(at.error) <= 1 and all("\n" not in e.value for e in at.error), where
        if box:
            assert at.error and "Could not load the model" in at.error[0].value, where
        assert not [p for p in forbidden if p in rendered(at)], where
        if not box and at.get("feedback") and task == "Summarization":  # a hostile comment, rated
            at.feedback[-1].set_value(2).run()
            [c for c in at.text_input if (c.key or "").startswith("comment::")][-1].set_value(everything).run()
            assert not at.exception
    at.sidebar.radio(key="task").set_value("Feedback").run()
    assert not at.exception and not at.error
    assert downloads and "Summarization" in downloads[-1]  # the CSV, with the hostile comment's row
    assert not [p for p in forbidden for d in downloads if p in d]
    assert not [p for p in forbidden if p in rendered(at)]
    # Expected failures are one-line messages; nothing reached the guard (an unexpected exception).
    assert not [r for r in caplog.records if r.name == "nlp_project" and r.levelname == "ERROR"], \
        [r.getMessage() for r in caplog.records if r.name == "nlp_project"]


@pytest.mark.parametrize("shared", ["0", "1"])
def test_app_unexpected_error_is_one_line_and_the_session_goes_on(app_env, monkeypatch, caplog, shared):
    monkeypatch.setenv("NLP_APP_SHARED", shared)
    at = new_app("Sentiment analysis")
    # A stored output the page cannot draw (what any unforeseen bug looks like from outside).
    at.session_state["result::Sentiment analysis"] = {"id": "x", "notices": [], "by_prompt": False,
                                                      "scores": f"not a dict {ROOT}/secret.py"}
    at.run()
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    message = at.error[0].value
    assert message.startswith("Sentiment analysis failed") and "reference" in message
    assert str(ROOT) not in rendered(at)
    if shared == "1":
        assert "Error" not in message and "secret" not in message  # no exception type or text at all
        from streamlit import config

        assert config.get_option("client.showErrorDetails") in (False, "false", "none")
        assert config.get_option("client.toolbarMode") == "viewer"
    else:
        assert "AttributeError" in message
    ref = message.split("reference ")[1][:8]
    logged = [r for r in caplog.records if r.name == "nlp_project" and ref in r.getMessage()]
    assert logged and logged[0].exc_info  # the traceback is on the server
    at.run()  # the broken output was dropped: the page works again
    assert_clean(at)
    at.button(key="sent_go").click().run()
    assert_clean(at)
    assert "scores" in at.session_state["result::Sentiment analysis"]


def test_shipped_streamlit_config():
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["enableXsrfProtection"] is True


def test_sharing_mode_csv_has_public_model_names(app_env, monkeypatch, tiny_models):
    store = nlp_project.FeedbackStore(app_env)
    store.record("a", "Chatbot", str(tiny_models / "causal-lm"), "q", "a", 4, "ok")
    store.record("b", "Chatbot", "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", "q", "a", 3, "")
    rows = list(csv.DictReader(io.StringIO(store.to_csv(with_texts=False, model_name=nlp_project.public_name))))
    assert {r["model"] for r in rows} == {f"{tiny_models.name}/causal-lm", "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert str(tiny_models) in store.to_csv()  # private mode keeps the full entry
    import streamlit as st

    monkeypatch.setenv("NLP_APP_SHARED", "1")
    downloads = []
    original = st.download_button
    monkeypatch.setattr(st, "download_button", lambda label, data, *a, **k: (downloads.append(data),
                                                                              original(label, data, *a, **k))[1])
    at = new_app("Feedback")
    assert_clean(at)
    assert downloads and str(tiny_models) not in downloads[-1] and "/srv/models" not in downloads[-1]


# ---- models sized to the device ------------------------------------------------------------------
def _fake_cuda(monkeypatch, memory_gb: float | None, name: str = "Tesla T4"):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: memory_gb is not None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: types.SimpleNamespace(name=name, total_memory=int((memory_gb or 0) * 1e9)))


@pytest.mark.parametrize("memory_gb, offline, expected", [
    (15.8, "0", "Qwen/Qwen2.5-1.5B-Instruct"),            # a Colab T4
    (4.0, "0", "HuggingFaceTB/SmolLM2-360M-Instruct"),    # a small GPU
    (None, "0", "HuggingFaceTB/SmolLM2-360M-Instruct"),   # CPU
    (15.8, "1", "gguf"),                                   # offline: the bundled GGUF, if installed
])
def test_default_text_model_follows_the_device(monkeypatch, memory_gb, offline, expected):
    _fake_cuda(monkeypatch, memory_gb)
    monkeypatch.setattr(__import__("torch").backends.mps, "is_available", lambda: False)
    env = {"HF_HUB_OFFLINE": offline}
    model, why = nlp_project.default_text_model(env)
    choices = nlp_project.model_choices("causal-lm", env)
    gguf = nlp_project.smollm2_gguf_path()
    if expected == "gguf":
        expected = gguf or "Qwen/Qwen2.5-1.5B-Instruct"
    assert model == expected == choices[0] and len(set(choices)) == len(choices)
    if offline == "0":  # only the text tasks follow the device
        assert nlp_project.model_choices("qa", env)[0] == nlp_project.HUB_MODELS["qa"][0]
    reason = nlp_project.default_reason("causal-lm", env)
    if model.endswith(".gguf"):
        assert "offline" in why and "GGUF" in reason
    elif memory_gb and memory_gb >= nlp_project.GPU_MODEL_MIN_GB:
        assert "Tesla T4" in why and "16 GB" in why and "fp16" in why and model in reason
    else:
        assert ("no CUDA GPU" in why or "only 4 GB" in why) and model in reason


def test_sidebar_says_why_it_picked_the_model(app_env, monkeypatch):
    nlp_project.pick_device()  # accelerate's device is fixed before torch.cuda is faked
    monkeypatch.delenv("NLP_APP_MODEL_DIR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _fake_cuda(monkeypatch, 15.8)
    at = new_app("Story generation")  # nothing is loaded until Generate is pressed
    assert not at.exception
    captions = [c.value for c in at.sidebar.caption]
    assert any("Qwen/Qwen2.5-1.5B-Instruct" in c and "Tesla T4" in c for c in captions), captions
    assert at.sidebar.selectbox(key="model::causal-lm").value == "Qwen/Qwen2.5-1.5B-Instruct"
    _fake_cuda(monkeypatch, None)
    at.run()
    assert any("SmolLM2-360M-Instruct" in c and "no CUDA GPU" in c for c in
               [c.value for c in at.sidebar.caption])


# ---- a chat that converses -----------------------------------------------------------------------
def test_ngram_blocker():
    blocker = nlp_project.NGramBlocker(3, earlier=[[7, 8, 9, 10]])
    assert blocker.banned([7]) == set()
    assert blocker.banned([7, 8]) == {9}               # would copy "7 8 9" from the earlier reply
    blocker = nlp_project.NGramBlocker(3, earlier=[[7, 8, 9, 10]])
    assert blocker.banned([1, 2, 3, 1, 2]) == {3}      # would repeat its own "1 2 3"
    assert blocker.banned([1, 2, 3, 1, 2, 5, 6]) == set()
    with pytest.raises(ValueError):
        nlp_project.NGramBlocker(1)


def test_chat_decoding_defaults_and_no_repeats(tiny_models, tmp_path):
    loaded = nlp_project.load_text_model(str(tiny_models / "causal-lm"), "causal-lm")
    values, source = nlp_project.decoding_defaults(loaded)
    assert values == nlp_project.APP_CHAT_DECODING and "app's default" in source
    loaded.model.generation_config.do_sample = True  # what a generation_config.json with sampling says
    loaded.model.generation_config.temperature, loaded.model.generation_config.top_p = 0.6, 0.8
    values, source = nlp_project.decoding_defaults(loaded)
    assert (values["temperature"], values["top_p"], source) == (0.6, 0.8, "the model's generation_config.json")
    smol = nlp_project.LoadedModel("HuggingFaceTB/SmolLM2-135M-Instruct", "causal-lm", "transformers",
                                   type("M", (), {"generation_config": None})(), None, 0.0)
    values, source = nlp_project.decoding_defaults(smol)
    assert (values["temperature"], values["top_p"]) == (0.2, 0.9) and "SmolLM2" in source
    # The no-repeat rule holds in what the transformers backend generates, seeded and reproducible.
    model, tok = loaded.model, loaded.tokenizer
    history = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "The quick brown fox jumps."},
               {"role": "user", "content": "Once upon a time"}]
    base = nlp_project.GenerationSettings(max_new_tokens=40, temperature=1.0, top_p=1.0, top_k=0,
                                          repetition_penalty=1.0, no_repeat_ngram=3)
    replies = [nlp_eval.chat_reply(model, tok, history, base, system="Be brief.")[0] for _ in range(2)]
    assert replies[0] == replies[1]  # seeded
    inputs, _ = nlp_project.chat_inputs(model, tok, history, 40, system="Be brief.")
    settings = nlp_project.chat_settings_for(model, tok, history, base)
    assert settings.seed == base.seed + 2 and len(settings.earlier_replies) == 1
    ids = []
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        ids.extend(out[0, inputs["input_ids"].shape[1]:].tolist())
        return out

    model.generate = spy
    try:
        nlp_project.generate_text(model, tok, inputs, settings)
    finally:
        del model.generate
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    earlier = list(settings.earlier_replies[0])
    assert len(ids) > 10 and len(grams) == len(set(grams))
    assert not set(grams) & {tuple(earlier[i:i + 3]) for i in range(len(earlier) - 2)}
    prompt = tok.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("The quick brown fox jumps.") == 1  # each earlier message once, with its role


# ---- share: sharing mode follows reachability -----------------------------------------------------
FAKE_CLOUDFLARED = '''#!{python}
import os, signal, sys, time
open(os.environ["FAKE_CLOUDFLARED_LOG"], "w").write(repr(sys.argv[1:]) + "\\n" + str(os.getpid()))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
for line in ["INF Requesting new quick Tunnel on trycloudflare.com...",
             "INF +--------------------------------------------------------------------------------------------+",
             "INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |",
             "INF |  https://fake-words-for-tests.trycloudflare.com                                            |",
             "INF +--------------------------------------------------------------------------------------------+",
             "INF Registered tunnel connection https://fake-words-for-tests.trycloudflare.com again"]:
    print("2026-12-02T00:00:00Z " + line, file=sys.stderr, flush=True)
while True:
    time.sleep(1)
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_share_commands_bind_loopback_in_sharing_mode():
    app, env, tunnel = nlp_project.share_commands(8501, "/opt/cloudflared")
    assert app[:4] == [sys.executable, "-m", "streamlit", "run"] and app[4].endswith("nlp_project.py")
    flags = dict(zip(app[5::2], app[6::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8501"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--client.showErrorDetails"] == "false"
    assert env["NLP_APP_SHARED"] == "1" and nlp_project.shared_mode(env, "127.0.0.1")
    assert tunnel == ["/opt/cloudflared", "tunnel", "--no-autoupdate", "--url", "http://127.0.0.1:8501"]
    assert nlp_project.share_commands(8501, None)[2] is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
@pytest.mark.parametrize("with_cloudflared", [True, False])
def test_share_prints_the_public_url_and_stops_both_children(tmp_path, with_cloudflared):
    import signal
    import subprocess
    import time
    import urllib.request

    bindir = tmp_path / "bin"
    bindir.mkdir()
    if with_cloudflared:
        fake = bindir / "cloudflared"
        fake.write_text(FAKE_CLOUDFLARED.replace("{python}", sys.executable))
        fake.chmod(0o755)
    # PATH without any real cloudflared; the programs are started by absolute path (sys.executable).
    import shutil

    path = [str(bindir)] + [d for d in os.environ.get("PATH", "").split(os.pathsep)
                            if d and not shutil.which("cloudflared", path=d)]
    port = _free_port()
    env = {**os.environ, "PATH": os.pathsep.join(path), "FAKE_CLOUDFLARED_LOG": str(tmp_path / "fake.log"),
           "NLP_APP_FEEDBACK_DB": str(tmp_path / "fb.db"), "HF_HUB_OFFLINE": "1", "NLP_APP_SHARED": "0"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "nlp_project.py"), "share", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        deadline = time.time() + 240
        want = "public URL:" if with_cloudflared else "cloudflared is not on PATH"
        while time.time() < deadline and not any(line.startswith(want) for line in lines):
            line = proc.stdout.readline()
            assert line, f"share exited early (code {proc.poll()}): {lines}"
            lines.append(line.rstrip("\n"))
        if with_cloudflared:
            lines.append(proc.stdout.readline().rstrip("\n"))  # the line on what a stranger can do
            assert [x for x in lines if x.startswith("public URL:")] == \
                ["public URL: https://fake-words-for-tests.trycloudflare.com"]
            assert "stranger" in lines[-1] and "cannot" in lines[-1]
            argv, fake_pid = (tmp_path / "fake.log").read_text().splitlines()
            assert eval(argv) == ["tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"]
        else:
            assert [x for x in lines if x.startswith("cloudflared is not on PATH")] and \
                "https://github.com/cloudflare/cloudflared/releases" in lines[-1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=10) as reply:
            assert reply.status == 200  # the app serves either way
        app_pid = [p for p in _children_of(proc.pid) if "streamlit" in Path(f"/proc/{p}/cmdline").read_text()][0]
        app_env = dict(item.split("=", 1) for item in Path(f"/proc/{app_pid}/environ").read_text().split("\0")
                       if "=" in item)
        assert app_env["NLP_APP_SHARED"] == "1"  # forced on, although the caller had it off
        assert "127.0.0.1" in Path(f"/proc/{app_pid}/cmdline").read_text().split("\0")
        proc.send_signal(signal.SIGTERM)  # what `kill PID` of a background `share` does
        assert proc.wait(timeout=60) == 0
        assert not _alive(app_pid)
        if with_cloudflared:
            assert not _alive(int(fake_pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
