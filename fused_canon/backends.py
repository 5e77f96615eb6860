"""Which implementation runs: one table for every op and name, and ``select``, the one function that decides.

A loss call runs up to three ops (docs/architecture.md); each has a torch implementation for every
name and, for some names, a Triton launch with the same signature:

    op                  name                   torch                                Triton
    token_stats         -                      statistics.torch_token_stats         kernels/logits_token_stats.py
    linear_token_stats  -                      statistics.torch_linear_token_stats  kernels/linear_token_stats.py
    advantages          an ESTIMATORS name     ESTIMATORS[name]                     estimators.triton_advantages
    objective           a POLICY_LOSSES name   losses.policy_objective              losses.triton_policy_objective

The torch side reads the registries, so a name registered with ``register_estimator`` /
``register_policy_loss`` runs at once (in torch): adding an estimator or a loss is one registered
function. A Triton launch reproduces one registered function (``TritonLaunch.reproduces``); a name
re-registered with ``overwrite=True`` no longer has it. ``OPS`` is the torch side of the table,
``_triton_table`` the Triton side: adding a kernel for a name is one entry there.

``select(op, backend, data, name)``:
  "torch"   the torch implementation;
  "triton"  the Triton launch, or an error that names why it cannot run these inputs
            (RuntimeError: no triton / no CUDA or interpreter; ValueError: the dtype, the name, a limit);
  "auto"    the Triton launch on CUDA tensors when it can run them, else torch. The choice and the
            reason (``Choice.describe()``) are what ``LossOutput.backends`` reports.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import LossConfig
from .estimators import ESTIMATORS, Groups, declared_inputs
from .losses import POLICY_LOSSES, policy_objective
from .statistics import EXTRA_SIGNALS, torch_linear_token_stats, torch_token_stats

__all__ = ["BACKENDS", "TOKEN_STATS", "LINEAR_TOKEN_STATS", "ADVANTAGES", "OBJECTIVE", "OPS", "Op", "Choice",
           "TritonLaunch", "select", "check_backend", "triton_names", "LOGITS_PASS", "FUSED_LOSSES",
           "fused_pass_blocker", "fused_policy_loss_launch", "describe_logits_pass"]

BACKENDS = ("auto", "triton", "torch")
TOKEN_STATS, LINEAR_TOKEN_STATS, ADVANTAGES, OBJECTIVE = "token_stats", "linear_token_stats", "advantages", "objective"
# Device types on which backend="auto" picks Triton (tests widen it to run auto's fallbacks in the interpreter).
AUTO_TRITON_DEVICES = ("cuda",)

_STATISTICS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the statistics kernels read
_ADVANTAGE_DTYPES = (torch.float32, torch.float64)  # the rewards' dtype the estimator kernel takes (it computes in fp64)
_FP32 = (torch.float32,)  # the objective kernel takes fp32 log-probs


@dataclass(frozen=True)
class Choice:
    """The implementation ``select`` picked: ``fn`` has the op's signature."""

    backend: str  # "torch" | "triton": what runs
    fn: Callable
    reason: str  # why: "requested", "auto: cuda tensors", "auto: cpu tensors", "auto: fp64 rewards ..."

    def describe(self) -> str:
        return f"{self.backend} ({self.reason})"


@dataclass(frozen=True)
class TritonLaunch:
    """The Triton implementation of one (op, name)."""

    fn: Callable  # same signature as the op's torch implementation
    dtypes: Tuple[torch.dtype, ...]  # dtypes of the deciding input (``data`` of select) it takes
    reproduces: Optional[Callable] = None  # the registered torch function it computes (named ops)
    limit: Optional[Callable[..., Optional[str]]] = None  # why these inputs exceed the kernel, or None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {list(BACKENDS)}")


@dataclass(frozen=True)
class Op:
    """The torch side of one op of the table."""

    input: str  # the input whose device and dtype decide, as messages name it
    torch: Optional[Callable] = None  # the torch implementation; None: the registered function of the name
    registry: Optional[Dict[str, Callable]] = None  # named ops: name -> the registered torch function
    noun: str = ""  # named ops: what a name is, as messages and LossConfig call it


OPS = {
    TOKEN_STATS: Op("logits", torch=torch_token_stats),
    LINEAR_TOKEN_STATS: Op("hidden states", torch=torch_linear_token_stats),
    ADVANTAGES: Op("rewards", registry=ESTIMATORS, noun="estimator"),
    OBJECTIVE: Op("log-probs", torch=policy_objective, registry=POLICY_LOSSES, noun="loss_mode"),  # calls the loss
}


def _torch_implementation(op: str, name: Optional[str]) -> Callable:
    """The torch implementation of (op, name); an unknown name raises, listing the registered ones."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {list(OPS)}")
    spec = OPS[op]
    if spec.registry is not None and name not in spec.registry:
        raise ValueError(f"unknown {spec.noun} {name!r}; registered: {sorted(spec.registry)}")
    return spec.torch or spec.registry[name]


@functools.lru_cache(maxsize=None)
def _triton_table() -> Dict[str, Dict[Optional[str], TritonLaunch]]:
    """The Triton side of the table: op -> name -> its launch. Built on first use (it imports triton and the
    kernels), so that fused_canon imports and runs without triton."""
    from . import estimators, losses
    from .kernels import advantages as advantage_kernel
    from .kernels import linear_token_stats, logits_token_stats
    from .kernels import objective as objective_kernel

    def group_limit(groups: Groups, config) -> Optional[str]:
        if config.std_scope != "group" and config.norm_by_std and config.estimator == "grpo":
            return f"std_scope={config.std_scope!r}: the Triton estimator kernel divides by each group's own std"
        if config.singleton_baseline != "zero" and config.estimator in ("grpo", "dr_grpo"):
            return (f"singleton_baseline={config.singleton_baseline!r}: the Triton estimator kernel gives a group "
                    "of one baseline 0")
        largest = groups.largest_bound(advantage_kernel.MAX_GROUP_SIZE)  # read only for a batch above the limit
        if largest > advantage_kernel.MAX_GROUP_SIZE:
            return (f"a prompt group has {largest} responses; the Triton estimator kernel holds at most "
                    f"MAX_GROUP_SIZE={advantage_kernel.MAX_GROUP_SIZE} per group")
        return None

    def estimator(builtin, kernel_constant):
        launch = functools.partial(estimators.triton_advantages, estimator=kernel_constant)
        return TritonLaunch(launch, _ADVANTAGE_DTYPES, reproduces=builtin, limit=group_limit)

    def loss(builtin, kernel_constant):
        launch = functools.partial(losses.triton_policy_objective, loss_mode=kernel_constant)
        return TritonLaunch(launch, _FP32, reproduces=builtin, limit=losses.triton_objective_limit)

    # The API builds row_index itself and checks the targets first: the launches do not check them again.
    return {
        TOKEN_STATS: {None: TritonLaunch(functools.partial(logits_token_stats.triton_token_stats, check_rows=False),
                                         _STATISTICS_DTYPES)},
        LINEAR_TOKEN_STATS: {None: TritonLaunch(functools.partial(linear_token_stats.triton_linear_token_stats,
                                                                  check_rows=False), _STATISTICS_DTYPES)},
        ADVANTAGES: {
            "grpo": estimator(estimators.grpo, advantage_kernel.GRPO),
            "dr_grpo": estimator(estimators.dr_grpo, advantage_kernel.DR_GRPO),
            "rloo": estimator(estimators.rloo, advantage_kernel.RLOO),
            "canon": estimator(estimators.canon, advantage_kernel.CANON),
        },
        OBJECTIVE: {
            "vanilla": loss(losses.vanilla, objective_kernel.VANILLA),
            "clip_cov": loss(losses.clip_cov, objective_kernel.CLIP_COV),
            "kl_cov": loss(losses.kl_cov, objective_kernel.KL_COV),
            "gspo": loss(losses.gspo, objective_kernel.GSPO),
            "cispo": loss(losses.cispo, objective_kernel.CISPO),
            "sapo": loss(losses.sapo, objective_kernel.SAPO),
        },
    }


def triton_names(op: str) -> list:
    """The names of ``op`` that have a Triton launch (imports triton)."""
    return sorted(name for name in _triton_table()[op] if name is not None)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        dtype, str(dtype))


def _why_triton_cannot_run(op: str, name: Optional[str], data: torch.Tensor, limit_inputs: dict) -> Optional[str]:
    """Why the Triton launch of (op, name) cannot run inputs like ``data``, or None when it can."""
    spec, launch = OPS[op], _triton_table()[op].get(name)
    if launch is None:
        return f"{spec.noun} {name!r} has no Triton kernel (Triton {spec.noun}s: {triton_names(op)})"
    if launch.reproduces is not None and spec.registry[name] is not launch.reproduces:
        return (f"{spec.noun} {name!r} is registered to {spec.registry[name].__qualname__}, and its Triton kernel "
                f"computes the built-in {launch.reproduces.__qualname__}")
    if data.dtype not in launch.dtypes:
        return (f"{_dtype_name(data.dtype)} {spec.input}: the Triton kernel takes "
                f"{', '.join(_dtype_name(d) for d in launch.dtypes)}")
    return launch.limit(**limit_inputs) if launch.limit is not None else None


def select(op: str, backend: str, data: torch.Tensor, name: Optional[str] = None, **limit_inputs) -> Choice:
    """The implementation of ``op`` (for ``name``) that ``backend`` asks for, for inputs like ``data``: the
    tensor whose device and dtype decide (logits, hidden states, the rewards in the advantages' dtype,
    log-probs). ``limit_inputs`` go to the launch's limit check (advantages: ``groups``, ``config``; objective: ``config``)."""
    check_backend(backend)
    torch_fn = _torch_implementation(op, name)
    if backend == "torch":
        return Choice("torch", torch_fn, "requested")
    device = data.device.type
    if backend == "auto" and device not in AUTO_TRITON_DEVICES:
        return Choice("torch", torch_fn, f"auto: {device} tensors")
    from . import kernels  # the package itself does not import triton

    if not kernels.triton_available():
        if backend == "triton":
            raise RuntimeError("backend='triton' needs the triton package: pip install 'fused-canon[triton]'")
        return Choice("torch", torch_fn, "auto: triton is not installed")
    if device != "cuda" and not kernels.triton_interpreter_enabled():
        if backend == "triton":
            raise RuntimeError(f"backend='triton' on a {device} tensor needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing fused_canon (or use backend='torch')")
        return Choice("torch", torch_fn, f"auto: {device} tensors without Triton's interpreter")
    why_not = _why_triton_cannot_run(op, name, data, limit_inputs)
    if why_not is None:
        reason = "requested" if backend == "triton" else f"auto: {device} tensors"
        return Choice("triton", _triton_table()[op][name].fn, reason)
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run {op}: {why_not}; use backend='auto' (falls back to torch) "
                         "or 'torch'")
    return Choice("torch", torch_fn, f"auto: {why_not}")


# ---------------------------------------------------------------------------------------------
# One read of the logits or two (docs/design.md §4.3)
# ---------------------------------------------------------------------------------------------

LOGITS_PASS = "logits_pass"  # the LossOutput.backends key that says which path policy_loss took
# The Triton losses whose token term needs only the token's own inputs (kernels/logits_policy_loss.py);
# gspo (the sequence ratio), clip_cov and kl_cov (a batch covariance selection) need the whole pass first.
FUSED_LOSSES = ("vanilla", "cispo", "sapo")


def _advantages_read_the_pass(config: LossConfig, *, metric_given: bool, old_given: bool,
                              advantage_inputs) -> Optional[str]:
    """Why the estimator of ``config`` needs this pass's statistics, or None."""
    advantage = config.advantage
    if advantage.estimator == "canon" and advantage.canon_metric == "entropy" and not metric_given:
        return "CANON's entropy regrouping reads this pass's entropy (pass metric= to fuse)"
    declared = declared_inputs(advantage.estimator)
    from_pass = [name for name in declared.required + declared.optional
                 if (name == "old_logprobs" and not old_given)
                 or (name in EXTRA_SIGNALS and name not in (advantage_inputs or {}))]
    if from_pass:
        return f"estimator {advantage.estimator!r} reads {', '.join(from_pass)} of this pass"
    return None


def fused_pass_blocker(stats: Choice, objective: Choice, config: LossConfig, *, needs_grad: bool,
                       advantages_given: bool, metric_given: bool, old_given: bool, advantage_inputs,
                       rollout_weights_from_pass: bool) -> Optional[str]:
    """Why ``policy_loss`` on logits cannot run the fused kernel (loss and dlogits in one read of each row),
    or None when it can: every per-token coefficient is then known before the pass. The one place that
    decides; docs/design.md §4.3 tabulates it."""
    if stats.backend != "triton" or objective.backend != "triton":
        return "the statistics or the objective run in torch"
    if not needs_grad:
        return "no gradient is asked for: the statistics pass alone, no dlogits"
    if config.loss_mode not in FUSED_LOSSES:
        return (f"loss_mode {config.loss_mode!r} needs sequence or batch statistics of the pass first "
                f"(fused: {', '.join(FUSED_LOSSES)})")
    if not advantages_given:
        why = _advantages_read_the_pass(config, metric_given=metric_given, old_given=old_given,
                                        advantage_inputs=advantage_inputs)
        if why is not None:
            return why
    if rollout_weights_from_pass:
        return "the rollout IS weights are computed from this pass's log-probs (on-policy: pass old_logprobs)"
    return None


@functools.lru_cache(maxsize=None)
def fused_policy_loss_launch(loss_mode: str) -> Callable:
    """The fused kernel's launch for a loss of FUSED_LOSSES (losses.triton_fused_policy_loss with the
    kernel's constant bound), once ``fused_pass_blocker`` returned None."""
    from . import losses
    from .kernels import objective as objective_kernel

    constants = {"vanilla": objective_kernel.VANILLA, "cispo": objective_kernel.CISPO,
                 "sapo": objective_kernel.SAPO}
    return functools.partial(losses.triton_fused_policy_loss, loss_mode=constants[loss_mode])


def describe_logits_pass(blocker: Optional[str]) -> str:
    """``LossOutput.backends[LOGITS_PASS]``: the path taken and why."""
    if blocker is None:
        return "fused: one kernel reads each row, writes its loss term and dlogits (1 R + 1 W)"
    return f"two passes: {blocker}"
