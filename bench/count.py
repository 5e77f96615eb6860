"""``fused-canon bench --count``: what each path requests from memory, computes and waits for, counted on the CPU.

For every (path, implementation, configuration) of ``CASES`` one call (forward, or forward + backward)
runs through Triton's interpreter twice: once instrumented (bench/counting.py: bytes read and written
per tensor with re-reads classified, FLOPs of every ``tl.dot``, atomics, launches, host syncs with their
call sites, torch ops on vocabulary-wide tensors), once under the allocator's memory events (peak extra
memory). The sm_90 builds of the kernels (bench/aot.py) add registers, spills, shared memory and whether
the GEMMs use tensor cores. Traffic is in units of the logits ``[B, T, V]`` (1 R = every logit read
once); the LM-head path has no logits tensor, and its units are those the logits would have.

The counts depend on the shape only through rounding (tiles at the vocabulary's end), so small
shapes give the ratios of large ones; tests/test_bench_counts.py holds them as budgets.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fused_canon.bench.candidates import (EAGER, LIGER_GRPO, LIGER_LOGP, OURS, TRL_STYLE, _clip_ratios,
                                          _liger_layout, bench_loss_config, pg_surrogate, trl_style_token_stats)
from fused_canon.bench.counting import READ_KINDS, InterpreterTraffic, TorchOps, peak_extra_memory
from fused_canon.bench.floors import work_for
from fused_canon.bench.peers import LIGER, probe_peers
from fused_canon.bench.workloads import (LINEAR_POLICY_LOSS_FWD, LINEAR_POLICY_LOSS_FWD_BWD, POLICY_LOSS_FWD,
                                         POLICY_LOSS_FWD_BWD, TOKEN_STATS_FWD, Shape, has_backward, is_linear,
                                         make_inputs)

Inputs = Dict[str, torch.Tensor]

# The shapes of issue 14's audit: 256 rows (responses of 8 tokens in groups of 4), V = 4,099 (not a
# multiple of any tile), H = 256 for the LM-head path.
DEFAULT_ROWS, DEFAULT_SEQ_LEN, DEFAULT_VOCAB, DEFAULT_HIDDEN = 256, 8, 4099, 256
COUNT_SCHEMA_NOTE = ("CPU counts through Triton's interpreter: bytes each program requests (not DRAM traffic), "
                     "in units of the logits [B, T, V] of the run's dtype")


def default_shape(rows: int = DEFAULT_ROWS, vocab: int = DEFAULT_VOCAB, hidden: int = DEFAULT_HIDDEN) -> Shape:
    return Shape(rows // DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN, rows, vocab, hidden)


@dataclass(frozen=True)
class CountCase:
    """One configuration of one path: ``call(inputs)`` returns ``(forward, backward)``: ``forward()`` runs
    the measured forward and returns what ``backward(result)`` (None for a forward-only path) differentiates."""

    path: str
    impl: str
    config: str
    computes: str
    call: Callable[[Inputs], Tuple[Callable[[], object], Optional[Callable[[object], None]]]]
    kind: str = "ours"
    peer: Optional[str] = None


# -------------------------------------------------------------------------------------------- the calls


def _loss_config(**changes):
    import fused_canon as fc

    config = bench_loss_config()
    advantage = changes.pop("estimator", None)
    if advantage is not None:
        config = replace(config, advantage=fc.AdvantageConfig(estimator=advantage))
    return replace(config, **changes)


def _policy_call(path: str, backend: str, *, given_advantages: bool = False, inplace: bool = False,
                 tensor_metrics: bool = False, **config):
    """fc.policy_loss (or linear_policy_loss) with the bench's inputs: rewards + group_ids, or the advantages."""

    def call(inputs: Inputs):
        import fused_canon as fc

        kwargs = dict(old_logprobs=inputs["old_logprobs"], config=_loss_config(**config), backend=backend,
                      tensor_metrics=tensor_metrics)
        if given_advantages:
            kwargs["advantages"] = inputs["advantages"]
        else:
            kwargs.update(rewards=inputs["rewards"], group_ids=inputs["group_ids"])
        if is_linear(path):
            def forward():
                return fc.linear_policy_loss(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"],
                                             **kwargs).loss
        else:
            if inplace:
                kwargs["inplace_backward"] = True

            def forward():
                return fc.policy_loss(inputs["logits"], inputs["targets"], inputs["mask"], **kwargs).loss
        return _with_mode(path, forward)
    return call


def _token_stats_call(backend: str):
    def call(inputs: Inputs):
        import fused_canon as fc

        return _with_mode(TOKEN_STATS_FWD, lambda: fc.token_stats(inputs["logits"], inputs["targets"], backend=backend))
    return call


def _with_mode(path: str, forward: Callable[[], object]):
    if has_backward(path):
        return forward, lambda loss: loss.backward()

    def no_grad_forward():
        with torch.no_grad():
            return forward()
    return no_grad_forward, None


def _liger_grpo_call(peer):
    def call(inputs: Inputs):
        fn = peer.entry_points["triton_grpo_loss"]
        clip_low, clip_high = _clip_ratios()
        mask, adv = inputs["mask"], inputs["advantages"]

        def forward():
            per_token = fn(inputs["logits"], inputs["old_logprobs"], None, inputs["targets"], adv, mask,
                           temperature=1.0, beta=0.0, eps_low=clip_low, eps_high=clip_high, inplace=True)[0]
            weights = mask.to(per_token.dtype)
            return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
        return forward, lambda loss: loss.backward()
    return call


def _liger_logp_call(peer):
    def call(inputs: Inputs):
        fn = peer.entry_points["fused_selective_log_softmax"]
        return _with_mode(TOKEN_STATS_FWD, lambda: fn(inputs["logits"], inputs["targets"], temperature=1.0,
                                                      mask=inputs["mask"]))
    return call


def _trl_style_call(path: str):
    def call(inputs: Inputs):
        if path == TOKEN_STATS_FWD:
            return _with_mode(path, lambda: trl_style_token_stats(inputs["logits"], inputs["targets"]))
        clip_low, clip_high = _clip_ratios()

        def forward():
            logp, _entropy = trl_style_token_stats(inputs["logits"], inputs["targets"], entropy_grad=False)
            return pg_surrogate(logp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"], clip_low,
                                clip_high)
        return _with_mode(path, forward)
    return call


# -------------------------------------------------------------------------------------------- the cases

_LOSS = "log-prob + entropy + advantages + clipped loss"


def cases(peers) -> List[CountCase]:
    """Every counted configuration; Liger's rows are listed with its status when it is not installed."""
    F, FB, LF, LFB = POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD, LINEAR_POLICY_LOSS_FWD, LINEAR_POLICY_LOSS_FWD_BWD
    out = [
        CountCase(TOKEN_STATS_FWD, OURS, "-", "log-prob + entropy", _token_stats_call("triton")),
        CountCase(F, OURS, "grpo", _LOSS, _policy_call(F, "triton")),
        CountCase(FB, OURS, "advantages given", "log-prob + entropy + clipped loss + dlogits",
                  _policy_call(FB, "triton", given_advantages=True)),
        CountCase(FB, OURS, "advantages given, tensor_metrics", "log-prob + entropy + clipped loss + dlogits; "
                  "metrics as 0-d tensors, checks read by the caller", _policy_call(FB, "triton", given_advantages=True,
                                                                                   tensor_metrics=True)),
        CountCase(FB, OURS, "grpo, tensor_metrics", _LOSS + " + dlogits; metrics as 0-d tensors",
                  _policy_call(FB, "triton", tensor_metrics=True)),
    ]
    for estimator in ("grpo", "dr_grpo", "rloo", "canon"):  # the estimators with a Triton kernel
        label = estimator + (" (entropy, on-policy)" if estimator == "canon" else "")
        out.append(CountCase(FB, OURS, label, _LOSS + " + dlogits", _policy_call(FB, "triton", estimator=estimator)))
    out += [
        CountCase(FB, OURS, "grpo, entropy_coeff=0.01", _LOSS + " + entropy bonus + dlogits",
                  _policy_call(FB, "triton", entropy_coeff=0.01)),
        CountCase(FB, OURS, "grpo, inplace_backward", _LOSS + " + dlogits over the logits",
                  _policy_call(FB, "triton", inplace=True)),
    ]
    for loss_mode in ("gspo", "clip_cov", "kl_cov"):
        out.append(CountCase(FB, OURS, f"grpo, {loss_mode}", _LOSS + " + dlogits",
                             _policy_call(FB, "triton", loss_mode=loss_mode)))
    out += [
        CountCase(LF, OURS, "grpo", "LM head + " + _LOSS, _policy_call(LF, "triton")),
        CountCase(LFB, OURS, "grpo", "LM head + " + _LOSS + " + dhidden, dW", _policy_call(LFB, "triton")),
        CountCase(TOKEN_STATS_FWD, EAGER, "-", "log-prob + entropy", _token_stats_call("torch"), kind="reference"),
        CountCase(FB, EAGER, "grpo", _LOSS + " + dlogits", _policy_call(FB, "torch"), kind="reference"),
        CountCase(FB, EAGER, "advantages given", _LOSS + " + dlogits",
                  _policy_call(FB, "torch", given_advantages=True), kind="reference"),
        CountCase(FB, EAGER, "grpo, inplace_backward", _LOSS + " + dlogits over the logits",
                  _policy_call(FB, "torch", inplace=True), kind="reference"),
        CountCase(TOKEN_STATS_FWD, TRL_STYLE, "-", "log-prob + entropy", _trl_style_call(TOKEN_STATS_FWD),
                  kind="reference"),
        CountCase(FB, TRL_STYLE, "advantages given", "log-prob + entropy (detached) + clipped loss + dlogits",
                  _trl_style_call(FB), kind="reference"),
        CountCase(LFB, EAGER, "grpo", "LM head + " + _LOSS + " + dhidden, dW", _policy_call(LFB, "torch"),
                  kind="reference"),
    ]
    liger = peers[LIGER]
    out += [
        CountCase(TOKEN_STATS_FWD, LIGER_LOGP, "-", "log-prob only (no entropy)", _liger_logp_call(liger),
                  kind="peer", peer=LIGER),
        CountCase(FB, LIGER_GRPO, "advantages given", "log-prob + clipped loss (no entropy) + dlogits in place",
                  _liger_grpo_call(liger), kind="peer", peer=LIGER),
    ]
    return out


# -------------------------------------------------------------------------------------------- running one case


def _inputs_for(case: CountCase, shape: Shape, dtype: torch.dtype, seed: int) -> Inputs:
    inputs = make_inputs(case.path, shape, dtype, torch.device("cpu"), seed)
    if case.peer == LIGER:
        inputs["logits"] = _liger_layout(inputs["logits"])  # [B, T + 1, V], made outside the count
    if has_backward(case.path):
        for name in ("logits", "hidden", "weight"):
            if name in inputs:
                inputs[name].requires_grad_(True)
    return inputs


def _run(forward, backward, traffic: Optional[InterpreterTraffic] = None):
    if traffic is not None:
        traffic.phase = "forward" if backward else "call"
    result = forward()
    if backward is not None:
        if traffic is not None:
            traffic.phase = "backward"
        backward(result)


def _kernels(traffic: InterpreterTraffic) -> List[Dict[str, object]]:
    """One entry per (kernel, phase): launches, programs, bytes, FLOPs, FLOP per requested byte, dots, atomics."""
    merged: Dict[Tuple[str, str], Dict[str, object]] = {}
    for launch in traffic.launches:
        entry = merged.setdefault((launch.kernel, launch.phase), {
            "kernel": launch.kernel, "phase": launch.phase, "launches": 0, "programs": 0, "read_bytes": 0,
            "written_bytes": 0, "flops": 0, "atomics": 0, "dots": {}})
        entry["launches"] += 1
        entry["programs"] += launch.programs
        entry["read_bytes"] += launch.read_bytes
        entry["written_bytes"] += launch.written_bytes
        entry["flops"] += launch.flops
        entry["atomics"] += launch.atomics
        for (m, n, k, a, b), calls in launch.dots.items():
            key = f"[{m}x{k}]@[{k}x{n}] {a}x{b}"
            entry["dots"][key] = entry["dots"].get(key, 0) + calls
    for entry in merged.values():
        requested = entry["read_bytes"] + entry["written_bytes"]
        entry["flop_per_byte"] = entry["flops"] / requested if entry["flops"] and requested else None
    return list(merged.values())


def _name_gradients(traffic: InterpreterTraffic, inputs: Inputs) -> None:
    """Name the storages that became gradients (d<input>) unless they are an input's own (in place)."""
    for name in ("logits", "hidden", "weight"):
        grad = inputs[name].grad if name in inputs else None
        if grad is None:
            continue
        region = traffic.regions.get(grad.untyped_storage().data_ptr())
        if region is not None and region.name not in inputs:
            region.name = f"d{name}"


def count_case(case: CountCase, shape: Shape, dtype: torch.dtype, seed: int = 0) -> Dict[str, object]:
    """The counts of one case (see the module docstring); raises what the call raises."""
    elt = torch.empty((), dtype=dtype).element_size()
    logits_bytes = shape.n_rows * shape.vocab * elt
    inputs = _inputs_for(case, shape, dtype, seed)
    names = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    forward, backward = case.call(inputs)
    with InterpreterTraffic(names) as traffic, TorchOps(shape.vocab, traffic, harness_file=__file__) as ops:
        _run(forward, backward, traffic)
    _name_gradients(traffic, inputs)
    tensors = traffic.per_tensor()
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            value.grad = None
    forward, backward = case.call(inputs)
    memory = peak_extra_memory(lambda: _run(forward, backward))

    logits_traffic = tensors.get("logits")
    gradient_written = sum(tensors[n]["written"] for n in ("logits", "dlogits") if n in tensors)
    flops = sum(launch.flops for launch in traffic.launches)
    counts = {
        "requested_read_R": sum(sum(t["read"].values()) for t in tensors.values()) / logits_bytes,
        "requested_written_W": sum(t["written"] for t in tensors.values()) / logits_bytes,
        "logits_bytes": logits_bytes,
        "read_R": (sum(logits_traffic["read"].values()) / logits_bytes) if logits_traffic else None,
        # What memory must serve: a re-read by the program that just read the row is a cache hit on a GPU
        # (docs/design.md §4.3 sizes the rows in flight for it), every other read a fetch.
        "fetched_R": (sum(logits_traffic["read"][kind] for kind in READ_KINDS if kind != "same_program")
                      / logits_bytes) if logits_traffic else None,
        "written_W": gradient_written / logits_bytes if logits_traffic else None,
        "logits_reads": ({kind: logits_traffic["read"][kind] / logits_bytes for kind in READ_KINDS}
                         if logits_traffic else None),
        "tensors": {name: dict(t, read_per_size={k: v / t["bytes"] for k, v in t["read"].items()} if t["bytes"] else None,
                               written_per_size=t["written"] / t["bytes"] if t["bytes"] else None)
                    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1]["bytes"])},
        "kernels": _kernels(traffic),
        "launches": len(traffic.launches),
        "flops": flops,
        "flops_per_NHV": flops / (shape.n_valid * shape.hidden * shape.vocab) if is_linear(case.path) else None,
        "atomics": sum(launch.atomics for launch in traffic.launches),
        "host_syncs": ops.host_syncs,
        "sync_sites": ops.sync_sites(),
        "vocab_torch_ops": sum(ops.vocab_ops.values()),
        "vocab_torch_op_sites": ops.vocab_op_sites(),
        "vocab_torch_read": ops.vocab_read / logits_bytes,
        "vocab_torch_written": ops.vocab_written / logits_bytes,
        "peak_extra_bytes": memory["peak_bytes"],
        "peak_extra_logits": memory["peak_bytes"] / logits_bytes,
        "retained_bytes": memory["retained_bytes"],
    }
    return counts


# -------------------------------------------------------------------------------------------- the run


def sm90_builds() -> Dict[str, object]:
    """Registers, spills, shared memory and tensor-core instructions of every registered kernel built for
    sm_90 (bench/aot.py); ``{"status": ...}`` only when this Triton has no NVIDIA backend."""
    from fused_canon.bench.aot import compile_registered, nvidia_backend_available, ptxas_info, tensor_core_instructions

    if not nvidia_backend_available():
        return {"status": "skipped: the installed triton has no NVIDIA backend", "kernels": []}
    with tempfile.TemporaryDirectory() as out:
        report = compile_registered(90, out)
        kernels = []
        for c in report["compiled"]:
            with open(c["ptx"]) as f:
                ptx = f.read()
            info = ptxas_info(c["ptx"], 90)
            matrix = tensor_core_instructions(ptx)
            kernels.append({"label": c["label"], "kernel": c["kernel"], "dtype": c["dtype"].lstrip("*"),
                            "constexprs": c["constexprs"], "options": c["options"], "arch": info["arch"],
                            "registers": info["registers"], "spill_stores": info["spill_stores"],
                            "spill_loads": info["spill_loads"], "shared_bytes": c["shared_bytes"],
                            "wgmma": matrix["wgmma"], "mma": matrix["mma"],
                            "tensor_cores": bool(matrix["wgmma"] or matrix["mma"])})
    status = "ok" if not report["errors"] else "errors: " + "; ".join(e["kernel"] for e in report["errors"])
    return {"status": status, "kernels": kernels}


def _row(case: CountCase, shape: Shape, dtype: torch.dtype, peers, seed: int) -> Dict[str, object]:
    elt = torch.empty((), dtype=dtype).element_size()
    shape = shape if is_linear(case.path) else replace(shape, hidden=None)
    row = {"path": case.path, "impl": case.impl, "kind": case.kind, "peer": case.peer, "config": case.config,
           "computes": case.computes, "shape": shape.as_dict(), "label": shape.label(), "status": "ok",
           "detail": None, "work": work_for(case.path, shape, elt).as_dict(), "counts": None}
    if case.peer is not None and not peers[case.peer].available:
        row.update(status=peers[case.peer].status.split(":")[0], detail=f"{case.peer}: {peers[case.peer].status}")
        return row
    try:
        row["counts"] = count_case(case, shape, dtype, seed)
    except Exception as exc:  # a row that fails is reported, the others still run
        row.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:2000])
    return row


def run_count(shape: Optional[Shape] = None, dtype: torch.dtype = torch.float32, seed: int = 0,
              impl_filter: Optional[Sequence[str]] = None, paths: Optional[Sequence[str]] = None,
              builds: bool = True, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Count every case of ``cases`` at one shape; the document of ``fused-canon bench --count``."""
    from fused_canon.bench.suite import SCHEMA_VERSION, device_info, versions

    shape = shape or default_shape()
    started = time.time()
    peers = probe_peers()
    info = device_info(torch.device("cpu"))
    doc: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION, "mode": "count",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "complete": False,
        "elapsed_s": None, "device": info, "versions": versions(peers),
        "settings": {"dtype": str(dtype).replace("torch.", ""), "seed": seed, "shape": shape.as_dict(),
                     "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "counts": COUNT_SCHEMA_NOTE,
                     "loss_config": "fused_canon.LossConfig(clip_ratio_c=None) with the row's changes",
                     "impl_filter": list(impl_filter) if impl_filter else None,
                     "paths": list(paths) if paths else None},
        "ceilings": {}, "peers": {name: peer.as_dict() for name, peer in peers.items()}, "targets": [],
        "rows": [], "sm90": None,
    }
    log(f"counting on {info['name']} (Triton interpreter), {shape.label()}, {doc['settings']['dtype']}")
    for case in cases(peers):
        if impl_filter and not any(f in case.impl for f in impl_filter):
            continue
        if paths and case.path not in paths:
            continue
        t0 = time.time()
        row = _row(case, shape, dtype, peers, seed)
        doc["rows"].append(row)
        log(f"  {case.path:27s} {case.impl:36s} {case.config:32s} {row['status']} ({time.time() - t0:.1f} s)")
    if builds:
        doc["sm90"] = sm90_builds()
    doc["complete"] = True
    doc["elapsed_s"] = time.time() - started
    return doc


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _reads(counts: Dict[str, object]) -> str:
    reads = counts["logits_reads"]
    if reads is None:
        return "-"
    short = {"first": "1st", "same_program": "prog", "same_launch": "launch", "later_launch": "later"}
    return " ".join(f"{short[k]} {reads[k]:.2f}" for k in READ_KINDS if reads[k] >= 0.005)


def format_count_table(doc: Dict[str, object]) -> str:
    """One line per row (R/W in units of the logits, re-reads by kind), then the sm_90 builds."""
    header = ("path", "impl", "config", "R", "R mem", "W", "logits reads", "R+W all", "launches", "syncs", "[N,V] ops",
              "peak extra", "GFLOP", "status")
    lines = []
    for row in doc["rows"]:
        c = row["counts"]
        if c is None:
            lines.append((row["path"], row["impl"], row["config"], *["-"] * 10, f"{row['status']}: {row['detail']}"[:90]))
            continue
        lines.append((row["path"], row["impl"], row["config"], _fmt(c["read_R"]), _fmt(c["fetched_R"]),
                      _fmt(c["written_W"]), _reads(c),
                      f"{c['requested_read_R']:.2f}+{c['requested_written_W']:.2f}", str(c["launches"]),
                      str(c["host_syncs"]), str(c["vocab_torch_ops"]), f"{c['peak_extra_logits']:.2f}x",
                      _fmt(c["flops"] / 1e9, ".3f") if c["flops"] else "-", row["status"]))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines]
    out.append("R, W: bytes of the logits read / of dlogits written, per byte of logits; R mem: the reads memory "
               "serves (all but the same program's re-reads, cache hits on a GPU); logits reads: first touch, "
               "re-read in the same program, by another program of the same launch, in a later launch; R+W all: "
               "every tensor, same unit (the LM-head path has no logits: its unit is the logits it avoids); "
               "syncs: host syncs per call (sites in the JSON); peak extra: allocator peak / logits bytes")
    gemms = [(row, k) for row in doc["rows"] if row["counts"] for k in row["counts"]["kernels"] if k["flops"]]
    if gemms:
        out.append("")
        out.append("GEMM kernels (tl.dot FLOPs, padded tiles included) per requested byte, with their programs:")
        for row, k in gemms:
            out.append(f"  {row['path']:27s} {row['impl']:22s} {k['kernel']:36s} {k['phase']:8s} "
                       f"{k['flops'] / 1e6:9.2f} MFLOP  {k['flop_per_byte']:6.2f} FLOP/B  {k['programs']:6d} programs")
    builds = doc.get("sm90")
    if builds:
        out.append("")
        out.append(f"sm_90 builds ({builds['status']}):")
        for k in builds["kernels"]:
            tc = f"tensor cores: wgmma {k['wgmma']}, mma {k['mma']}" if k["tensor_cores"] else "no tensor-core instruction"
            out.append(f"  {k['label']:52s} {k['dtype']:5s} {k['registers']:3d} regs, spills {k['spill_stores']}/"
                       f"{k['spill_loads']} B, smem {k['shared_bytes']} B, {tc}")
    return "\n".join(out)
