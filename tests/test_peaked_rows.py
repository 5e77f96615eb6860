"""Very peaked rows (logit gaps of 30 and more) through both Triton statistics paths, against float64.

Both paths share kernels/softmax.py. With a gap of 30, 1 - p_max ~ 1e-13 is far below fp32's
epsilon: log(sum exp), 1 - exp(logp) or z_y - zbar formed in fp32 round the answer to 0 or to noise.
logp, entropy and the target column of the gradient must keep their *relative* precision (1e-4
elementwise) against ``helpers.peaked_row_reference``; the other columns are checked elementwise as in
the kernels' own tests. The LM-head path runs with an identity head (hidden = logits rows, W = I), so
that its grad_hidden is dL/dlogits.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import assert_elementwise_close, peaked_row_reference  # noqa: E402

from fused_canon.kernels.linear_token_stats import LinearTokenStatsBlocks, triton_linear_token_stats  # noqa: E402
from fused_canon.kernels.logits_token_stats import triton_token_stats  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if _INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(not _INTERPRET and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels")
V = 100  # several vocabulary tiles of 32 (logits path) or 16 (LM-head path), the last one partial


def peaked_rows():
    """Rows of logits whose target leads the rest by 30 to 45, in the first, a middle or the last tile;
    one with a masked (-inf) part of the vocabulary; one whose target trails the leader by 40; an
    all-equal row (entropy log V exactly)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g).clamp(-3, 3)
    targets = torch.tensor([0, 57, 99, 20, 5, 42])
    for row, gap in ((0, 33.0), (1, 40.0), (2, 45.0), (3, 36.0)):  # z - max >= -73 after T: no fp32 subnormals
        logits[row, targets[row]] = 3.0 + gap
    logits[3, 60:] = float("-inf")  # a masked vocabulary, including whole tiles
    logits[4, 70] = 43.0  # the target trails by 40
    logits[5] = 0.5
    c_logp = torch.tensor([0.7, -1.1, 0.4, 0.9, -0.2, 0.3])
    c_ent = torch.tensor([-0.3, 0.5, 0.8, -0.6, 0.6, 0.1])
    return logits, targets, c_logp, c_ent


def logits_path(logits, targets, temperature, c_logp, c_ent):
    x = logits[None].clone().to(DEVICE).requires_grad_()
    logp, entropy = triton_token_stats(x, targets[None].to(DEVICE), torch.arange(len(targets), device=DEVICE),
                                       temperature, block_v=32)
    (c_logp.to(DEVICE) * logp + c_ent.to(DEVICE) * entropy).sum().backward()
    return logp.detach().cpu(), entropy.detach().cpu(), x.grad[0].cpu()


def lm_head_path(logits, targets, temperature, c_logp, c_ent):
    hidden = logits.clone().to(DEVICE).requires_grad_()
    blocks = LinearTokenStatsBlocks(block_n=16, block_v=16, block_h=32, dlogits_block_n=16, gemm_block_out=32,
                                    gemm_block_k=32)
    logp, entropy = triton_linear_token_stats(hidden, torch.eye(V, device=DEVICE), targets.to(DEVICE),
                                              torch.arange(len(targets), device=DEVICE), None, temperature,
                                              block_sizes=blocks)
    (c_logp.to(DEVICE) * logp + c_ent.to(DEVICE) * entropy).sum().backward()
    return logp.detach().cpu(), entropy.detach().cpu(), hidden.grad.cpu()


def relative(actual, expected):
    return ((actual.double() - expected).abs() / expected.abs()).max().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("path", [logits_path, lm_head_path], ids=["logits", "lm_head"])
def test_peaked_rows_keep_relative_precision(path, temperature):
    logits, targets, c_logp, c_ent = peaked_rows()
    if path is lm_head_path:  # the identity head computes -inf * 0 = NaN: a masked vocabulary is logits-only
        logits[3, 60:] = -60.0
    logp, entropy, grad = path(logits, targets, temperature, c_logp, c_ent)
    ref_logp, ref_entropy, ref_grad = peaked_row_reference(logits.double() / temperature, targets, c_logp, c_ent)
    ref_grad = ref_grad / temperature
    peaked = [0, 1, 2, 3]
    assert (ref_entropy[peaked] < 1e-10).all() and (-ref_logp[peaked] < 1e-10).all()  # truly peaked
    assert relative(logp, ref_logp) < 1e-4, (logp, ref_logp)
    assert relative(entropy, ref_entropy) < 1e-4, (entropy, ref_entropy)
    target_column = grad.gather(1, targets[:, None])[:, 0]
    ref_target_column = ref_grad.gather(1, targets[:, None])[:, 0]
    assert relative(target_column, ref_target_column) < 1e-4, (target_column, ref_target_column)
    for row in range(len(targets)):  # each row against its own scale
        assert_elementwise_close(grad[row], ref_grad[row], 1e-4, f"dlogits of row {row}")
    assert entropy[5].item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=1e-6)
