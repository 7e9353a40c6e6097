"""nlp_project.py's pages at their edges, through AppTest on the tiny models of tests/nlp_fixtures.py:
widgets are enabled again after a streamed reply, a reply cut at the token limit says so and can be
continued, and feedback keeps what the user wrote."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_nlp import app_env, assert_clean, db_rows, new_app, tiny_models  # noqa: E402,F401 - fixtures


def all_enabled(at) -> bool:
    """True when no widget of the page (sidebar included) is drawn disabled."""
    widgets = [*at.button, *at.slider, *at.text_area, *at.text_input, *at.radio, *at.selectbox, *at.chat_input,
               *at.toggle, *at.number_input]
    return not [w for w in widgets if getattr(w, "disabled", False)]


def test_a_cut_chat_reply_says_so_and_continues_in_place(app_env):
    at = new_app("Chatbot")
    at.sidebar.slider(key="chat_max").set_value(8)  # the random tiny model never ends by itself in 8 tokens
    at.chat_input[0].set_value("Hello!").run()
    assert_clean(at)
    assert "generating" not in at.session_state and all_enabled(at)
    reply = at.session_state["chat_history"][-1]
    assert reply["cut"] == 8 and any("Cut at the limit of 8 new tokens" in i.value for i in at.info)
    at.button(key=f"more::{reply['id']}").click().run()
    assert_clean(at)
    history = at.session_state["chat_history"]
    longer = history[-1]
    assert len(history) == 2 and longer["content"].startswith(reply["content"][:10])
    assert len(longer["content"]) > len(reply["content"]) and longer["id"] != reply["id"]
    assert len(at.chat_message) == 2 and len(at.feedback) == 1 and all_enabled(at)


def test_a_cut_story_says_so_and_continues(app_env):
    at = new_app("Story generation")
    at.text_area(key="story_text").set_value("Once upon a time")
    at.slider(key="story_max").set_value(8)
    at.button(key="story_go").click().run()
    assert_clean(at)
    story = at.session_state["result::Story generation"]
    assert story["cut"] == 8 and any("Cut at the limit" in i.value for i in at.info) and all_enabled(at)
    assert story["input"] == "Once upon a time"  # typed and sent with the click, while the box was disabled
    at.button(key=f"more::{story['id']}").click().run()
    assert_clean(at)
    longer = at.session_state["result::Story generation"]
    assert longer["output"].startswith(story["output"]) and len(longer["output"]) > len(story["output"])
    assert any(longer["output"][:20] in m.value for m in at.markdown)


def test_a_failed_generation_is_one_line_and_the_page_works_again(app_env):
    at = new_app("Chatbot")
    at.session_state["generating"] = {"page": "Chatbot", "loaded": None, "inputs": {}, "settings": None,
                                      "text": "x", "spec": "m"}
    at.run()
    assert not at.exception and len(at.error) == 1 and "Generation failed" in at.error[0].value
    assert "generating" not in at.session_state and all_enabled(at)


def test_every_chat_reply_carries_the_models_caveat(app_env, monkeypatch):
    """The tiny model was never measured: each reply says so beside it. With a measured score below the
    trusted level, each reply names that score; at or above it, no caveat."""
    import nlp_project

    at = new_app("Chatbot")
    at.sidebar.slider(key="chat_max").set_value(8)
    for message in ("Hello!", "And again?"):
        at.chat_input[0].set_value(message).run()
    caveats = [c.value for c in at.caption if "Not checked" in c.value]
    assert len(caveats) == 2 and "no factual score was measured" in caveats[0]
    score = {"model": "M", "right": "19-21", "n": 26, "share": 0.77}
    monkeypatch.setattr(nlp_project, "facts_score", lambda spec: score)
    assert "answered only 19-21 of 26 simple factual questions" in nlp_project.reply_caveat("m")
    score["share"] = nlp_project.FACTS_TRUSTED
    assert nlp_project.reply_caveat("m") == ""


def test_feedback_keeps_what_the_user_wrote(app_env):
    """A comment typed before the stars waits in its box with a line saying why, and is saved with the stars; a
    comment over the limit says it was cut; the Feedback page names a local model short, the CSV in full."""
    import nlp_project

    at = new_app("Story generation")
    at.slider(key="story_max").set_value(8)
    at.button(key="story_go").click().run()
    result = at.session_state["result::Story generation"]
    at.text_input(key=f"comment::{result['id']}").set_value("lovely start").run()
    assert any("Choose the stars to save this comment" in c.value for c in at.caption) and not db_rows(app_env)
    at.feedback[0].set_value(4).run()
    assert db_rows(app_env) == [("Story generation", result["model"], 5, "lovely start")]
    limit = nlp_project.CONFIG["max_comment_chars"]
    at.text_input(key=f"comment::{result['id']}").set_value("x" * (limit + 50)).run()
    assert any(f"Comments hold {limit:,} characters at most" in c.value for c in at.caption)
    assert db_rows(app_env)[0][3] == "x" * limit
    at.sidebar.radio(key="task").set_value("Feedback").run()
    shown = [str(v) for frame in at.dataframe for v in frame.value["model"]]
    assert shown == [nlp_project.public_name(result["model"])] * 2 and result["model"] not in shown
    store = nlp_project.FeedbackStore(app_env)
    assert result["model"] in store.to_csv()  # the page's CSV (private mode) has the full name


def test_sentiment_by_prompt_says_mixed_or_unsure_when_the_evidence_is_weak():
    import nlp_project

    margin = nlp_project.SENTIMENT_MARGIN
    assert nlp_project.sentiment_verdict({"positive": 0.5 + margin, "negative": 0.5 - margin, "neutral": 0}) \
        == "positive"
    assert nlp_project.sentiment_verdict({"positive": 0.45, "negative": 0.4, "neutral": 0.15}) == "mixed"
    assert nlp_project.sentiment_verdict({"neutral": 0.45, "positive": 0.35, "negative": 0.2}) == "unsure"


def _sentiment_guess():
    import nlp_project
    import streamlit as st

    nlp_project.show_sentiment_guess(st.session_state["scores"], st.session_state["spec"])


def test_the_sentiment_page_shows_a_relative_preference_and_the_measured_accuracy(app_env, tiny_models):
    """By prompt, the page names its number a relative preference, not a confidence, and states how often its
    verdict was right on the committed labelled set (sarcasm and mixed reviews counted apart)."""
    import json

    import nlp_project
    from streamlit.testing.v1 import AppTest

    at = new_app("Sentiment analysis")
    at.sidebar.text_input(key="model_custom::sentiment").set_value(str(tiny_models / "causal-lm")).run()
    at.button(key="sent_go").click().run()
    assert_clean(at)
    captions = " ".join(c.value for c in at.caption)
    assert "relative preference between the three label words" in captions and "not the chance" in captions
    assert "confidence" not in " ".join(m.label + str(m.value) for m in at.metric).lower()
    assert "was not measured for this model" in captions  # the tiny model
    report = json.loads((nlp_project.RESULTS_DIR / nlp_project.SENTIMENT_RESULTS).read_text())
    measured = report["results"][nlp_project.SENTIMENT_PAGE]
    assert {"sarcasm", "mixed", "plain"} <= set(measured["per_kind"]) and report["data"].startswith("results/")
    at = AppTest.from_function(_sentiment_guess, default_timeout=60)
    at.session_state["scores"] = {"positive": 0.45, "negative": 0.40, "neutral": 0.15}
    at.session_state["spec"] = f"/some/folder/{report['model']}"  # the measured model, as the page names it
    at.run()
    captions = " ".join(c.value for c in at.caption)
    (sarcastic, n_sarcastic), (mixed, n_mixed) = measured["per_kind"]["sarcasm"], measured["per_kind"]["mixed"]
    assert at.metric[0].value == "mixed" and "evidence is weak" in captions
    assert f"{sarcastic} of {n_sarcastic} sarcastic ones" in captions and f"{mixed} of {n_mixed} mixed" in captions


def test_a_model_typed_just_before_generate_is_the_one_used_and_stays_typed(app_env, tiny_models):
    at = new_app("Story generation")
    typed = str(Path(tiny_models) / "causal-lm")
    at.sidebar.text_input(key="model_custom::causal-lm").set_value(typed)  # sent with the click, in one run
    at.text_area(key="story_text").set_value("Once upon a time")
    at.button(key="story_go").click().run()
    assert_clean(at)
    assert at.sidebar.text_input(key="model_custom::causal-lm").value == typed
    assert at.session_state["result::Story generation"]["model"] == typed


def test_continue_asks_the_model_that_wrote_the_reply_after_another_was_picked(tiny_models, monkeypatch):
    import dataclasses

    import nlp_project
    wrote = nlp_project.load_text_model(str(Path(tiny_models) / "causal-lm"), "causal-lm")
    picked = dataclasses.replace(wrote, spec="another chat model")  # chosen in the sidebar after the cut reply
    history = [{"role": "user", "content": "Hello!"},
               {"role": "assistant", "content": "Hi there, I am", "id": "r1", "model": wrote.spec, "cut": 8}]
    loads, requests = [], []
    monkeypatch.setattr(nlp_project, "get_model", lambda spec, kind: loads.append(spec) or (wrote, True))
    monkeypatch.setattr(nlp_project, "request_generation", lambda page, **request: requests.append(request))
    nlp_project.chat_continue(picked, history, nlp_project.GenerationSettings(max_new_tokens=8), "")
    assert loads == [wrote.spec] and requests[0]["loaded"].spec == requests[0]["spec"] == wrote.spec
