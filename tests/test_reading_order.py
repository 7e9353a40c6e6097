"""The programs read as lessons: in cnn_project.py the recipe, the seven networks and one visible
training loop come first, before one banner and the machinery; every model names its paper and
writes the tensor's shape after its stages (checked against a real forward pass); seq2seq_project.py
shows its training loop in one function; no function of the CNN or seq2seq program is over 60 lines
(nlp_project.py's layout and lengths are held by tests/test_nlp_offline.py)."""

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import cnn_project as cp

ROOT = Path(__file__).resolve().parents[1]
MACHINERY_BANNER = "# ===== THE MACHINERY"
SHAPE = re.compile(r"\bN x (\d+) x (\d+) x (\d+)\b")


def functions(path: Path) -> list:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def length(node) -> int:
    return node.end_lineno - node.lineno + 1


def training_loops(path: Path) -> list:
    """Functions that call `.backward(` inside a `for` inside a `for` (epochs, then batches)."""
    found = []
    for fn in functions(path):
        for outer in (n for n in ast.walk(fn) if isinstance(n, ast.For)):
            inner = [n for n in ast.walk(outer) if isinstance(n, ast.For) and n is not outer]
            if any(isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "backward"
                   for loop in inner for c in ast.walk(loop)):
                found.append(fn)
                break
    return found


@pytest.mark.parametrize("program", ["cnn_project.py", "seq2seq_project.py"])
def test_no_function_is_over_60_lines(program):
    long = [(f.name, f.lineno, length(f)) for f in functions(ROOT / program) if length(f) > 60]
    assert not long, long


@pytest.mark.parametrize("program", ["cnn_project.py", "seq2seq_project.py"])
def test_one_visible_training_loop_on_one_screen(program):
    loops = training_loops(ROOT / program)
    assert len(loops) == 1, [f.name for f in loops]
    assert length(loops[0]) <= 60, (loops[0].name, length(loops[0]))


def test_cnn_lesson_comes_before_the_machinery():
    """The recipe, the presets, the seven networks, augment and the training loop are defined within
    the first 1,000 lines, all above the one banner that starts the machinery."""
    lines = (ROOT / "cnn_project.py").read_text().splitlines()
    banner = [i + 1 for i, line in enumerate(lines) if line.startswith(MACHINERY_BANNER)]
    assert len(banner) == 1, banner
    tree = ast.parse("\n".join(lines))
    defined = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined[target.id] = node.lineno
    lesson = ["RECIPE", "PRESETS", "augment", training_loops(ROOT / "cnn_project.py")[0].name]
    lesson += [model_class(name).__name__ for name in cp.MODELS_REGISTRY]
    late = {name: defined[name] for name in lesson if defined[name] > min(1000, banner[0])}
    assert not late, late


def test_module_docstring_maps_every_section():
    """The module docstring opens with a map naming each banner's section."""
    lines = (ROOT / "cnn_project.py").read_text().splitlines()
    titles = [re.match(r"[A-Z][A-Z &]*[A-Z]", lines[i + 1][2:]).group() for i in range(len(lines) - 2)
              if re.fullmatch(r"# ={20,}", lines[i]) and re.fullmatch(r"# ={20,}", lines[i + 2])]
    assert len(titles) >= 10, titles
    head = cp.__doc__.split("python cnn_project.py")[0]  # the map, before the example commands
    assert not [t for t in titles if t not in head], titles
    assert "THE LESSON" in head and "THE MACHINERY" in head


def model_class(name: str) -> type:
    return type(cp.build_model(name, 3, 10, 0.25, 32))


def model_classes(cls) -> list:
    """The class, its bases from cnn_project and the cnn_project classes its source names (its blocks)."""
    found = [c for c in inspect.getmro(cls) if c.__module__ == "cnn_project"]
    for name, obj in vars(cp).items():
        if (inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == "cnn_project"
                and obj not in found and re.search(rf"\b{name}\(", inspect.getsource(cls))):
            found.append(obj)
    return found


def module_shapes(model: torch.nn.Module, x: torch.Tensor) -> set:
    """(C, H, W) of the input and of every 4-D tensor any submodule returns, in one forward pass."""
    seen = {tuple(x.shape[1:])}

    def hook(module, args, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                seen.add(tuple(t.shape[1:]))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(cp.MODELS_REGISTRY))
def test_every_model_names_its_paper_and_writes_its_shapes(name):
    """A docstring with the paper's year; at least three `N x C x H x W` comments in the model or its
    blocks, each the shape of some tensor of a real forward pass at width 1.0 (CIFAR-10 or MNIST)."""
    cls = model_class(name)
    assert re.search(r"\b(19|20)\d\d\b", cls.__doc__ or ""), f"{cls.__name__}: no paper year"
    comments = [tuple(map(int, m)) for c in model_classes(cls)
                for m in SHAPE.findall(inspect.getsource(c))]
    assert len(comments) >= 3, (cls.__name__, comments)
    torch.manual_seed(0)
    real = set()
    for channels, side in ((3, 32), (1, 28)):
        model = cp.build_model(name, channels, 10, 1.0, side)
        real |= module_shapes(model, torch.randn(2, channels, side, side))
    wrong = sorted(set(comments) - real)
    assert not wrong, (cls.__name__, wrong)
