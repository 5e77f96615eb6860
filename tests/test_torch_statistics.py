"""The torch statistics backend works chunk by chunk over the rows (fused_canon/statistics.py,
docs/design.md §4.2): chunking changes no number, and the extra memory stays near the logits."""

import pytest
import torch

from fused_canon import statistics
from fused_canon.bench.counting import peak_extra_memory
from helpers import make_batch


def _stats_and_grad(batch, temperature=0.7, extra_stats=True):
    logits = batch["logits"].clone().requires_grad_()
    row_index = batch["mask"].reshape(-1).nonzero().squeeze(-1)
    outputs = statistics.torch_token_stats(logits, batch["targets"], row_index, temperature, extra_stats=extra_stats)
    g = torch.Generator().manual_seed(1)
    c_logp, c_ent = (torch.randn(len(row_index), generator=g, dtype=torch.float64) for _ in range(2))
    ((outputs[0] * c_logp.to(outputs[0].dtype)).sum() + (outputs[1] * c_ent.to(outputs[1].dtype)).sum()).backward()
    return [x.detach() for x in outputs] + [logits.grad]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_chunks_change_no_number(monkeypatch, dtype):
    """One row per chunk and every row in one chunk give bit-identical statistics and dlogits, -inf
    entries (a masked vocabulary) included."""
    batch = make_batch(batch_size=6, length=5, vocab=37, dtype=dtype, logit_scale=3.0)
    batch["logits"][0, 0, :7] = -float("inf")
    batch["targets"][0, 0] = 9
    results = {}
    for label, chunk_bytes, min_chunks in (("one row", 1, 1), ("all rows", 2 ** 40, 1)):
        monkeypatch.setattr(statistics, "STATS_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(statistics, "STATS_MIN_CHUNKS", min_chunks)
        assert statistics.chunk_rows(30, 37, dtype) == (1 if label == "one row" else 30)
        results[label] = _stats_and_grad(batch)
    for one, whole in zip(results["one row"], results["all rows"]):
        assert torch.equal(one.nan_to_num(), whole.nan_to_num())  # certainty is +inf on the -inf row


def test_chunk_rows_is_bounded_by_bytes_and_by_a_share_of_the_rows():
    assert statistics.chunk_rows(16384, 151936, torch.bfloat16) == 6  # 4 MiB of fp32 rows
    assert statistics.chunk_rows(256, 4099, torch.float32) == 4  # 1/64 of the rows
    assert statistics.chunk_rows(3, 10, torch.float64) == 1
    assert statistics.chunk_rows(0, 0, torch.float32) == 1


@pytest.mark.parametrize("rows", [256, 1024])
def test_extra_memory_is_at_most_1_1x_the_logits(rows):
    """Allocator peak of the torch statistics at two N: forward <= 0.1x the logits, forward + backward
    <= 1.1x (dlogits is 1.0x of it), as the count harness measures it."""
    batch = make_batch(batch_size=rows // 8, length=8, vocab=4099, ragged=False)
    logits = batch["logits"].requires_grad_()
    row_index = torch.arange(rows)

    def forward():
        with torch.no_grad():
            return statistics.torch_token_stats(logits, batch["targets"], row_index)

    def forward_backward():
        logp, entropy = statistics.torch_token_stats(logits, batch["targets"], row_index)
        (logp.sum() + entropy.sum()).backward()

    assert peak_extra_memory(forward)["peak_bytes"] <= 0.1 * logits.nbytes
    assert peak_extra_memory(forward_backward)["peak_bytes"] <= 1.1 * logits.nbytes
