"""Ahead-of-time compile of every registered Triton kernel for sm_80 and sm_90, on the CPU.

The registry convention (``AOT_SIGNATURES``, ``AOT_NO_SPILL`` in each module of ``kernels/``) and the
build itself are in bench/aot.py (``fused_canon.bench.aot``), which ``fused-canon bench --count`` uses too.
"""

import os
import re

import pytest

from fused_canon.bench.aot import compile_registered, nvidia_backend_available, ptxas_info, tensor_core_instructions

pytestmark = pytest.mark.skipif(not nvidia_backend_available(), reason="triton's nvidia backend is not installed")


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("aot_ptx"))


@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile_registered_kernels(cc, aot_dir):
    out = os.path.join(aot_dir, f"sm{cc}")
    os.makedirs(out, exist_ok=True)
    report = compile_registered(cc, out)
    assert not report["errors"], "AOT compile errors:\n" + "\n".join(
        f"--- {e['kernel']}\n{e['error']}" for e in report["errors"])
    compiled = report["compiled"]
    # logits_token_stats registers its kernels: the test cannot pass vacuously with an empty registry.
    assert {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel"} <= {c["kernel"] for c in compiled}
    spilling = []
    for c in compiled:
        info = ptxas_info(c["ptx"], cc)
        print(f"sm_{cc} {info['arch']:7s} {c['label']:45s} {c['dtype']:6s} {c['constexprs']} {c['options']}: "
              f"{info['registers']} registers, {info['spill_stores']} B spill stores, "
              f"{info['spill_loads']} B spill loads, {info['stack']} B stack")
        if c["no_spill"] and (info["spill_stores"] or info["spill_loads"]):
            spilling.append(f"{c['label']} on {info['arch']}: {info}")
    assert not spilling, "kernels in AOT_NO_SPILL spill registers:\n" + "\n".join(spilling)


def test_every_kernel_is_registered(aot_dir):
    out = os.path.join(aot_dir, "sm80")
    os.makedirs(out, exist_ok=True)
    report = compile_registered(80, out)
    assert "fused_canon.kernels.logits_token_stats" in report["modules"]
    assert not report["unregistered"], (
        "these @triton.jit kernels are not in their module's AOT_SIGNATURES registry: "
        + ", ".join(report["unregistered"]))


@pytest.mark.parametrize("cc", [80, 90])
def test_logits_streaming_kernels_move_16_bytes_per_access(cc, aot_dir):
    """The logits-path kernels are bound by memory bandwidth (one [N, V] read forward; a read and a
    write backward, or both in the fused kernel). Compiled as the JIT launches them at V = 151,936 (row strides and V divisible
    by 16), every thread must load, and the backward store, 16-byte vectors: 2-byte scalar accesses
    of bf16 logits would issue 8x the memory instructions."""
    out = os.path.join(aot_dir, f"sm{cc}")
    os.makedirs(out, exist_ok=True)
    report = compile_registered(cc, out)
    streaming = [c for c in report["compiled"] if c["module"] in ("fused_canon.kernels.logits_token_stats",
                                                                  "fused_canon.kernels.logits_policy_loss")]
    assert {c["kernel"] for c in streaming} == {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel",
                                                "_policy_loss_fused_kernel", "_scale_gradient_kernel"}
    for c in streaming:
        ptx = open(c["ptx"]).read()
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{c['label']} ({c['dtype']}): no 16-byte loads"
        if c["kernel"] != "_token_stats_fwd_kernel":
            assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{c['label']} ({c['dtype']}): no 16-byte stores"


@pytest.mark.parametrize("cc", [80, 90])
def test_lm_head_gemms_use_tensor_cores_for_16_bit_inputs(cc, aot_dir):
    """Every GEMM of the LM-head path (forward logits tiles, backward recompute, grad_hidden, grad_weight) runs
    on tensor cores for bf16 and fp16 inputs: wgmma on sm_90, mma.sync on sm_80. fp16's backward GEMMs once
    compiled to fp32 FMAs (an fp32 workspace times fp16 operands)."""
    out = os.path.join(aot_dir, f"sm{cc}")
    os.makedirs(out, exist_ok=True)
    report = compile_registered(cc, out)
    lm_head = [c for c in report["compiled"] if c["module"] == "fused_canon.kernels.linear_token_stats"]
    by_input = {}
    for c in lm_head:
        input_type = c["signature"].get("weight_ptr") or c["signature"].get("hidden_ptr")
        if input_type is None:  # the split forward's merge: no GEMM
            continue
        by_input.setdefault(input_type, set()).add(c["kernel"])
        if input_type not in ("*bf16", "*fp16"):
            continue
        matrix = tensor_core_instructions(open(c["ptx"]).read())
        instruction = "wgmma" if cc == 90 else "mma"
        assert matrix[instruction] > 0, f"{c['label']} ({input_type} inputs): no {instruction} on sm_{cc}: {matrix}"
    gemms = {"_linear_token_stats_fwd_kernel", "_linear_token_stats_dlogits_kernel",
             "_linear_token_stats_dhidden_kernel", "_linear_token_stats_dweight_kernel"}
    assert by_input.get("*bf16") == gemms and by_input.get("*fp16") == gemms, by_input
