"""The peer libraries (verl, TRL) the integration tests run against.

Without the peer installed a test module skips; the CI stage that installs the peers
(``pip install ".[verl,trl]"``) sets ``FUSED_CANON_REQUIRE_PEERS=1``, which turns a missing or
broken peer into a failure instead of a skip.
"""

import importlib
import os

import pytest


def require(module_name: str):
    """Import ``module_name``, or skip the module (an error under FUSED_CANON_REQUIRE_PEERS=1)."""
    if os.environ.get("FUSED_CANON_REQUIRE_PEERS") == "1":
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)
