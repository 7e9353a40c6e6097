"""Shared test setup: the three programs live at the repository root and are imported as modules."""

import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Real MNIST / Fashion-MNIST in torchvision's layout, beside the checkout (absent: those tests skip).
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def no_downloads(monkeypatch):
    """Make every torchvision download fail at once, as it does offline (the CNN tests use it)."""
    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(getattr(torchvision.datasets, name), "download", offline)
