"""The trainer's inputs for remax (a greedy rollout per prompt) and gae (a critic), on CPU in one process."""

import json
import math
import pathlib
import shlex
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

import fused_canon as fc  # noqa: E402
from fused_canon.trainer import checkpoint, tasks  # noqa: E402
from fused_canon.trainer.cli import compare_main  # noqa: E402
from fused_canon.trainer.config import runnable_estimators  # noqa: E402
from fused_canon.trainer.critic import clipped_value_loss  # noqa: E402
from fused_canon.trainer.learner import Learner  # noqa: E402
from fused_canon.trainer.model import CharTokenizer  # noqa: E402
from fused_canon.trainer.rollout import HFEngine, Sampling  # noqa: E402
from fused_canon.trainer.tracking import read_metrics  # noqa: E402
from fused_canon.trainer.trainer import make_batch, train  # noqa: E402
from helpers import TINY_TRAINER, logged_steps, tiny_trainer_config  # noqa: E402

DENSE = "data.reward_fn=fused_canon.trainer.tasks:positional_reward"  # partial credit: non-zero returns early
GAE = ["algorithm.advantage.estimator=gae", DENSE]
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CRITIC_METRICS = ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm", "critic/lr",
                  "critic/values/mean", "critic/returns/mean", "critic/returns/max", "critic/vf_explained_var")


# ----------------------------------------------------------------------------- the value loss

def test_clipped_value_loss_worked_example():
    """Rollout values 0, returns 1, clip 0.5. Token 1 (vpred 0.9) is clipped to 0.5: the clipped error
    0.25 beats the unclipped 0.01, and it has no gradient; token 2 (vpred 0.2) is inside the clip range:
    error 0.64 with gradient (0.2 - 1) / 2 under token-mean (half the squared error, two tokens).
    The padded third token is never read."""
    vpreds = torch.tensor([[0.9, 0.2, 7.0]], requires_grad=True)
    old, returns = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = clipped_value_loss(vpreds, old, returns, mask, cliprange_value=0.5, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.64) / 2)
    assert clipfrac.item() == 0.5
    loss.backward()
    torch.testing.assert_close(vpreds.grad, torch.tensor([[0.0, (0.2 - 1.0) / 2, 0.0]]))
    # seq-mean-token-sum over one sequence: the sum of the halved errors.
    loss, _ = clipped_value_loss(vpreds, old, returns, mask, 0.5, "seq-mean-token-sum")
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.64))


def _learner_and_batch(tmp_path, *overrides):
    cfg = tiny_trainer_config(tmp_path, *GAE, *overrides)
    tokenizer = CharTokenizer(tasks.SYNTHETIC_TASKS[cfg.data.task].alphabet)
    learner = Learner(cfg, tokenizer)
    engine = HFEngine(cfg.model, tokenizer, "cpu", seed=0)
    engine.update_weights(learner.named_weights())
    prompts = [tokenizer.encode(p) for p in ("1+2=", "5+3=", "9+9=", "0+7=")]
    rollout = engine.generate(prompts, 4, Sampling(max_new_tokens=2, seed=1))
    rewards = [(i % 4) / 3 for i in range(16)]  # every group has a spread of returns
    return learner, make_batch(prompts, rollout, rewards, 4, tokenizer.pad_id)


def test_critic_loss_goes_down_on_a_fixed_batch(tmp_path):
    """Five updates on one batch (two mini-batches of two micro-batches each): the value loss falls,
    and the critic's values are the ones the advantages were computed from."""
    learner, batch = _learner_and_batch(tmp_path, "actor.ppo_mini_batch_size=2", "actor.micro_batch_size=4")
    batch = learner.compute_advantages(batch, step=1)
    mask = batch["response_mask"]
    assert batch["advantages"].shape == mask.shape and batch["values"].shape == mask.shape
    # lambda = gamma = 1 with an outcome reward: every return of a response is its reward.
    torch.testing.assert_close(batch["returns"], batch["rewards"][:, None] * mask)
    losses = []
    for _ in range(5):
        metrics = learner.update(batch, step=1)
        assert all(math.isfinite(metrics[key]) for key in CRITIC_METRICS), metrics
        losses.append(metrics["critic/vf_loss"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_critic_accumulates_micro_batches_into_the_mini_batch_gradient(tmp_path):
    """The value loss is normalised by the mini-batch's counts, as the actor's: micro-batches of 3
    rows give the critic the same update as the whole batch at once."""
    critics = []
    for micro in (0, 3):
        learner, batch = _learner_and_batch(tmp_path, f"actor.micro_batch_size={micro}",
                                            "algorithm.loss_agg_mode=seq-mean-token-mean")
        learner.update(learner.compute_advantages(batch, step=1), step=1)
        critics.append(torch.cat([p.detach().flatten() for p in learner.critic.model.parameters()]))
    torch.testing.assert_close(critics[0], critics[1], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- training runs

def test_every_registered_estimator_is_a_trainer_estimator():
    assert runnable_estimators() == sorted(fc.ESTIMATORS)


def readme_orz_overrides():
    """The overrides of the README's Open-Reasoner-Zero command line (its Train block), output dir aside."""
    block = README.read_text().split("## Train", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.replace("\\\n", " ").splitlines() if "estimator=gae" in line]
    args = shlex.split(line, comments=True)
    assert args[:2] == ["fused-canon", "train"], line
    return [arg for arg in args[2:] if not arg.startswith("trainer.out_dir=")]


def test_gae_trains_and_resumes_exactly(tmp_path):
    """The README's Open-Reasoner-Zero line (gae, lambda = gamma = 1, no KL, a critic) with mini- and
    micro-batches: the critic's weights and optimizer ride in the checkpoint (in its manifest), and a
    run resumed from step 2 logs steps 3 and 4 exactly as the uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    orz = readme_orz_overrides()
    assert {"algorithm.advantage.estimator=gae", "algorithm.kl_coef=0"} <= set(orz)
    common = [*orz, DENSE, "trainer.total_steps=4", "trainer.save_freq=2", "trainer.max_ckpt_to_keep=0",
              "actor.ppo_mini_batch_size=2", "actor.micro_batch_size=4"]
    metrics = train(tiny_trainer_config(straight, *common))
    for key in CRITIC_METRICS + ("actor/pg_loss", "critic/advantages/mean"):
        assert math.isfinite(metrics[key]), key
    step_2 = straight / "checkpoints" / "global_step_2"
    assert checkpoint.damage(str(step_2)) is None
    manifest = json.loads((step_2 / checkpoint.MANIFEST).read_text())
    assert {"critic_model.pt", "critic_optimizer.pt"} <= set(manifest["files"])
    shutil.copytree(step_2, resumed / "checkpoints" / "global_step_2")
    (resumed / "checkpoints" / checkpoint.POINTER).write_text("2")
    train(tiny_trainer_config(resumed, *common, "trainer.resume=true"))
    expected, got = logged_steps(straight), logged_steps(resumed)
    # Step 2's row comes back from its checkpoint; steps 3 and 4 are trained again.
    assert sorted(got) == [2, 3, 4] and {step: expected[step] for step in (2, 3, 4)} == got


def test_a_checkpoint_without_a_critic_is_refused_by_a_run_with_one(tmp_path):
    train(tiny_trainer_config(tmp_path / "grpo", "trainer.total_steps=1", "algorithm.advantage.estimator=grpo"))
    with pytest.raises(checkpoint.CheckpointError, match="critic_model.pt is missing"):
        train(tiny_trainer_config(tmp_path / "gae", *GAE, "trainer.total_steps=2",
                                  f"trainer.resume_from={tmp_path / 'grpo' / 'checkpoints' / 'global_step_1'}"))


@pytest.mark.parametrize("micro", [0, 3], ids=["fused", "micro-batches"])
def test_remax_baseline_is_the_greedy_response_reward(tmp_path, micro):
    """A greedy rollout per prompt, timed as timing_s/gen_max, its rewards logged as critic/greedy_score;
    remax's advantage is r - b per response (b repeated over the prompt's n rows), so the mean advantage
    is the mean score minus the mean greedy score, whether the fused loss call or the advantage step
    computes it."""
    metrics = train(tiny_trainer_config(tmp_path, "trainer.total_steps=2", "algorithm.advantage.estimator=remax",
                                        f"actor.micro_batch_size={micro}", DENSE))
    assert metrics["timing_s/gen_max"] > 0
    assert metrics["critic/advantages/mean"] == pytest.approx(
        metrics["critic/score/mean"] - metrics["critic/greedy_score/mean"], abs=1e-6)
    assert math.isfinite(metrics["actor/pg_loss"]) and "critic/vf_loss" not in metrics


def test_compare_runs_remax_and_gae(tmp_path):
    assert compare_main(["--estimators", "remax,gae", "--out-dir", str(tmp_path)] + TINY_TRAINER
                        + ["trainer.total_steps=1"]) == 0
    (remax,) = read_metrics(str(tmp_path / "remax" / "seed0" / "metrics.jsonl"))
    (gae,) = read_metrics(str(tmp_path / "gae" / "seed0" / "metrics.jsonl"))
    assert "critic/greedy_score/mean" in remax["data"] and "critic/vf_loss" not in remax["data"]
    assert "critic/vf_loss" in gae["data"] and "timing_s/gen_max" not in gae["data"]
