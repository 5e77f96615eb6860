"""The peer libraries (verl, TRL, Liger-Kernel) the integration and differential tests run against.

Without the peer installed a test module skips; the CI stage that installs the peers
(``pip install ".[peers]"``) sets ``FUSED_CANON_REQUIRE_PEERS=1``, which turns a missing or
broken peer into a failure instead of a skip.

The differential tests of this package (``tests/peers/test_*.py``) compare fused-canon with the peers'
own functions, one test per configuration; each calls ``compared(request, peer)`` first (or
``unsupported(request, peer, reason)`` for a configuration fused-canon does not reproduce), and
``conftest.py`` prints per peer the configurations compared, matching, unsupported (with the reasons)
and the mismatches (the failures) at the end of the run.
"""

import importlib
import os

import pytest

PEER_KEY = "peer"
UNSUPPORTED_PREFIX = "unsupported: "


def require(module_name: str):
    """Import ``module_name``, or skip the module (an error under FUSED_CANON_REQUIRE_PEERS=1)."""
    if os.environ.get("FUSED_CANON_REQUIRE_PEERS") == "1":
        return importlib.import_module(module_name)
    return pytest.importorskip(module_name)


def compared(request, peer: str) -> None:
    """Count this test's configuration as compared against ``peer`` (its outcome says matching or not)."""
    request.node.user_properties.append((PEER_KEY, peer))


def unsupported(request, peer: str, reason: str) -> None:
    """Count this configuration as unsupported against ``peer``, with the reason, and skip it."""
    request.node.user_properties.append((PEER_KEY, peer))
    pytest.skip(UNSUPPORTED_PREFIX + reason)
