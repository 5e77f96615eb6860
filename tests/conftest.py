"""Test setup: Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before fused_canon's
kernel modules are imported, so it is set here, first thing.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)



def pytest_runtest_logreport(report):
    from peers import counts  # the per-peer counts of the differential tests (tests/peers/)

    counts.record(report)


def pytest_terminal_summary(terminalreporter):
    from peers import counts

    counts.summary(terminalreporter)
