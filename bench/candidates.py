"""The implementations timed for each path: ours, the torch reference (eager and compiled), the peers.

``Candidate.prepare(inputs)`` turns one case's inputs into a zero-argument call of the measured work
(everything outside that call, such as a peer's input layout, is set up once and never timed).
Forward-only calls run under ``torch.no_grad()``; forward + backward calls end in ``.backward()``
and leave gradients in ``.grad`` (reset between calls by the timer).

Peers compute less than our paths, and each row says what (``computes``): Liger's Triton GRPO loss
has no entropy; verl's kernel gives log-prob and entropy but no loss; CCE gives only the log-prob.
Where a peer gives only log-probs, the clipped PPO surrogate on top (O(N) work, plain torch, the
same for every peer) turns them into a loss so the backward covers the same GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fused_canon.bench.peers import CCE, LIGER, VERL, Peer
from fused_canon.bench.workloads import (
    LINEAR_POLICY_LOSS_FWD,
    LINEAR_POLICY_LOSS_FWD_BWD,
    POLICY_LOSS_FWD,
    POLICY_LOSS_FWD_BWD,
    TOKEN_STATS_FWD,
    Shape,
    has_backward,
)

Inputs = Dict[str, torch.Tensor]

OURS = "fused_canon[triton]"
EAGER = "torch eager (reference)"
COMPILED = "torch.compile (reference)"
LIGER_LOGP = "liger fused_selective_log_softmax"
LIGER_GRPO = "liger triton_grpo_loss"
LIGER_LINEAR_GRPO = "liger LigerFusedLinearGRPOLoss"
VERL_LINEAR = "verl linear_cross_entropy"
CCE_LINEAR = "cce linear_cross_entropy"
TRL_STYLE = "trl-style chunked torch"

FP32 = 4


@dataclass
class Prepared:
    fn: Callable[[], object]  # returns the loss (or the statistics) of the call
    grad_to_none: Tuple[torch.Tensor, ...] = ()
    weight: Optional[torch.Tensor] = None  # LM-head weight: its gradient is excluded from the memory target
    # The scalar compared across implementations: the loss, or the mean log-prob of the valid tokens.
    summarize: Callable[[object], float] = float


def bench_loss_config():
    """``fc.LossConfig()`` without the dual clip: no peer has one, and without it every loss-computing
    candidate of a case computes the same number (the cross-check in the results)."""
    import fused_canon as fc

    return fc.LossConfig(clip_ratio_c=None)


def _mean_valid(logp: torch.Tensor, mask: torch.Tensor) -> float:
    return float(logp.float()[mask].mean())


@dataclass(frozen=True)
class Candidate:
    impl: str
    kind: str  # "ours" | "reference" | "peer"
    computes: str  # what one call computes
    prepare: Callable[[Inputs], Prepared]
    workspace_bytes: Callable[[Shape, int], int]  # conservative guess of extra memory, to skip before allocating
    peer: Optional[str] = None
    cuda_only: Optional[str] = None  # why it cannot run on CPU tensors (seen under TRITON_INTERPRET=1), if so


@dataclass(frozen=True)
class Settings:
    compile_backend: str  # torch.compile backend of the reference ("inductor"; "aot_eager" in the CPU smoke)


# ---------------------------------------------------------------------------------------------- ours and reference


def _policy_kwargs(inputs: Inputs, config) -> dict:
    return dict(rewards=inputs["rewards"], group_ids=inputs["group_ids"], old_logprobs=inputs["old_logprobs"],
                config=config)


def _fused_canon_call(path: str, backend: str, compile_backend: Optional[str]) -> Callable[[Inputs], Prepared]:
    """``fc.<path>(..., backend=backend)``, optionally wrapped in a fresh ``torch.compile``."""

    def prepare(inputs: Inputs) -> Prepared:
        import fused_canon as fc  # at prepare time: an API that has not landed shows up as this row's error

        config = bench_loss_config()
        summarize: Callable[[object], float] = float
        if path == TOKEN_STATS_FWD:
            def call(logits, targets):
                return fc.token_stats(logits, targets, backend=backend)
            args: Sequence[torch.Tensor] = (inputs["logits"], inputs["targets"])
            mask = inputs["mask"]

            def summarize(stats):
                return _mean_valid(stats[0], mask)
        else:
            kwargs = _policy_kwargs(inputs, config)
            if path in (POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD):
                def call(logits, targets, mask):
                    return fc.policy_loss(logits, targets, mask, backend=backend, **kwargs).loss
                args = (inputs["logits"], inputs["targets"], inputs["mask"])
            else:
                def call(hidden, weight, targets, mask):
                    return fc.linear_policy_loss(hidden, weight, targets, mask, backend=backend, **kwargs).loss
                args = (inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"])
        if compile_backend is not None:
            torch._dynamo.reset()  # a fresh cache per case: recompilation limits would silently fall back to eager
            call = torch.compile(call, backend=compile_backend)
        prepared = _forward_or_training(path, call, args, inputs)
        prepared.summarize = summarize
        return prepared

    return prepare


def _forward_or_training(path: str, call, args: Sequence[torch.Tensor], inputs: Inputs) -> Prepared:
    if not has_backward(path):
        def forward():
            with torch.no_grad():
                return call(*args)
        return Prepared(forward)
    leaves = tuple(t for t in args if t.is_floating_point())
    for leaf in leaves:
        leaf.requires_grad_(True)

    def training_step():
        loss = call(*args)
        loss.backward()
        return loss.detach()
    return Prepared(training_step, leaves, inputs.get("weight"))


# ------------------------------------------------------------------------------------------------ TRL-style torch


TRL_ENTROPY_CHUNK_ROWS = 128  # TRL's entropy_from_logits default chunk


def trl_style_token_stats(logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool = True):
    """TRL's torch path (trl.trainer.utils, without its Triton kernel): log-prob of the target as the gathered
    logit minus a logsumexp taken one batch row at a time (``selective_log_softmax``, fp32/fp64; other
    dtypes: a log_softmax per row), entropy from a log_softmax per 128-row chunk (``entropy_from_logits``)."""
    selected = logits.gather(-1, targets[..., None]).squeeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        logp = selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    else:
        logp = torch.stack([torch.log_softmax(row, -1).gather(-1, t[:, None]).squeeze(-1)
                            for row, t in zip(logits, targets)])
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        flat = logits.reshape(-1, logits.shape[-1])
        entropy = torch.cat([-(torch.exp(lp) * lp).sum(-1) for lp in
                             (torch.log_softmax(chunk, -1) for chunk in flat.split(TRL_ENTROPY_CHUNK_ROWS))])
    return logp, entropy.reshape(logits.shape[:-1])


def _trl_style(path: str) -> Callable[[Inputs], Prepared]:
    """TRL's GRPO loss on its torch statistics: the clipped surrogate on the log-probs, the entropy a
    detached metric (entropy_coeff 0, as bench_loss_config), advantages given."""

    def prepare(inputs: Inputs) -> Prepared:
        targets, mask = inputs["targets"], inputs["mask"]
        if path == TOKEN_STATS_FWD:
            return Prepared(lambda: _no_grad(trl_style_token_stats, inputs["logits"], targets),
                            summarize=lambda stats: _mean_valid(stats[0], mask))
        clip_low, clip_high = _clip_ratios()

        def call(logits):
            logp, _entropy = trl_style_token_stats(logits, targets, entropy_grad=False)
            return pg_surrogate(logp, inputs["old_logprobs"], inputs["advantages"], mask, clip_low, clip_high)
        return _forward_or_training(path, call, (inputs["logits"],), inputs)
    return prepare


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


# ------------------------------------------------------------------------------------------------------------ peers


def pg_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 clip_low: float, clip_high: float) -> torch.Tensor:
    """Token-mean clipped PPO surrogate over per-token log-probs (the loss put on log-prob-only peers);
    the adapters pass bench_loss_config()'s clip range (_clip_ratios)."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    adv = advantages[:, None]
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def _clip_ratios() -> Tuple[float, float]:
    """The PPO clip range of bench_loss_config() (clip_ratio_low, clip_ratio_high), passed to the peers."""
    config = bench_loss_config()
    return config.clip_ratio_low, config.clip_ratio_high


def _liger_layout(logits: torch.Tensor) -> torch.Tensor:
    """Liger's logits kernels take ``[B, T + 1, V]`` (the position after the last completion token)."""
    return torch.cat([logits, logits[:, -1:]], dim=1).contiguous()


def _liger_logp(peer: Peer) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        fn = peer.entry_points["fused_selective_log_softmax"]
        logits, targets, mask = _liger_layout(inputs["logits"]), inputs["targets"], inputs["mask"]
        return Prepared(lambda: fn(logits, targets, temperature=1.0, mask=mask),
                        summarize=lambda logp: _mean_valid(logp, mask))
    return prepare


def _liger_grpo(peer: Peer, path: str) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        fn = peer.entry_points["triton_grpo_loss"]
        clip_low, clip_high = _clip_ratios()
        logits = _liger_layout(inputs["logits"])
        targets, mask, old, adv = inputs["targets"], inputs["mask"], inputs["old_logprobs"], inputs["advantages"]

        def call(logits):
            # beta=0: no reference model, as in our default config. inplace=True is Liger's default
            # (dlogits overwrite the logits buffer); the returned per-token loss is token-averaged here.
            per_token_loss = fn(logits, old, None, targets, adv, mask, temperature=1.0, beta=0.0,
                                eps_low=clip_low, eps_high=clip_high, inplace=True)[0]
            weights = mask.to(per_token_loss.dtype)
            return (per_token_loss * weights).sum() / weights.sum().clamp(min=1.0)
        return _forward_or_training(path, call, (logits,), inputs)
    return prepare


def _liger_linear_grpo(peer: Peer, compiled: bool) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        clip_low, clip_high = _clip_ratios()
        loss_fn = peer.entry_points["LigerFusedLinearGRPOLoss"](
            beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=clip_low,
            epsilon_high=clip_high, temperature=1.0, compiled=compiled)

        def call(hidden, weight):
            return loss_fn(hidden, weight, inputs["targets"], inputs["mask"], inputs["advantages"],
                           old_per_token_logps=inputs["old_logprobs"])[0]
        return _forward_or_training(LINEAR_POLICY_LOSS_FWD_BWD, call, (inputs["hidden"], inputs["weight"]), inputs)
    return prepare


def _verl_linear(peer: Peer, path: str) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        fn = peer.entry_points["linear_cross_entropy"]
        clip_low, clip_high = _clip_ratios()
        b, t, h = inputs["hidden"].shape
        targets = inputs["targets"].reshape(-1).contiguous()

        def call(hidden, weight):
            logp, _entropy = fn(hidden.reshape(-1, h), weight, targets, 1.0, "none")
            return pg_surrogate(logp.reshape(b, t), inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                                clip_low, clip_high)
        return _forward_or_training(path, call, (inputs["hidden"], inputs["weight"]), inputs)
    return prepare


def _cce_linear(peer: Peer, path: str) -> Callable[[Inputs], Prepared]:
    def prepare(inputs: Inputs) -> Prepared:
        fn = peer.entry_points["linear_cross_entropy"]
        clip_low, clip_high = _clip_ratios()
        # CCE skips targets equal to its ignore_index (-100): masked rows are not computed.
        targets = inputs["targets"].masked_fill(~inputs["mask"], -100)

        def call(hidden, weight):
            logp = -fn(hidden, weight, targets, reduction="none")
            return pg_surrogate(logp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                                clip_low, clip_high)
        return _forward_or_training(path, call, (inputs["hidden"], inputs["weight"]), inputs)
    return prepare


# ------------------------------------------------------------------------------------------ workspace estimates
# Rough upper guesses of the memory a call adds beyond its inputs, from each design; the run also
# catches out-of-memory errors, so a low guess costs a failed attempt, never a wrong number.


def _logits_rows(shape: Shape) -> int:
    return shape.n_rows * shape.vocab


def _ours_workspace(path: str) -> Callable[[Shape, int], int]:
    def estimate(shape: Shape, elt: int) -> int:
        if path in (TOKEN_STATS_FWD, POLICY_LOSS_FWD, LINEAR_POLICY_LOSS_FWD):
            return 64 * shape.n_rows * FP32 + 2 ** 30
        if path == POLICY_LOSS_FWD_BWD:
            return _logits_rows(shape) * elt + 2 ** 30  # dlogits
        # dW (written once, in the input dtype), dhidden in fp32 (the sum over vocabulary chunks) and in the
        # input dtype, a bounded workspace
        return shape.vocab * shape.hidden * elt + shape.n_rows * shape.hidden * (FP32 + elt) + 2 ** 31
    return estimate


def _reference_workspace(path: str) -> Callable[[Shape, int], int]:
    def estimate(shape: Shape, elt: int) -> int:
        # The reference works chunk by chunk (fused_canon/statistics.py: a few fp32 [chunk, V] buffers of at
        # most 4 MiB each) and holds dlogits in the backward. The LM-head path first materialises each
        # 1,024-row chunk of logits in the input dtype and holds an fp32 dW.
        total = 8 * 4 * 2 ** 20 + (_logits_rows(shape) * elt if has_backward(path) else 0)
        if shape.hidden is not None:
            total += 1024 * shape.vocab * (elt + 3 * FP32) + shape.vocab * shape.hidden * FP32
        return total
    return estimate


def _trl_style_workspace(path: str) -> Callable[[Shape, int], int]:
    def estimate(shape: Shape, elt: int) -> int:
        # 128-row fp32 chunks of log_softmax, exp and their product; the backward's dlogits and the
        # logsumexp's per-row gradients ([T, V] each).
        chunk = TRL_ENTROPY_CHUNK_ROWS * shape.vocab * FP32 * 3
        return chunk + (_logits_rows(shape) * elt * 2 if has_backward(path) else 0)
    return estimate


def _liger_logits_workspace(shape: Shape, elt: int) -> int:
    return (shape.n_rows + shape.batch) * shape.vocab * elt + 64 * shape.n_rows * FP32  # the [B, T+1, V] copy


def _liger_linear_workspace(shape: Shape, elt: int) -> int:
    # fp32 dW per sequence chunk plus the bf16 accumulator; 2,048 x 4,096 fp32 logits tiles
    return shape.vocab * shape.hidden * (2 * FP32 + elt) + shape.n_rows * shape.hidden * FP32 + 4 * 2 ** 30


def _verl_workspace(shape: Shape, elt: int) -> int:
    # [N, V/1024] fp32 partial statistics; backward dlogits chunks of 9,504 columns; dW, dhidden
    splits = -(-shape.vocab // 1024)
    return (4 * shape.n_rows * splits * FP32 + shape.n_rows * 9504 * elt * 2
            + shape.vocab * shape.hidden * FP32 + shape.n_rows * shape.hidden * FP32)


def _cce_workspace(shape: Shape, elt: int) -> int:
    return shape.vocab * shape.hidden * FP32 + shape.n_rows * shape.hidden * FP32 + 2 ** 30


# ------------------------------------------------------------------------------------------------------- registry

FULL_CONTRACT = {
    TOKEN_STATS_FWD: "log-prob + entropy",
    POLICY_LOSS_FWD: "log-prob + entropy + advantages + clipped loss",
    POLICY_LOSS_FWD_BWD: "log-prob + entropy + advantages + clipped loss + dlogits",
    LINEAR_POLICY_LOSS_FWD: "LM head + log-prob + entropy + advantages + clipped loss",
    LINEAR_POLICY_LOSS_FWD_BWD: "LM head + log-prob + entropy + advantages + clipped loss + dhidden, dW",
}


def candidates_for(path: str, peers: Dict[str, Peer], settings: Settings) -> List[Candidate]:
    """Every candidate of ``path``; those of peers that are not importable come with ``peer`` set and
    are reported with the peer's status instead of being run."""
    contract = FULL_CONTRACT[path]
    out = [
        Candidate(OURS, "ours", contract, _fused_canon_call(path, "triton", None), _ours_workspace(path)),
        Candidate(EAGER, "reference", contract, _fused_canon_call(path, "torch", None), _reference_workspace(path)),
        Candidate(COMPILED, "reference", contract + f" (backend={settings.compile_backend})",
                  _fused_canon_call(path, "torch", settings.compile_backend), _reference_workspace(path)),
    ]
    liger, verl, cce = peers[LIGER], peers[VERL], peers[CCE]
    if path in (TOKEN_STATS_FWD, POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD):
        out.append(Candidate(TRL_STYLE, "reference", "TRL's torch path: log-prob (logsumexp per batch row) + "
                             "entropy (128-row chunks, detached in the loss) + clipped loss, advantages given",
                             _trl_style(path), _trl_style_workspace(path)))
    if path == TOKEN_STATS_FWD:
        out.append(Candidate(LIGER_LOGP, "peer", "log-prob only (no entropy); [B, T+1, V] input",
                             _liger_logp(liger), _liger_logits_workspace, LIGER))
    elif path in (POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD):
        computes = "log-prob + clipped loss (no entropy, advantages given)" + (
            "; dlogits in place" if has_backward(path) else "")
        out.append(Candidate(LIGER_GRPO, "peer", computes + "; [B, T+1, V] input", _liger_grpo(liger, path),
                             _liger_logits_workspace, LIGER))
    else:
        out.append(Candidate(VERL_LINEAR, "peer", "LM head + log-prob + entropy (loss: torch surrogate)",
                             _verl_linear(verl, path), _verl_workspace, VERL,
                             cuda_only="verl 0.9.1 wraps its kernel in torch.cuda.nvtx ranges, "
                                       "which need a CUDA build"))
        out.append(Candidate(CCE_LINEAR, "peer", "LM head + log-prob (no entropy; loss: torch surrogate; CCE's default "
                             "gradient filtering)",
                             _cce_linear(cce, path), _cce_workspace, CCE,
                             cuda_only="cut-cross-entropy 25.1.1's kernels fail in Triton's interpreter "
                                       "(AttributeError inside the interpreter)"))
        if path == LINEAR_POLICY_LOSS_FWD_BWD:
            compiled = settings.compile_backend == "inductor"
            out.append(Candidate(LIGER_LINEAR_GRPO, "peer",
                                 f"LM head + log-prob + clipped loss, grads inside forward (no entropy; "
                                 f"compiled={compiled})",
                                 _liger_linear_grpo(liger, compiled), _liger_linear_workspace, LIGER))
    return out
