"""What is benchmarked: the paths, the shape grid, and the synthetic inputs of one case.

A *path* is one public entry point in one mode (forward only, or forward + backward). A *shape*
fixes the token layout ``[B, T]``, how many of those positions are valid (carry loss), the vocabulary
and, for the LM-head path, the hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import fused_canon as fc

TOKEN_STATS_FWD = "token_stats/fwd"
POLICY_LOSS_FWD = "policy_loss/fwd"
POLICY_LOSS_FWD_BWD = "policy_loss/fwd+bwd"
LINEAR_POLICY_LOSS_FWD = "linear_policy_loss/fwd"
LINEAR_POLICY_LOSS_FWD_BWD = "linear_policy_loss/fwd+bwd"

PATHS = (TOKEN_STATS_FWD, POLICY_LOSS_FWD, POLICY_LOSS_FWD_BWD, LINEAR_POLICY_LOSS_FWD, LINEAR_POLICY_LOSS_FWD_BWD)
LINEAR_PATHS = (LINEAR_POLICY_LOSS_FWD, LINEAR_POLICY_LOSS_FWD_BWD)
BACKWARD_PATHS = (POLICY_LOSS_FWD_BWD, LINEAR_POLICY_LOSS_FWD_BWD)


def is_linear(path: str) -> bool:
    return path in LINEAR_PATHS


def has_backward(path: str) -> bool:
    return path in BACKWARD_PATHS


@dataclass(frozen=True)
class Shape:
    """One case: ``batch x seq_len`` positions of which ``n_valid`` carry loss."""

    batch: int
    seq_len: int
    n_valid: int
    vocab: int
    hidden: Optional[int] = None  # LM-head paths only

    @property
    def n_rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def padded(self) -> bool:
        return self.n_valid != self.n_rows

    def label(self) -> str:
        tokens = f"N={self.n_valid}" + (f"/{self.n_rows} (padded)" if self.padded else "")
        hidden = f" H={self.hidden}" if self.hidden is not None else ""
        return f"{tokens} V={self.vocab}{hidden}"

    def as_dict(self) -> Dict[str, object]:
        return {"batch": self.batch, "seq_len": self.seq_len, "n_rows": self.n_rows, "n_valid": self.n_valid,
                "vocab": self.vocab, "hidden": self.hidden, "padded": self.padded}


@dataclass(frozen=True)
class Grid:
    """The shape grid of a run: dense token counts, one padded batch, vocabularies, hidden sizes."""

    token_counts: tuple
    padded_rows: int  # the padded batch has this many positions, half of them masked; 0: no padded batch
    vocabs: tuple
    hiddens: tuple
    seq_len: int

    def shapes(self, path: str) -> List[Shape]:
        hiddens = self.hiddens if is_linear(path) else (None,)
        out = []
        for vocab in self.vocabs:
            for hidden in hiddens:
                for n in self.token_counts:
                    out.append(Shape(n // self.seq_len, self.seq_len, n, vocab, hidden))
                if self.padded_rows:
                    out.append(Shape(self.padded_rows // self.seq_len, self.seq_len, self.padded_rows // 2,
                                     vocab, hidden))
        return out


# docs/design.md §7 / issue 5: N in {4k, 16k, 64k} valid tokens, V in {32k, 128k, 151,936}, H in {2k, 4k}.
# Responses of 1,024 tokens; the padded batch has the footprint of N = 16,384 with the second half
# of every response masked, so its time should be that of N = 8,192 when masked rows are skipped.
FULL_GRID = Grid(token_counts=(4096, 16384, 65536), padded_rows=16384, vocabs=(32000, 128256, 151936),
                 hiddens=(2048, 4096), seq_len=1024)

# CPU smoke: tiny shapes through Triton's interpreter (about 3 ms per program). V = 1,000 is not a
# multiple of any power-of-two block size, so the masked tail of the last vocabulary block is exercised.
SMOKE_GRID = Grid(token_counts=(16, 32), padded_rows=32, vocabs=(1000,), hiddens=(32,), seq_len=8)

# Responses per prompt group in the synthetic batch (GRPO-style groups).
GROUP_SIZE = 4


def filter_grid(grid: Grid, token_counts=None, vocabs=None, hiddens=None, padded: bool = True) -> Grid:
    """Restrict a grid to the given values (None keeps all); ``padded=False`` drops the padded batch."""
    return Grid(
        token_counts=tuple(n for n in grid.token_counts if token_counts is None or n in token_counts),
        padded_rows=grid.padded_rows if padded else 0,
        vocabs=tuple(v for v in grid.vocabs if vocabs is None or v in vocabs),
        hiddens=tuple(h for h in grid.hiddens if hiddens is None or h in hiddens),
        seq_len=grid.seq_len,
    )


def input_bytes(path: str, shape: Shape, elt: int) -> int:
    """Bytes of the canonical inputs of one case (what the peak-memory figure excludes)."""
    side = shape.n_rows * (8 + 1 + 4) + shape.batch * (4 + 8 + 4)  # targets, mask, old log-probs; per response
    if is_linear(path):
        return (shape.n_rows + shape.vocab) * shape.hidden * elt + side
    return shape.n_rows * shape.vocab * elt + side


def make_inputs(path: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                seed: int) -> Dict[str, torch.Tensor]:
    """Random inputs of one case (never zeros: they hide unwritten outputs and can time faster).

    Logits are standard normal (hidden and weight are scaled so logits come out about that size);
    ``old_logprobs`` sit near ``-log V``, the log-prob of a standard-normal row, so ratios stay
    near 1 as in on-policy training. ``advantages`` are ``fc.compute_advantages(rewards, group_ids)``
    (default config: GRPO), as our path computes them, for the peers that take advantages instead of rewards.
    """
    # Large tensors are drawn on the device: a CPU draw of a 2.5 GB weight or a 20 GB logits tensor
    # takes seconds to minutes per case. Small ones come from a CPU generator.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    b, t, v = shape.batch, shape.seq_len, shape.vocab
    inputs: Dict[str, torch.Tensor] = {}
    if is_linear(path):
        h = shape.hidden
        inputs["hidden"] = torch.randn(b, t, h, generator=dev_gen, device=device, dtype=dtype)
        inputs["weight"] = torch.randn(v, h, generator=dev_gen, device=device, dtype=dtype).div_(math.sqrt(h))
    else:
        inputs["logits"] = torch.randn(b, t, v, generator=dev_gen, device=device, dtype=dtype)
    inputs["targets"] = torch.randint(0, v, (b, t), generator=gen).to(device)
    mask = torch.ones(b, t, dtype=torch.bool)
    if shape.padded:
        valid_per_row = shape.n_valid // b
        mask[:, valid_per_row:] = False
    inputs["mask"] = mask.to(device)
    # Continuous rewards: 0/1 rewards can tie within a small group, zeroing every advantage and the loss
    # (and with it the cross-check of the results).
    rewards = torch.rand(b, generator=gen)
    group_ids = torch.arange(b) // GROUP_SIZE
    inputs["rewards"] = rewards.to(device)
    inputs["group_ids"] = group_ids.to(device)
    inputs["old_logprobs"] = (-math.log(v) + 0.1 * torch.randn(b, t, generator=gen)).to(device)
    inputs["advantages"] = fc.compute_advantages(rewards, group_ids).to(device)
    return inputs
