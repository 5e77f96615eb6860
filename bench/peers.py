"""The peers: which are importable here, their versions, and the entry points the adapters call.

A peer that is not importable is reported as "not installed" (or "import failed: <error>"); its
rows are never approximated by something else. Versions the adapters were written against
(docs/design.md §7.4): liger-kernel 0.8.5, verl 0.9.1, cut-cross-entropy 25.1.1.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

LIGER = "liger-kernel"
VERL = "verl"
CCE = "cut-cross-entropy"


@dataclass
class Peer:
    name: str  # distribution name on PyPI
    status: str  # "installed" | "not installed" | "import failed: ..."
    version: Optional[str] = None
    provides: List[str] = field(default_factory=list)  # entry points found
    entry_points: Dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def available(self) -> bool:
        return self.status == "installed"

    def as_dict(self) -> Dict[str, object]:
        return {"status": self.status, "version": self.version, "provides": self.provides}


def dist_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(name: str, top_module: str, load) -> Peer:
    if importlib.util.find_spec(top_module) is None:
        return Peer(name, "not installed")
    try:
        entry_points = load()
    except Exception as exc:  # a broken install must show up in the report, not abort the run
        return Peer(name, f"import failed: {type(exc).__name__}: {exc}", dist_version(name))
    return Peer(name, "installed", dist_version(name), sorted(entry_points), entry_points)


def _load_liger() -> Dict[str, object]:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return {"LigerFusedLinearGRPOLoss": LigerFusedLinearGRPOLoss, "triton_grpo_loss": triton_grpo_loss,
            "fused_selective_log_softmax": fused_selective_log_softmax}


def _load_verl() -> Dict[str, object]:
    """verl's fused linear log-prob/entropy kernel without running ``verl/__init__``.

    ``import verl`` pulls ray, tensordict, transformers and more (docs/design.md §7.4); the kernel modules need
    only torch, triton, ``verl.utils.device`` and ``verl.plugin.platform``. Empty package modules with
    the real ``__path__`` stand in for ``verl``, ``verl.utils`` and ``verl.utils.kernel`` so their
    ``__init__`` files are skipped while the submodules load from the installed files.
    """
    spec = importlib.util.find_spec("verl")
    root = list(spec.submodule_search_locations)[0]
    for package, rel in (("verl", ""), ("verl.utils", "/utils"), ("verl.utils.kernel", "/utils/kernel")):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [root + rel]
            sys.modules[package] = stub
    module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    importlib.import_module("verl.utils.kernel.kernels")  # imported lazily by verl; fail here, not mid-run
    return {"linear_cross_entropy": module.linear_cross_entropy}


def _load_cce() -> Dict[str, object]:
    from cut_cross_entropy import linear_cross_entropy

    return {"linear_cross_entropy": linear_cross_entropy}


def probe_peers() -> Dict[str, Peer]:
    return {
        LIGER: _probe(LIGER, "liger_kernel", _load_liger),
        VERL: _probe(VERL, "verl", _load_verl),
        CCE: _probe(CCE, "cut_cross_entropy", _load_cce),
    }
