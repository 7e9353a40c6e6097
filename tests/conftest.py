"""Shared test setup: the three programs live at the repository root and are imported as modules."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Real MNIST / Fashion-MNIST in torchvision's layout, beside the checkout (absent: those tests skip).
SHARED_DATA = ROOT.parent / "shared" / "data"
