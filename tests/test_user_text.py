"""What a learner reads speaks to the learner, not about how the project was built: no user-facing
text (README.md, docs/*.md, the cells of colab.ipynb, the --help of the three programs and of
benchmarks/nlp_eval.py, the app's own strings) holds a placeholder repository (OWNER/REPO), a development-only path (../shared, the lock
file under /tmp), the word "workplace", or a reference to the project's issue tracker ("issue 12",
"issues 10, 11 and 15", "#17", "the issue's targets").

Measurement notes stay, stated plainly: machine, command and date ("a 2-core AMD EPYC VM, 2026-12-02").
The --help texts are run for real (each program imports torch: a few seconds each)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# (pattern, why it does not belong in a learner's text)
FORBIDDEN = [
    (re.compile(r"OWNER/REPO"), "a placeholder repository: say what to put there instead"),
    (re.compile(r"\.\./shared"), "a folder that exists only where the project was developed"),
    (re.compile(r"heavy\.lock|heavy-job lock|\bflock\b"), "the development machine's lock"),
    (re.compile(r"workplace", re.I), "the people who built it, not the learner"),
    (re.compile(r"\bissues?\s+#?\d+", re.I), "a reference to the issue tracker"),
    (re.compile(r"(?<![\w&/#])#\d{1,5}\b(?![\w-])"), "a reference to the issue tracker"),
    (re.compile(r"\bthe issue\b", re.I), "a reference to the issue tracker"),
    (re.compile(r"\b(this|previous|other|another) sessions?\b", re.I), "the development sessions"),
]


def offences(text: str) -> list:
    """'line N: <the match> (<why>)' for every forbidden phrase in `text`."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in FORBIDDEN:
            for match in pattern.finditer(line):
                found.append(f"line {number}: {match.group(0)!r} ({why}): {line.strip()[:120]}")
    return found


def test_the_checker_sees_each_forbidden_phrase_and_passes_plain_text():
    bad = ["https://colab.research.google.com/github/OWNER/REPO/blob/main/colab.ipynb",
           "python cnn_project.py --data-dir ../shared/data", "every command ran under `flock /tmp/heavy.lock`",
           "on this workplace's AMD EPYC", "Against issue 15's targets:", "(issues 10, 11 and 15)",
           "Issue 17 adds 20 tests", "fixed in #17.", "The issue quotes a bar",
           "The previous session also tried"]
    for line in bad:
        assert offences(line), line
    good = ["measured on a 2-core AMD EPYC VM, 2026-12-02", "st.session_state", "several sessions can write",
            "[details](docs/cnn_project.md#getting-the-data)", "color #1f77b4", "&#8594;", "seed 0, 1 and 2",
            "tests/test_cnn.py: 92 passed", "the issues a learner meets"]
    for line in good:
        assert not offences(line), (line, offences(line))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_to_the_learner(page):
    found = offences(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}:\n" + "\n".join(found)


def test_the_notebook_speaks_to_the_learner():
    notebook = json.loads((ROOT / "colab.ipynb").read_text())
    found = []
    for cell in notebook["cells"]:
        found += [f"cell {cell.get('id')}: {o}" for o in offences("".join(cell["source"]))]
    assert not found, "\n".join(found)


HELP = [["cnn_project.py", "--help"], ["seq2seq_project.py", "--help"], ["nlp_project.py", "--help"],
        ["nlp_project.py", "share", "--help"], ["benchmarks/nlp_eval.py", "--help"],
        ["benchmarks/nlp_eval.py", "bench", "--help"], ["benchmarks/nlp_eval.py", "eval-sentiment", "--help"]]


@pytest.mark.parametrize("args", HELP, ids=lambda a: " ".join(a))
def test_help_speaks_to_the_learner(args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
    found = offences(done.stdout)
    assert not found, f"{' '.join(args)}:\n" + "\n".join(found)


def test_the_apps_own_strings_speak_to_the_learner():
    """Every string literal in nlp_project.py that is not a docstring or a comment: the app's titles,
    help texts, notices and errors."""
    tree = ast.parse((ROOT / "nlp_project.py").read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    strings = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    assert len(strings) > 100  # the walk found the app's texts
    found = [f"{s[:80]!r}: {o}" for s in strings for o in offences(s)]
    assert not found, "\n".join(found)
