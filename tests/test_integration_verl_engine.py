"""verl 0.9.1's actor update step (``FSDPEngine.train_batch``: forward_backward_batch over micro-batches
with verl's ``ppo_loss``, then ``optimizer_step``) on a tiny Llama built in code, with the fused
token-statistics switch on and off: same loss, metrics and gradients.

What does not run on CPU: verl registers its FSDP engines for cuda/npu only and wraps the module in
FSDP on a device mesh, so the engine object is built here without ``__init__`` (as verl's own CPU tests
do) around the plain module; everything from ``train_batch`` down is verl's code."""

import functools
import math

import pytest
import torch

import fused_canon as fc
from peers import require

require("verl")
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from fused_canon.integrations.verl_engine import SWITCH, FusedTokenStatsFSDPEngine  # noqa: E402

VOCAB = 61


@pytest.fixture(scope="module", autouse=True)
def single_process_group(tmp_path_factory):
    """verl's forward_backward_batch all-reduces the token count over the data-parallel group. The group
    meets through a file of this test session (pytest-xdist may run this module in two processes; a free
    TCP port picked and released could be taken by then)."""
    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("process_group") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).float()


def rl_batch(prompt_lengths=(3, 2, 4, 1), response_lengths=(4, 5, 1, 3), prompt=4, response=5):
    """An update batch as verl's trainer sends it (left-padded prompts, right-padded responses), then
    verl's own left_right_2_no_padding into the nested layout the engine takes."""
    g = torch.Generator().manual_seed(2)
    b = len(prompt_lengths)
    positions_p, positions_r = torch.arange(prompt), torch.arange(response)
    prompt_mask = positions_p >= prompt - torch.tensor(prompt_lengths)[:, None]
    response_mask = positions_r < torch.tensor(response_lengths)[:, None]
    prompts = torch.randint(1, VOCAB, (b, prompt), generator=g) * prompt_mask
    responses = torch.randint(1, VOCAB, (b, response), generator=g) * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    data = TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "response_mask": response_mask.long(),
        "old_log_probs": -torch.rand(b, response, generator=g) * 3 * response_mask,
        "advantages": torch.randn(b, response, generator=g) * response_mask,
    }, batch_size=[b])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, temperature=0.7, calculate_entropy=True, use_remove_padding=True,
                         use_dynamic_bsz=False, micro_batch_size_per_gpu=2, use_fused_kernels=False,
                         global_batch_size=b, max_token_len_per_gpu=1024)
    return data


def engine(switch_on):
    """verl's engine around the plain module, with the attributes its __init__ would set on CPU."""
    module = tiny_llama()
    eng = object.__new__(FusedTokenStatsFSDPEngine)
    eng.module = module
    eng.engine_config = FSDPEngineConfig(strategy="fsdp", use_torch_compile=False)
    eng.optimizer_config = FSDPOptimizerConfig(lr=0.1, clip_grad=1.0)
    eng.model_config = type("ModelConfig", (), {"fused_kernel_options": {SWITCH: switch_on}})()
    eng.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    eng.use_ulysses_sp, eng.ulysses_sequence_parallel_size, eng.pad_to_length = False, 1, None
    eng._autocast_dtype, eng._qat_enabled, eng.scaler = torch.float32, False, None
    eng.compute_entropy_from_logits = transformer_impl.verl_F.entropy_from_logits
    eng.get_data_parallel_group = lambda: dist.group.WORLD
    eng.get_data_parallel_size = lambda: 1
    eng.is_mp_src_rank_with_outputs = lambda: True
    return eng


@pytest.mark.parametrize("loss_agg_mode, entropy_coeff", [("token-mean", 0.0), ("seq-mean-token-mean", 0.01)])
def test_train_batch_same_loss_and_gradients_with_switch_on_and_off(monkeypatch, loss_agg_mode, entropy_coeff):
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                        loss_agg_mode=loss_agg_mode,
                        entropy_coeff=entropy_coeff, use_torch_compile=False)
    from fused_canon.integrations import verl_engine

    calls = []
    monkeypatch.setattr(verl_engine, "token_stats", lambda *a, **k: calls.append(k) or fc.token_stats(*a, **k))
    results = {}
    for switch_on in (False, True):
        eng = engine(switch_on)
        before = [p.detach().clone() for p in eng.module.parameters()]
        output = eng.train_batch(rl_batch(), loss_function=functools.partial(ppo_loss, config=actor))
        grads = [p.grad.detach().clone() for p in eng.module.parameters()]
        updates = [p.detach() - b for p, b in zip(eng.module.parameters(), before)]
        results[switch_on] = output, grads, updates
        assert len(calls) == (2 if switch_on else 0)  # one call per micro-batch, only with the switch on
    (off, off_grads, off_updates), (on, on_grads, on_updates) = results[False], results[True]
    assert math.isfinite(off["metrics"]["grad_norm"]) and off["metrics"]["grad_norm"] > 0
    assert on["metrics"]["grad_norm"] == pytest.approx(off["metrics"]["grad_norm"], rel=1e-5)
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6, abs=1e-7)  # one loss per micro-batch
    assert calls[0] == {"temperature": 0.7}
    for a, b in zip(on_grads, off_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(on_updates, off_updates):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
