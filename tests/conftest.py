"""Test setup: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before fused_canon's
kernel modules are imported, so it is set here, first thing.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

GOLDEN_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "upstream_cases.json"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def load_golden_cases():
    """The upstream golden cases (../shared/golden beside the checkout); a missing file is an error."""
    path = Path(os.environ.get("FUSED_CANON_GOLDEN", GOLDEN_PATH))
    if not path.exists():
        raise FileNotFoundError(f"golden cases not found at {path}: the checkout needs ../shared beside it "
                                "(or set FUSED_CANON_GOLDEN)")
    return json.loads(path.read_text())["cases"]
