"""The task with room to learn (sort_exact + the base model), the papers' diagnostics, compare over seeds,
and the pipeline of docs/experiments.md (its CI variant: a few steps per method)."""

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

import fused_canon as fc  # noqa: E402
from fused_canon.trainer import experiments, tasks, warmup  # noqa: E402
from fused_canon.trainer.cli import compare_main  # noqa: E402
from fused_canon.trainer.compare import parse_methods, spread  # noqa: E402
from fused_canon.trainer.config import ConfigError, load_config  # noqa: E402
from fused_canon.trainer.diagnostics import batch_diagnostics  # noqa: E402
from fused_canon.trainer.model import CharTokenizer, build_model  # noqa: E402
from helpers import TINY_TRAINER, tiny_trainer_config  # noqa: E402

# ----------------------------------------------------------------------------- the task


def test_sort_exact_has_a_length_mix_and_an_all_or_nothing_reward():
    prompts = tasks.SyntheticPrompts("sort_exact", {}, seed=0)
    examples = prompts.next_batch(300)
    lengths = {len(e.answer) for e in examples}
    assert lengths == set(range(5, 13))  # the task's own defaults: 5-12 digits
    for e in examples[:20]:
        digits = e.prompt[1:-1]
        assert e.prompt == f"S{digits}=" and e.answer == "".join(sorted(digits))
    reward = tasks.SYNTHETIC_TASKS["sort_exact"].reward
    assert reward("01234", "01234") == 1.0 and reward("01243", "01234") == 0.0 and reward("0123", "01234") == 0.0
    # data.task_options override the task's defaults
    short = tasks.SyntheticPrompts("sort_exact", {"max_length": 6}, seed=0).next_batch(50)
    assert {len(e.answer) for e in short} == {5, 6}


def test_base_model_config_is_checked():
    with pytest.raises(ConfigError, match="model.sft_steps=-1"):
        load_config(overrides=["model.sft_steps=-1"])
    with pytest.raises(ConfigError, match="model.sft_lr=0"):
        load_config(overrides=["model.sft_lr=0"])
    with pytest.raises(ConfigError, match="needs a synthetic task"):
        load_config(overrides=["model.sft_steps=5", "data.task=gsm8k", "data.path=any.jsonl"])


def test_sft_batch_trains_on_the_answer_and_eos_only():
    tokenizer = CharTokenizer("0123456789S=")
    example = tasks.Example("S31=", "13")
    input_ids, attention_mask, labels = warmup.sft_batch(tokenizer, [example, tasks.Example("S5=", "5")])
    prompt = tokenizer.encode("S31=")
    assert input_ids[0].tolist() == prompt + tokenizer.encode_response("13")
    assert labels[0, : len(prompt)].tolist() == [-100] * len(prompt)
    assert labels[0, len(prompt):].tolist() == tokenizer.encode_response("13")
    assert attention_mask[1].tolist() == [1] * 6 + [0] * 2 and labels[1, 6:].tolist() == [-100, -100]


def test_warm_start_lowers_the_loss_and_is_cached(tmp_path):
    cfg = tiny_trainer_config(tmp_path / "run", "data.task=sort_exact", "model.sft_steps=30", "model.sft_lr=3e-3",
                              "model.sft_batch_size=16", f"trainer.base_model_cache={tmp_path / 'cache'}")
    tokenizer = CharTokenizer(tasks.SYNTHETIC_TASKS["sort_exact"].alphabet)
    trained = build_model(cfg.model, tokenizer, cfg.trainer.seed)
    result = warmup.warm_start(trained, tokenizer, cfg, torch.device("cpu"))
    assert result["sft/loss_last"] < 0.8 * result["sft/loss_first"]
    read = build_model(cfg.model, tokenizer, cfg.trainer.seed)
    assert warmup.warm_start(read, tokenizer, cfg, torch.device("cpu")) == {"sft/from_cache": 1.0}
    for (name, a), b in zip(trained.state_dict().items(), read.state_dict().values()):
        assert torch.equal(a, b), name
    # the RL settings are not part of the key; the model's and the seed's are
    assert warmup.cache_key(cfg) == warmup.cache_key(load_config(overrides=TINY_TRAINER + [
        "data.task=sort_exact", "model.sft_steps=30", "model.sft_lr=3e-3", "model.sft_batch_size=16", "actor.lr=0.1"]))
    assert warmup.cache_key(cfg) != warmup.cache_key(load_config(overrides=TINY_TRAINER + [
        "data.task=sort_exact", "model.sft_steps=30", "model.sft_lr=3e-3", "model.sft_batch_size=16",
        "trainer.seed=1"]))


# ----------------------------------------------------------------------------- the diagnostics


def _batch(estimator: str, rewards, n: int, length: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    group_ids = torch.arange(len(rewards)) // n
    mask = torch.ones(len(rewards), length, dtype=torch.bool)
    mask[::2, -1] = False
    config = fc.AdvantageConfig(estimator=estimator)
    entropy = torch.rand(len(rewards), length, generator=generator)
    advantages = fc.compute_advantages(rewards, group_ids, config=config, mask=mask, token_entropy=entropy)
    logp = -torch.rand(len(rewards), length, generator=generator)
    return {"rewards": rewards, "group_ids": group_ids, "response_mask": mask, "advantages": advantages,
            "old_logprobs": logp, "token_entropy": entropy}, config


@pytest.mark.parametrize("estimator", ["grpo", "qae"])
def test_gate_counts_the_non_zero_advantages_per_success_count(estimator):
    """Groups of 4 with 0..4 correct: the measured fraction per c/n is the estimator's own, per group."""
    rewards = [0, 0, 0, 0] + [1, 0, 0, 0] + [1, 1, 0, 0] + [1, 1, 1, 0] + [1, 1, 1, 1] + [0, 1, 0, 0]
    batch, config = _batch(estimator, rewards, 4)
    metrics = batch_diagnostics(batch, config, step=0)
    nonzero = batch["advantages"] != 0
    for c in range(5):
        groups = [g for g in range(6) if sum(rewards[4 * g: 4 * g + 4]) == c]
        expected = sum(float(nonzero[4 * g: 4 * g + 4].float().mean()) for g in groups) / len(groups)
        assert metrics[f"gate/nonzero_frac/{c}of4"] == pytest.approx(expected)
        assert metrics[f"gate/groups/{c}of4"] == len(groups)
    assert metrics["critic/advantages/nonzero_frac"] == pytest.approx(float(nonzero.float().mean()))
    if estimator == "grpo":  # every mixed group moves, solved and unsolved ones do not
        assert [metrics[f"gate/nonzero_frac/{c}of4"] for c in range(5)] == [0, 1, 1, 1, 0]
    else:  # QAE's gate (K = 0.4): only the correct answers of a hard group, only the wrong ones of an easy one
        assert metrics["gate/nonzero_frac/1of4"] == 0.25 and metrics["gate/nonzero_frac/3of4"] == 0.25


def test_covariance_and_halves_are_what_they_say():
    batch, config = _batch("grpo", [1, 0, 0, 1, 1, 1, 0, 1], 4)
    metrics = batch_diagnostics(batch, config, step=0)
    valid = batch["response_mask"]
    a = batch["advantages"][:, None].expand_as(valid)[valid].double()
    logp = batch["old_logprobs"][valid].double()
    assert metrics["actor/cov_logprob_advantage"] == pytest.approx(float(((a - a.mean()) * (logp - logp.mean()))
                                                                         .mean()), rel=1e-5)
    # CANON's halves: the two responses of each group with the higher mean entropy
    mean_entropy = (batch["token_entropy"] * valid).sum(-1) / valid.sum(-1)
    gaps = []
    for g in range(2):
        rows = list(range(4 * g, 4 * g + 4))
        order = sorted(rows, key=lambda r: float(mean_entropy[r]))
        low, high = order[:2], order[2:]
        gaps.append(sum(batch["rewards"][low]) / 2 - sum(batch["rewards"][high]) / 2)
    assert metrics["canon/low_minus_high_score"] == pytest.approx(float(sum(gaps) / 2))
    assert metrics["canon/low_half_better_frac"] == sum(float(g > 0) for g in gaps) / 2
    assert metrics["canon/high_half_better_frac"] == sum(float(g < 0) for g in gaps) / 2


def test_theoretical_gate_is_the_estimator_itself():
    assert experiments.theoretical_gate("grpo", 4) == {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0}
    gate = experiments.theoretical_gate("qae", 8)
    assert gate[0] == gate[8] == 0.0 and gate[1] == 1 / 8 and gate[7] == 1 / 8


# ----------------------------------------------------------------------------- compare


def test_methods_and_bad_compare_arguments(tmp_path, capsys):
    (grpo, clip) = parse_methods("grpo, grpo+clip_cov")
    assert grpo.overrides == ["algorithm.advantage.estimator=grpo"]
    assert clip.overrides == ["algorithm.advantage.estimator=grpo", "algorithm.loss_mode=clip_cov"]
    out = str(tmp_path / "cmp")
    for argv, message in ((["--methods", "grpo,grpo"], "names a method twice"),
                          (["--methods", "grpo+clip_cvo"], "'clip_cvo' is not valid"),
                          (["--seeds", "0,x"], "--seeds='0,x' is not valid"), (["--jobs", "0"], "--jobs=0")):
        assert compare_main(argv + ["--out-dir", out]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    assert spread([1.0, 3.0, 2.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0} and spread([1.0, None]) is None


def test_compare_over_seeds_writes_the_table_and_the_spread(tmp_path):
    out = tmp_path / "cmp"
    assert compare_main(["--methods", "grpo,grpo+kl_cov", "--seeds", "0,1", "--out-dir", str(out)] + TINY_TRAINER
                        + ["trainer.total_steps=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["methods"] == ["grpo", "grpo+kl_cov"]
    for method in summary["methods"]:
        scores = [summary["runs"][method][str(seed)]["score_last"] for seed in (0, 1)]
        assert summary["summary"][method]["score_last"] == spread(scores)
        assert (out / method / "seed1" / "metrics.jsonl").exists()
    assert "kl_cov" in (out / "grpo+kl_cov" / "seed0" / "config.yaml").read_text()
    assert "| grpo+kl_cov |" in (out / "summary.md").read_text()


def test_experiments_pipeline_ci_variant(tmp_path):
    """The shortened run of docs/experiments.md: every method, a few steps, one seed; the document and
    its figures are written (the full run is `python -m fused_canon.trainer.experiments`)."""
    docs = tmp_path / "docs"
    assert experiments.main(["--smoke", "--jobs", "1", "--out-dir", str(tmp_path / "runs"),
                             "--docs-dir", str(docs)]) == 0
    text = (docs / "experiments.md").read_text()
    for method in experiments.METHODS:
        assert f"| {method.name} |" in text
    for figure in experiments.FIGURES:
        assert (docs / "experiments" / figure).stat().st_size > 10_000
    assert "Generated by `python -m fused_canon.trainer.experiments --smoke`" in text
    assert "| QAE | two regimes" in text
