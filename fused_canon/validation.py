"""Input checks shared by every entry point: clear errors instead of silent wrong numbers."""

from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x) -> tuple:
    return tuple(x.shape)


def check_tensor(name: str, x, *, device: torch.device) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, mask: Optional[torch.Tensor] = None) -> None:
    """Targets at valid positions must lie in [0, V); padded positions may hold anything (e.g. -100)."""
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor (token ids), got {targets.dtype}")
    out_of_range = (targets < 0) | (targets >= vocab_size)
    if mask is not None:
        out_of_range &= mask.bool()
    if not out_of_range.any():  # the only host sync when the targets are fine
        return
    valid = targets if mask is None else targets[mask.bool()]
    low, high = int(valid.min()), int(valid.max())
    raise ValueError(f"targets must lie in [0, V={vocab_size}) at valid positions; found ids in [{low}, {high}]")


def check_logits_and_targets(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
    check_tensor("logits", logits, device=getattr(logits, "device", None))
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be fp16, bf16, fp32 or fp64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got {_shape(logits)}")
    check_tensor("targets", targets, device=logits.device)
    if _shape(targets) != _shape(logits)[:-1]:
        raise ValueError(f"targets shape {_shape(targets)} must equal logits shape without V {_shape(logits)[:-1]}")
    check_targets_in_range(targets, logits.shape[-1], mask)


def check_mask(mask: torch.Tensor, shape: tuple, device: torch.device) -> torch.Tensor:
    """mask [B, T] bool or 0/1 -> bool."""
    check_tensor("mask", mask, device=device)
    if _shape(mask) != tuple(shape):
        raise ValueError(f"mask shape {_shape(mask)} must be [B, T] = {tuple(shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be bool or contain only 0 and 1")
        mask = mask != 0
    return mask


def check_per_token(name: str, x: Optional[torch.Tensor], shape: tuple, device: torch.device,
                    mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A [B, T] float input (old/ref log-probs, token advantages): right shape and finite where valid."""
    if x is None:
        return None
    check_tensor(name, x, device=device)
    if _shape(x) != tuple(shape):
        raise ValueError(f"{name} shape {_shape(x)} must be [B, T] = {tuple(shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if not (torch.isfinite(x) | ~mask).all():
        raise ValueError(f"{name} contains NaN or inf at valid (mask=1) positions")
    return x


def check_advantages(advantages: torch.Tensor, shape: tuple, device: torch.device, mask: torch.Tensor) -> torch.Tensor:
    """Advantages [B] (per response) or [B, T] (per token), finite where valid; returns [B, T]."""
    check_tensor("advantages", advantages, device=device)
    if _shape(advantages) == (shape[0],):
        if not advantages.is_floating_point():
            raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
        if not (torch.isfinite(advantages) | ~mask.any(-1)).all():
            raise ValueError("advantages contain NaN or inf for a response with valid tokens")
        return advantages[:, None].expand(shape)
    return check_per_token("advantages", advantages, shape, device, mask)
