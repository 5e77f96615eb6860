"""Input checks shared by every entry point: clear errors instead of silent wrong numbers.

Checks of shapes, dtypes and devices read no tensor data. Checks of values (finite inputs, finite
logits) need the device: they are collected in a ``PendingChecks`` and read in one batch, together
with the metrics of a loss call (docs/design.md §4.1), instead of one host sync each.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)  # token ids: what every statistics backend indexes with


# ---------------------------------------------------------------------------------------------
# Scalars: config fields and the public functions' number arguments
# ---------------------------------------------------------------------------------------------

def _describe(value) -> str:
    return f"a {type(value).__name__}" if torch.is_tensor(value) else repr(value)


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={_describe(value)} is not valid; choose one of {list(choices)}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_name(name: str, value) -> str:
    """A registry name (estimator, loss_mode): a string, looked up where it is used."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a registered name (a str), got {_describe(value)}")
    return value


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, why: str = "") -> float:
    """A finite real number (not a bool, not a tensor) in the given bounds; returns it as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {_describe(value)}{why}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            allowed = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            allowed = f"be {'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"be {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must {allowed}, got {value!r}{why}")
    return float(value)


def check_int(name: str, value, *, low: Optional[int] = None, why: str = "") -> int:
    """An integer (a Python or numpy int, not a bool, not a float) >= ``low``; returns it as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {_describe(value)}{why}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}{why}")
    return int(value)


def check_step(step) -> int:
    """The trainer's global step (CANON schedules, seeded choices): an int >= 0."""
    return check_int("step", step, low=0, why=" (the trainer's global step)")


def position_text(flat: int, shape: Sequence[int]) -> str:
    """``(batch, position) = (b, t)`` of flat index ``flat`` into ``shape`` [B, T] (``index i`` or
    ``index (i, j, ...)`` for other shapes): how an error names the offending entry."""
    index = []
    for size in reversed(tuple(shape)):
        flat, i = divmod(flat, max(size, 1))
        index.append(i)
    index = tuple(reversed(index))
    if len(index) == 1:
        return f"index {index[0]}"
    return f"(batch, position) = {index}" if len(index) == 2 else f"index {index}"


class PendingChecks:
    """Value checks computed on the device, read with the call's one batched host read.

    Each check is a float64 scalar tensor: negative when the check passes, else a non-negative value
    (e.g. the flat index of the first offending entry) from which ``message`` builds the error text,
    optionally with ``details``: more scalars read in the same batch and passed to ``message`` as ints.
    ``values()`` (1-D tensors) go into the call's batched read; ``raise_failed`` raises the first failed
    check in the order they were added. ``flush()`` reads them at once (one sync), for a stage that
    must not run on bad input (a user-registered estimator).
    """

    def __init__(self):
        self._checks: List[tuple] = []

    def add(self, value: torch.Tensor, message: Callable[..., str], error: type = ValueError,
            details: Sequence[torch.Tensor] = ()) -> None:
        values = torch.stack([value.reshape(()).to(torch.float64)]
                             + [d.reshape(()).to(device=value.device, dtype=torch.float64) for d in details])
        self._checks.append((values, message, error))

    def first_nonfinite(self, name: str, x: torch.Tensor, where: Optional[torch.Tensor], shape: Sequence[int],
                        flat_index: Optional[torch.Tensor] = None, what: str = "contains NaN or inf at",
                        error: type = ValueError, hint: str = "") -> None:
        """Fail when ``x`` is not finite where ``where`` is True (everywhere when None), naming the first
        such entry: its flat index into ``shape`` (``flat_index[i]`` when ``x`` lists rows of it)."""
        bad = ~torch.isfinite(x)
        if where is not None:
            bad &= where
        self.first_flagged(bad, lambda flat: f"{name} {what} {position_text(flat, shape)}{hint}", error, flat_index)

    def first_flagged(self, bad: torch.Tensor, message: Callable[[int], str], error: type = ValueError,
                      flat_index: Optional[torch.Tensor] = None) -> None:
        """Fail when any entry of ``bad`` (bool) is True; ``message`` gets the flat index of the first (its
        ``flat_index`` entry when given)."""
        bad = bad.reshape(-1)
        if bad.numel() == 0:
            return
        first = bad.to(torch.uint8).argmax()  # the first True (argmax returns the first maximum)
        index = first if flat_index is None else flat_index.index_select(0, first.reshape(1))[0]  # no host sync
        self.add(torch.where(bad.any(), index, -1), message, error)

    def __len__(self) -> int:
        return len(self._checks)

    def values(self) -> List[torch.Tensor]:
        return [values for values, _, _ in self._checks]

    def raise_failed(self, values: Sequence[float]) -> None:
        """Raise the first failed check; ``values`` is the concatenation of ``values()``, read."""
        offset = 0
        for checked, message, error in self._checks:
            value, *details = values[offset:offset + len(checked)]
            offset += len(checked)
            if value >= 0:
                raise error(message(int(value), *(int(d) for d in details)))

    def flush(self) -> None:
        if self._checks:
            values = torch.cat([v.to(self._checks[0][0].device) for v in self.values()]).tolist()
            self.raise_failed(values)
            self._checks.clear()


def _shape(x) -> tuple:
    return tuple(x.shape)


def check_tensor(name: str, x, *, device: torch.device) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}")


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor],
                           checks: PendingChecks) -> torch.Tensor:
    """Targets are int64 or int32 token ids; at valid positions they lie in [0, V) (padded positions may
    hold anything, e.g. -100), checked in ``checks`` (no host read here). ``mask`` None: every position is
    valid. Returns the targets clamped into [0, V): what the statistics index with, so that a bad id
    never reads out of bounds before the batched read raises."""
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"targets must be an integer tensor of token ids, int64 or int32, got {targets.dtype}")
    if vocab_size == 0 and targets.numel() > 0 and (mask is None or mask.any()):
        raise ValueError(f"the vocabulary is empty (V = 0) but {'there are' if mask is None else 'the mask has'} "
                         "valid positions: a valid token needs V >= 1")
    if targets.numel() > 0:
        valid = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
        out_of_range = ((targets < 0) | (targets >= vocab_size)) & valid
        low = torch.where(valid, targets, torch.iinfo(targets.dtype).max).min()
        high = torch.where(valid, targets, torch.iinfo(targets.dtype).min).max()
        checks.add(torch.where(out_of_range.any(), 0, -1),
                   lambda _, low, high: (f"targets must lie in [0, V={vocab_size}) at valid positions; found ids "
                                         f"in [{low}, {high}]"), details=(low, high))
    return targets.clamp(0, max(vocab_size - 1, 0))


def check_logits_and_targets(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor],
                             checks: PendingChecks) -> torch.Tensor:
    """Logits [..., V] and targets [...]: types and shapes now, the target range in ``checks``; returns the
    targets clamped into [0, V) (``check_targets_in_range``)."""
    check_tensor("logits", logits, device=getattr(logits, "device", None))
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be fp16, bf16, fp32 or fp64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got {_shape(logits)}")
    check_tensor("targets", targets, device=logits.device)
    if _shape(targets) != _shape(logits)[:-1]:
        raise ValueError(f"targets shape {_shape(targets)} must equal logits shape without V {_shape(logits)[:-1]}")
    return check_targets_in_range(targets, logits.shape[-1], mask, checks)


def check_nonfinite_logits(checks: PendingChecks, logp_rows: torch.Tensor, row_index: Optional[torch.Tensor],
                           shape: Sequence[int], lm_head: bool = False, reference: bool = False,
                           valid: Optional[torch.Tensor] = None) -> None:
    """Non-finite logits in a valid row: every statistics backend reports such a row as a non-finite
    log-prob (docs/design.md §4.1), so the check reads the log-probs, never the logits again: ``logp_rows``
    [N] of the rows ``row_index`` lists, or (``row_index`` None) of every position of ``shape``, checked
    where ``valid``. ``reference``: the reference model's LM head (ref_hidden, ref_weight, ref_bias)."""
    prefix = "ref_" if reference else ""
    name = f"{'reference ' if reference else ''}logits ({prefix}hidden @ {prefix}weight.T + {prefix}bias)" \
        if lm_head else "logits"
    checks.first_nonfinite(
        name, logp_rows, valid, shape, flat_index=row_index,
        what=("are not finite in a valid row (a NaN or +inf logit after the temperature, or -inf at the "
              "sampled token; -inf elsewhere is a masked vocabulary and allowed): first at"),
        hint=f"; look at that row's {prefix}hidden state and at the {'reference ' if reference else ''}LM-head "
             f"weight and bias" if lm_head else "")


def check_mask(mask: torch.Tensor, shape: tuple, device: torch.device, checks: PendingChecks) -> torch.Tensor:
    """mask [B, T] bool, or 0/1 of another dtype (verl's and TRL's integer masks) -> bool; a value other
    than 0 and 1 fails in ``checks`` (read with the metrics: no host read here)."""
    check_tensor("mask", mask, device=device)
    if _shape(mask) != tuple(shape):
        raise ValueError(f"mask shape {_shape(mask)} must be [B, T] = {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    checks.first_flagged((mask != 0) & (mask != 1),
                         lambda flat: f"mask must be bool or contain only 0 and 1; found another value at "
                                      f"{position_text(flat, shape)}")
    return mask != 0


def check_per_token(name: str, x: Optional[torch.Tensor], shape: tuple, device: torch.device,
                    mask: torch.Tensor, checks: PendingChecks) -> Optional[torch.Tensor]:
    """A [B, T] float input (log-probs, entropy, token advantages): right shape now, finite where valid
    in ``checks``."""
    if x is None:
        return None
    check_tensor(name, x, device=device)
    if _shape(x) != tuple(shape):
        raise ValueError(f"{name} shape {_shape(x)} must be [B, T] = {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    checks.first_nonfinite(name, x.detach(), mask, shape, what="contains NaN or inf at valid (mask=1) positions; first at")
    return x


def check_advantages(advantages: torch.Tensor, shape: tuple, device: torch.device, mask: torch.Tensor,
                     checks: PendingChecks) -> torch.Tensor:
    """Advantages [B] (per response) or [B, T] (per token), finite where valid (in ``checks``); returns [B, T]."""
    check_tensor("advantages", advantages, device=device)
    if _shape(advantages) == (shape[0],):
        if not advantages.is_floating_point():
            raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
        checks.first_nonfinite("advantages", advantages.detach(), mask.any(-1), (shape[0],),
                               what="contain NaN or inf for a response with valid tokens: first at response")
        return advantages[:, None].expand(shape)
    return check_per_token("advantages", advantages, shape, device, mask, checks)
