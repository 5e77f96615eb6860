"""Ahead-of-time compile of every registered Triton kernel for sm_80 and sm_90, on the CPU.

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
* Every module-level ``@triton.jit`` function whose name ends in ``_kernel`` is a launchable
  kernel and must appear in its module's registry (helpers called from kernels must not end
  in ``_kernel``).
* ``AOT_NO_SPILL`` names kernels for which ``ptxas -v`` must report 0 spill bytes.

The kernel modules are imported in a subprocess with ``TRITON_INTERPRET`` removed from the
environment: with it set, ``@triton.jit`` returns interpreter objects (and the interpreter
patches ``triton.language`` while it runs), which ``triton.compile`` cannot use.
"""

import functools
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

try:
    import triton
    from triton.backends import backends as _triton_backends
except ImportError:  # pragma: no cover - triton is a dependency of the test environment
    triton = None
    _triton_backends = {}


def _ptxas_path(cc):
    """The ptxas that Triton's own compiler runs for compute capability `cc`: the PTX it emits
    carries the ``.version`` of that ptxas. Triton wheels bundle two (``bin/ptxas`` and
    ``bin/ptxas-blackwell``, CUDA 12.8 and 13.x in 3.6); 3.9 compiles sm_90 with the CUDA 13
    one and emits PTX 9.4, which the CUDA 12.9 ``bin/ptxas`` rejects."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


HAS_NVIDIA_BACKEND = triton is not None and "nvidia" in _triton_backends
pytestmark = pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="triton's nvidia backend is not installed")

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
                                           "ptx": ptx_path, "constexprs": {k: str(v) for k, v in constexprs.items()},
                                           "options": options, "no_spill": kernel.__name__ in no_spill})
            except Exception:
                report["errors"].append({"kernel": label, "error": traceback.format_exc()})
    print("AOT_REPORT=" + json.dumps(report))
""")


@functools.lru_cache(maxsize=None)
def _compile_all(cc, out_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(cc), out_dir], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("AOT_REPORT=")), None)
    assert proc.returncode == 0 and line is not None, f"AOT compile subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(line[len("AOT_REPORT="):])


def _ptxas_info(ptx_path, cc):
    ptx = open(ptx_path).read()
    arch = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M).group(1)
    proc = subprocess.run([_ptxas_path(cc), "-v", f"--gpu-name={arch}", ptx_path, "-o", os.devnull],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ptxas failed on {ptx_path}:\n{proc.stderr}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", proc.stderr)]
    stores = [int(r) for r in re.findall(r"(\d+) bytes spill stores", proc.stderr)]
    loads = [int(r) for r in re.findall(r"(\d+) bytes spill loads", proc.stderr)]
    stack = [int(r) for r in re.findall(r"(\d+) bytes stack frame", proc.stderr)]
    assert regs and stores and loads, f"could not parse ptxas -v output:\n{proc.stderr}"
    return {"arch": arch, "registers": max(regs), "spill_stores": sum(stores), "spill_loads": sum(loads),
            "stack": max(stack or [0])}


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("aot_ptx"))


@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile_registered_kernels(cc, aot_dir):
    out = os.path.join(aot_dir, f"sm{cc}")
    os.makedirs(out, exist_ok=True)
    report = _compile_all(cc, out)
    assert not report["errors"], "AOT compile errors:\n" + "\n".join(
        f"--- {e['kernel']}\n{e['error']}" for e in report["errors"])
    compiled = report["compiled"]
    # logits_token_stats registers its kernels: the test cannot pass vacuously with an empty registry.
    assert {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel"} <= {c["kernel"] for c in compiled}
    spilling = []
    for c in compiled:
        info = _ptxas_info(c["ptx"], cc)
        print(f"sm_{cc} {info['arch']:7s} {c['label']:45s} {c['dtype']:6s} {c['constexprs']} {c['options']}: "
              f"{info['registers']} registers, {info['spill_stores']} B spill stores, "
              f"{info['spill_loads']} B spill loads, {info['stack']} B stack")
        if c["no_spill"] and (info["spill_stores"] or info["spill_loads"]):
            spilling.append(f"{c['label']} on {info['arch']}: {info}")
    assert not spilling, "kernels in AOT_NO_SPILL spill registers:\n" + "\n".join(spilling)


def test_every_kernel_is_registered(aot_dir):
    out = os.path.join(aot_dir, "sm80")
    os.makedirs(out, exist_ok=True)
    report = _compile_all(80, out)
    assert "fused_canon.kernels.logits_token_stats" in report["modules"]
    assert not report["unregistered"], (
        "these @triton.jit kernels are not in their module's AOT_SIGNATURES registry: "
        + ", ".join(report["unregistered"]))


@pytest.mark.parametrize("cc", [80, 90])
def test_logits_streaming_kernels_move_16_bytes_per_access(cc, aot_dir):
    """The logits-path kernels are bound by memory bandwidth (one [N, V] read forward; a read and a
    write backward). Compiled as the JIT launches them at V = 151,936 (row strides and V divisible
    by 16), every thread must load, and the backward store, 16-byte vectors: 2-byte scalar accesses
    of bf16 logits would issue 8x the memory instructions."""
    out = os.path.join(aot_dir, f"sm{cc}")
    os.makedirs(out, exist_ok=True)
    report = _compile_all(cc, out)
    streaming = [c for c in report["compiled"] if c["module"] == "fused_canon.kernels.logits_token_stats"]
    assert {c["kernel"] for c in streaming} == {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel"}
    for c in streaming:
        ptx = open(c["ptx"]).read()
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{c['label']} ({c['dtype']}): no 16-byte loads"
        if c["kernel"] == "_token_stats_bwd_kernel":
            assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{c['label']} ({c['dtype']}): no 16-byte stores"
