"""DDP semantics of the global normalizers, two gloo processes on CPU.

fused-canon's loss with ``global_num_tokens`` / ``global_num_seqs`` set to the counts over all ranks is
*additive*: the per-rank losses sum to the full-batch loss. DDP averages gradients over the world, so
each rank backpropagates ``world_size * loss`` (verl's ``dp_size`` factor) and the averaged gradient is
then the single-process full-batch gradient; without the factor it is 1/world_size of it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_canon as fc

WORLD = 2
B, T, H, V = 6, 5, 8, 11
MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T) < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]  # unequal tokens per rank
    advantages = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 2
    return hidden, targets, mask, advantages, old


def loss_of(model, rows, mode):
    hidden, targets, mask, advantages, old = (x[rows] for x in batch())
    full_mask = batch()[2]
    config = fc.LossConfig(loss_agg_mode=mode, clip_ratio_c=None, loss_scale_factor=T)
    return fc.policy_loss(model(hidden), targets, mask, advantages=advantages, old_logprobs=old, config=config,
                          global_num_tokens=float(full_mask.sum()), global_num_seqs=float(B), backend="torch").loss


def model():
    torch.manual_seed(1)
    return torch.nn.Linear(H, V)


SCALES = (WORLD, 1)  # backpropagate world_size * loss (verl's dp_size factor), and the plain loss


def ddp_worker(rank, store_path, out_path):
    """Every mode and scale in one spawn (starting processes dominates the test's time). The ranks meet
    through a file (no port to pick and release)."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    grads = {}
    for mode in MODES:
        for scale in SCALES:
            ddp = torch.nn.parallel.DistributedDataParallel(model())
            (loss_of(ddp, rows, mode) * scale).backward()
            grads[mode, scale] = [p.grad for p in ddp.module.parameters()]
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (SIGABRT otherwise)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_worker, args=(os.fspath(folder / "store"), os.fspath(folder / "grads.pt")), nprocs=WORLD, join=True)
    return torch.load(folder / "grads.pt")


@pytest.mark.parametrize("mode", MODES)
def test_ddp_averaged_gradient_equals_full_batch_gradient(ddp_gradients, mode):
    reference = model()
    loss_of(reference, slice(None), mode).backward()
    for scale, factor in ((WORLD, 1.0), (1, 1.0 / WORLD)):
        for actual, full in zip(ddp_gradients[mode, scale], reference.parameters()):
            torch.testing.assert_close(actual, full.grad * factor, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_per_rank_losses_sum_to_the_full_batch_loss(mode):
    full = loss_of(model(), slice(None), mode)
    per_rank = sum(loss_of(model(), slice(r * B // WORLD, (r + 1) * B // WORLD), mode) for r in range(WORLD))
    torch.testing.assert_close(per_rank, full, rtol=1e-6, atol=1e-7)
