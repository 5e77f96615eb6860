"""Ahead-of-time builds of every registered Triton kernel for a GPU target, on the CPU.

Registry convention (one per module in ``kernels/``)::

    AOT_SIGNATURES = [(kernel, signature, constexprs), ...]          # or 4-tuples:
    AOT_SIGNATURES = [(kernel, signature, constexprs, options), ...]
    AOT_NO_SPILL = {"kernel_name", ...}                               # optional

* ``kernel``: the ``@triton.jit`` object; ``signature``: ``{arg_name: type}`` for *every*
  argument in order, types as in ``triton.compile`` ("*bf16", "*fp32", "i32", "i64", "fp32",
  and "constexpr" for constexpr arguments); ``constexprs``: ``{arg_name: value}``;
  ``options``: ``triton.compile`` options such as ``{"num_warps": 8, "num_stages": 2}``.
* Pointer arguments are compiled with a 16-byte divisibility hint (what the JIT infers for
  torch allocations); list extra ``i32`` arguments to hint in ``options["div16"]``.
  ``options["archs"]`` (compute capabilities such as ``[90]``) limits an entry to those targets: a
  launcher whose tiles depend on the architecture registers one entry per choice.
* Every module-level ``@triton.jit`` function whose name ends in ``_kernel`` is a launchable
  kernel and must appear in its module's registry (helpers called from kernels must not end
  in ``_kernel``).
* ``AOT_NO_SPILL`` names kernels for which ``ptxas -v`` must report 0 spill bytes.

``compile_registered(cc, out_dir)`` builds every entry with ``triton.compile(...,
target=GPUTarget("cuda", cc, 32))`` in a subprocess (the kernel modules must be imported without
``TRITON_INTERPRET``: with it set, ``@triton.jit`` returns interpreter objects, which
``triton.compile`` cannot use) and writes each PTX; ``ptxas_info`` runs the ptxas Triton itself
uses for that target and reads registers, spills and stack; ``tensor_core_instructions`` counts the
matrix instructions of a PTX. tests/test_aot_compile.py and ``fused-canon bench --count`` use them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict

__all__ = ["nvidia_backend_available", "compile_registered", "ptxas_info", "tensor_core_instructions"]

_COMPILE_SCRIPT = textwrap.dedent(r"""
    import importlib, json, os, pkgutil, sys, traceback
    assert "TRITON_INTERPRET" not in os.environ
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    import fused_canon.kernels as pkg

    cc, out_dir = int(sys.argv[1]), sys.argv[2]
    report = {"modules": {}, "unregistered": [], "compiled": [], "errors": []}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        name = f"fused_canon.kernels.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception:
            report["errors"].append({"kernel": name, "error": "import failed:\n" + traceback.format_exc()})
            continue
        kernels = sorted(k for k, v in vars(mod).items()
                         if isinstance(v, JITFunction) and k.endswith("_kernel") and v.fn.__module__ == name)
        registry = list(getattr(mod, "AOT_SIGNATURES", []))
        no_spill = sorted(getattr(mod, "AOT_NO_SPILL", ()))
        registered = sorted({e[0].__name__ for e in registry})
        report["modules"][name] = {"kernels": kernels, "registered": registered, "no_spill": no_spill}
        report["unregistered"] += [f"{name}.{k}" for k in kernels if k not in registered]
        for i, entry in enumerate(registry):
            kernel, signature, constexprs = entry[:3]
            options = dict(entry[3]) if len(entry) > 3 else {}
            div16 = set(options.pop("div16", ()))
            archs = options.pop("archs", None)
            if archs is not None and cc not in archs:
                continue
            label = f"{info.name}.{kernel.__name__}[{i}]"
            attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]]
                     for a, ty in signature.items() if ty.startswith("*") or a in div16}
            try:
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                ptx_path = os.path.join(out_dir, f"{label}.ptx".replace("[", "_").replace("]", ""))
                with open(ptx_path, "w") as f:
                    f.write(compiled.asm["ptx"])
                report["compiled"].append({"label": label, "kernel": kernel.__name__, "module": name,
                                           "dtype": next(t for t in signature.values() if t.startswith("*")),
                                           "ptx": ptx_path, "signature": signature,
                                           "constexprs": {k: str(v) for k, v in constexprs.items()},
                                           "options": options, "no_spill": kernel.__name__ in no_spill,
                                           "shared_bytes": int(getattr(compiled.metadata, "shared", 0) or 0)})
            except Exception:
                report["errors"].append({"kernel": label, "error": traceback.format_exc()})
    print("AOT_REPORT=" + json.dumps(report))
""")


def nvidia_backend_available() -> bool:
    """Whether the installed Triton can build for NVIDIA targets (its wheel ships the backend and ptxas)."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@functools.lru_cache(maxsize=None)
def compile_registered(cc: int, out_dir: str) -> Dict:
    """Build every ``AOT_SIGNATURES`` entry of ``fused_canon.kernels`` for sm_<cc>; PTX files go to ``out_dir``.

    Returns ``{"modules", "unregistered", "compiled": [{label, kernel, module, dtype, ptx, signature,
    constexprs, options, no_spill, shared_bytes}], "errors"}``."""
    os.makedirs(out_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(cc), out_dir], env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("AOT_REPORT=")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("AOT_REPORT="):])


def _ptxas_path(cc: int) -> str:
    """The ptxas that Triton's own compiler runs for compute capability `cc`: the PTX it emits
    carries the ``.version`` of that ptxas. Triton wheels bundle two (``bin/ptxas`` and
    ``bin/ptxas-blackwell``, CUDA 12.8 and 13.x in 3.6); 3.9 compiles sm_90 with the CUDA 13
    one and emits PTX 9.4, which the CUDA 12.9 ``bin/ptxas`` rejects."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def ptxas_info(ptx_path: str, cc: int) -> Dict[str, object]:
    """``ptxas -v`` of one PTX file: {arch, registers, spill_stores, spill_loads, stack} (bytes per thread)."""
    with open(ptx_path) as f:
        ptx = f.read()
    arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    proc = subprocess.run([_ptxas_path(cc), "-v", f"--gpu-name={arch}", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx_path}:\n{proc.stderr}")
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", proc.stderr)]
    stores = [int(r) for r in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    loads = [int(r) for r in re.findall(r"(\d+) bytes spill loads", proc.stderr)]
    stack = [int(r) for r in re.findall(r"(\d+) bytes stack frame", proc.stderr)]
    if not (regs and stores and loads):
        raise RuntimeError(f"could not parse ptxas -v output:\n{proc.stderr}")
    return {"arch": arch, "registers": max(regs), "spill_stores": sum(stores), "spill_loads": sum(loads),
            "stack": max(stack or [0])}


def tensor_core_instructions(ptx: str) -> Dict[str, int]:
    """Matrix instructions in a PTX text: ``wgmma`` (sm_90 warpgroup MMA) and ``mma`` (``mma.sync``, sm_80
    style); a GEMM with neither runs on CUDA-core FMAs."""
    return {"wgmma": len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)),
            "mma": len(re.findall(r"^\s*mma\.sync", ptx, re.M))}
