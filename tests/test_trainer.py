"""Trainer tests on CPU, in one process: config, tasks, engine weight sync, learner, e2e, resume, CLI."""

import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

import fused_canon as fc  # noqa: E402
from fused_canon.trainer import checkpoint, tasks  # noqa: E402
from fused_canon.trainer.cli import compare_main, train_main  # noqa: E402
from fused_canon.trainer.config import (ConfigError, TrainConfig, load_config, runnable_estimators,  # noqa: E402
                                        to_yaml)
from fused_canon.trainer.learner import Learner  # noqa: E402
from fused_canon.trainer.model import CharTokenizer  # noqa: E402
from fused_canon.trainer.rollout import HFEngine, Sampling  # noqa: E402
from fused_canon.trainer.tracking import learning_summary, read_metrics  # noqa: E402
from fused_canon.trainer.trainer import make_batch, train  # noqa: E402
from helpers import TINY_TRAINER, tiny_trainer_config  # noqa: E402

# ----------------------------------------------------------------------------- config

def test_config_layers_and_overrides(tmp_path):
    user_yaml = tmp_path / "user.yaml"
    user_yaml.write_text("actor:\n  lr: 0.5\nrollout:\n  n: 3\n")
    cfg = load_config(str(user_yaml), ["rollout.n=5", "algorithm.advantage.estimator=grpo",
                                       "algorithm.clip_ratio_high=0.3", "data.task_options.max_operand=3"])
    assert cfg.actor.lr == 0.5  # from the user YAML
    assert cfg.rollout.n == 5  # the command line wins over the YAML
    assert isinstance(cfg.algorithm, fc.LossConfig) and isinstance(cfg.algorithm.advantage, fc.AdvantageConfig)
    assert cfg.algorithm.advantage.estimator == "grpo" and cfg.algorithm.clip_ratio_high == 0.3
    assert cfg.data.task_options == {"max_operand": 3}
    assert load_config().algorithm.advantage.estimator == "canon"  # the shipped default run uses CANON


def test_the_dataclasses_are_the_only_defaults():
    """No second copy of the defaults (a YAML once disagreed with them): the CLI's config is TrainConfig()."""
    assert to_yaml(load_config()) == to_yaml(TrainConfig())
    assert TrainConfig().algorithm.advantage.estimator == "canon" and TrainConfig().trainer.total_steps == 200


@pytest.mark.parametrize("override, message", [
    ("actor.learning_rate=1", "unknown config key 'actor.learning_rate'"),
    ("optim.lr=1", "unknown config key 'optim'"),
    ("algorithm.advantage.estimatr=grpo", "unknown config key 'algorithm.advantage.estimatr'"),
])
def test_unknown_keys_are_rejected_with_the_valid_ones_listed(override, message):
    with pytest.raises(ValueError, match=message) as error:
        load_config(overrides=[override])
    assert "valid keys" in str(error.value)
    if override.startswith("actor."):
        assert "ppo_epochs" in str(error.value)  # lists the keys of that section


BAD_VALUES = [  # (override, what the message must name)
    ("algorithm.advantage.baseline=median", "baseline='median'"), ("rollout.engine=sglang", "rollout.engine"),
    ("actor.loss_fn=mse", "actor.loss_fn"), ("data.train_batch_size=0", "data.train_batch_size"),
    ("actor.ppo_mini_batch_size=5", "actor.ppo_mini_batch_size"), ("algorithm.loss_agg_mode=sum", "loss_agg_mode"),
    ("actor.grad_clip=-1", "actor.grad_clip=-1.0"), ("actor.grad_clip=0", "actor.grad_clip=0.0"),
    ("actor.lr=-1", "actor.lr=-1.0"), ("rollout.temperature=0", "rollout.temperature=0.0"),
    ("actor.betas=[0.9]", "actor.betas=[0.9]"), ("actor.betas=[0.9,1.5]", "actor.betas[1]=1.5"),
    ("model.hidden_size=0", "model.hidden_size=0"), ("model.num_heads=3", "model.num_heads=3"),
    ("trainer.seed=1.5", "trainer.seed"), ("trainer.seed=4611686018427387904", "trainer.seed"),
    ("rollout.top_p=0", "rollout.top_p"), ("rollout.top_k=0", "rollout.top_k"),
    ("algorithm.advantage.estimator=ppo", "'qae'"), ("algorithm.loss_mode=ppo2", "algorithm.loss_mode"),
    ("algorithm.advantage.canon_metric=custom", "metric"),
    ("critic.lr=0", "critic.lr=0.0"), ("critic.cliprange_value=0", "critic.cliprange_value=0.0"),
    ("critic.betas=[0.9]", "critic.betas=[0.9]"), ("critic.grad_clip=-1", "critic.grad_clip=-1.0"),
    ("critic.weight_decay=-0.1", "critic.weight_decay=-0.1"), ("critic.learning_rate=1", "'critic.learning_rate'"),
    ("algorithm.loss_mode=geo_mean", "sequence-level"),
    ("algorithm.advantage.estimator=opo algorithm.advantage.baseline=quantile", "baseline of its own"),
    ("data.task=chess", "data.task"), ("data.task_options.max_operand=3 data.task=sort", "max_operand"),
    ("data.task=gsm8k", "data.path"), ("data.task=gsm8k data.path=/no/such.jsonl", "data.path"),
    ("data.reward_fn=no_such_module:f", "data.reward_fn"), ("trainer.plugins=[no_such_plugin]", "trainer.plugins"),
    ("trainer.resume_from=/no/such/global_step_3", "trainer.resume_from"), ("trainer.logger=[wandb]", "wandb"),
    ("algorithm.temperature=0", "algorithm: temperature"), ("ray.timeout_s=0", "ray.timeout_s"),
    pytest.param("trainer.device=cuda", "trainer.device='cuda'",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="valid where CUDA is available")),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES)
def test_bad_values_are_config_errors_before_any_work(tmp_path, capsys, overrides, message):
    """Exit code 2, one message naming the field and value, nothing built or written."""
    out = tmp_path / "run"
    assert train_main(overrides.split() + [f"trainer.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fused-canon train: config error: ") and message in err, err
    assert not out.exists()


def test_config_file_errors(tmp_path, capsys):
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("actor: [1\n")
    assert train_main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert train_main(["--config", str(tmp_path / "list.yaml")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_qae_is_an_estimator_name_of_the_trainer(tmp_path, capsys):
    """`algorithm.advantage.estimator=qae` trains (qae = grpo with baseline=quantile: the same run);
    compare checks its names the same way, before any run."""
    assert "qae" in runnable_estimators()
    qae = train(tiny_trainer_config(tmp_path / "qae", "trainer.total_steps=2", "algorithm.advantage.estimator=qae"))
    grpo_quantile = train(tiny_trainer_config(tmp_path / "grpo", "trainer.total_steps=2",
                                              "algorithm.advantage.estimator=grpo",
                                              "algorithm.advantage.baseline=quantile"))
    assert _without_timing(qae) == _without_timing(grpo_quantile)
    assert compare_main(["--estimators", "grpo,qea", "--out-dir", str(tmp_path / "cmp")]) == 2
    assert "'qea' is not valid" in capsys.readouterr().err and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("overrides", [
    ["algorithm.advantage.estimator=ucas"], ["algorithm.advantage.estimator=ktae", "actor.ppo_epochs=2"],
    ["algorithm.advantage.estimator=optimal_token_baseline", "actor.micro_batch_size=3"],
    ["algorithm.advantage.estimator=reinforce_plus_plus", "algorithm.advantage.gamma=0.9"],
    ["algorithm.advantage.estimator=adora", "algorithm.advantage.adora_correct_score=0.5"],
    ["algorithm.loss_mode=sapo"], ["algorithm.loss_mode=gpg", "actor.loss_fn=linear_policy_loss"],
    ["algorithm.loss_mode=geo_mean", "algorithm.loss_agg_mode=seq-mean-token-mean"],
], ids=lambda overrides: overrides[0].split("=")[1])
def test_wave2_estimators_and_losses_train(tmp_path, overrides):
    """Two steps with each wave-2 estimator the trainer can feed (the logits' signals and token ids come
    from its statistics pass or the fused loss call) and each wave-2 loss: the run completes with finite
    metrics (the tiny untrained policy mostly scores 0 in two steps, so the gradient may be 0)."""
    assert all(name in runnable_estimators() for name in ("ucas", "ktae", "optimal_token_baseline", "remax", "gae"))
    metrics = train(tiny_trainer_config(tmp_path, "trainer.total_steps=2", *overrides,
                                        "data.reward_fn=fused_canon.trainer.tasks:positional_reward"))
    for key in ("actor/pg_loss", "actor/grad_norm", "critic/advantages/mean", "actor/ppo_kl"):
        assert math.isfinite(metrics[key]), key


def test_token_level_advantage_metrics_count_valid_tokens_only():
    batch = {"advantages": torch.tensor([[1.0, 3.0, 0.0], [-2.0, 0.0, 0.0]]),
             "response_mask": torch.tensor([[True, True, False], [True, False, False]])}
    assert Learner._batch_metrics(batch) == {"critic/advantages/mean": pytest.approx(2 / 3),
                                             "critic/advantages/max": 3.0, "critic/advantages/min": -2.0}


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("timing_s/")}


# ----------------------------------------------------------------------------- tasks and rewards

def test_rewards():
    assert tasks.exact_match_reward(" 12", "12") == 1.0 and tasks.exact_match_reward("1", "12") == 0.0
    assert tasks.positional_reward("4321", "4321") == 1.0
    assert tasks.positional_reward("43", "4321") == 0.5
    assert tasks.positional_reward("432100", "4321") == pytest.approx(4 / 6)  # extra characters cost
    assert tasks.gsm8k_reward("so 3+4 is 7\n#### 7", "7") == 1.0
    assert tasks.gsm8k_reward("#### 1,234", "1234") == 1.0
    assert tasks.gsm8k_reward("#### 8", "7") == 0.0 and tasks.gsm8k_reward("7", "7") == 0.0


def test_synthetic_tasks_are_reproducible_by_index_and_correct():
    stream = tasks.SyntheticPrompts("arithmetic", {"max_operand": 9}, seed=3)
    first = stream.next_batch(5)
    again = tasks.SyntheticPrompts("arithmetic", {"max_operand": 9}, seed=3)
    again.position = 2
    assert again.next_batch(3) == first[2:]
    for example in first:
        a, b = example.prompt.rstrip("=").split("+")
        assert example.answer == f"{int(a) + int(b):02d}"  # zero-padded to the default width 2
    assert tasks.arithmetic(__import__("random").Random(0), operators="-", width=0).answer.lstrip("-").isdigit()
    rng_examples = [tasks.SYNTHETIC_TASKS[name].generate(__import__("random").Random(1)) for name in
                    ("reverse", "sort", "digit_sequence")]
    reverse, sort, sequence = rng_examples
    assert reverse.answer == reverse.prompt[1:-1][::-1]
    assert sort.answer == "".join(sorted(sort.prompt[1:-1]))
    digits = [int(d) for d in sequence.prompt[:-1] + sequence.answer]
    assert len({(b - a) % 10 for a, b in zip(digits, digits[1:])}) == 1
    with pytest.raises(ValueError, match="not options of task 'reverse'"):
        tasks.SyntheticPrompts("reverse", {"max_operand": 3}, seed=0)


def test_gsm8k_jsonl_dataset_and_reward_plugin(tmp_path):
    path = tmp_path / "tiny.jsonl"
    rows = [{"question": f"{a}+{a}=", "answer": f"{a} plus {a} is {2 * a}\n#### {2 * a}"} for a in range(1, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=["data.task=gsm8k", f"data.path={path}"])
    stream = tasks.build_prompts(cfg.data, seed=0)
    seen = stream.next_batch(3)  # one epoch: a permutation of the records
    assert sorted(e.answer for e in seen) == ["2", "4", "6"]
    assert tasks.build_reward(cfg.data) is tasks.gsm8k_reward
    cfg = load_config(overrides=["data.reward_fn=fused_canon.trainer.tasks:positional_reward"])
    assert tasks.build_reward(cfg.data) is tasks.positional_reward


def test_gsm8k_dataset_trains_one_step(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"}) + "\n"
                            for a in range(5)))
    cfg = tiny_trainer_config(tmp_path / "run", "data.task=gsm8k", f"data.path={path}", "trainer.total_steps=1")
    metrics = train(cfg)
    assert 0.0 <= metrics["critic/score/mean"] <= 1.0 and "actor/pg_loss" in metrics


# ----------------------------------------------------------------------------- engine and learner

def _engine_and_learner(tmp_path, *overrides):
    cfg = tiny_trainer_config(tmp_path, *overrides)
    tokenizer = CharTokenizer(tasks.SYNTHETIC_TASKS[cfg.data.task].alphabet)
    engine = HFEngine(cfg.model, tokenizer, "cpu", seed=123)  # its own init: sync must replace it
    learner = Learner(cfg, tokenizer)
    return cfg, tokenizer, engine, learner


def test_hf_engine_weight_sync_changes_outputs(tmp_path):
    cfg, tokenizer, engine, learner = _engine_and_learner(tmp_path)
    prompts = [tokenizer.encode("3+4="), tokenizer.encode("12+9=")]  # different lengths: left padding
    sampling = Sampling(max_new_tokens=6, seed=7)
    before = engine.generate(prompts, 4, sampling)
    repeat = engine.generate(prompts, 4, sampling)
    assert torch.equal(before.response_ids, repeat.response_ids)  # same seed, same samples

    engine.update_weights(learner.named_weights())
    synced = engine.generate(prompts, 4, sampling)
    assert not torch.equal(before.logprobs[synced.response_mask & before.response_mask],
                           synced.logprobs[synced.response_mask & before.response_mask])
    # After the sync the engine samples from the learner's policy: same log-probs, token for token.
    batch = make_batch(prompts, synced, [0.0] * 8, 4, tokenizer.pad_id)
    learner_logprobs, _ = learner.token_stats(learner.model, batch)
    mask = synced.response_mask
    torch.testing.assert_close(learner_logprobs[mask], synced.logprobs[mask], atol=1e-4, rtol=0)
    assert set(synced.finish_reasons) <= {"stop", "length"}
    for row, reason in enumerate(synced.finish_reasons):
        last = synced.response_ids[row][mask[row]][-1].item()
        assert (last == tokenizer.eos_id) == (reason == "stop")


def test_micro_batches_give_the_full_batch_update(tmp_path):
    """Global token/sequence normalizers: accumulating micro-batches == one full-batch step."""
    results = []
    for micro in (0, 3):
        for agg in ("token-mean", "seq-mean-token-sum"):
            cfg, tokenizer, engine, learner = _engine_and_learner(tmp_path, f"actor.micro_batch_size={micro}",
                                                                  f"algorithm.loss_agg_mode={agg}")
            engine.update_weights(learner.named_weights())
            prompts = [tokenizer.encode(p) for p in ("1+2=", "5-3=", "9+9=", "0-7=")]
            rollout = engine.generate(prompts, 4, Sampling(max_new_tokens=5, seed=1))
            rewards = [float(i % 3 == 0) for i in range(16)]
            batch = learner.compute_advantages(make_batch(prompts, rollout, rewards, 4, tokenizer.pad_id), step=1)
            learner.update(batch, step=1)
            results.append((micro, agg, torch.cat([p.detach().flatten() for p in learner.model.parameters()])))
    for agg in ("token-mean", "seq-mean-token-sum"):
        full, micro = [params for m, a, params in results if a == agg]
        torch.testing.assert_close(full, micro, atol=1e-6, rtol=1e-5)


def test_ppo_epochs_minibatches_kl_and_linear_loss_run(tmp_path):
    cfg = tiny_trainer_config(tmp_path, "trainer.total_steps=2", "actor.ppo_epochs=2", "actor.ppo_mini_batch_size=2",
                      "actor.micro_batch_size=3", "algorithm.kl_coef=0.1", "actor.loss_fn=linear_policy_loss",
                      "algorithm.advantage.estimator=grpo",
                      "data.reward_fn=fused_canon.trainer.tasks:positional_reward")  # dense: non-zero advantages
    metrics = train(cfg)
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/kl_loss", "actor/entropy",
                "actor/grad_norm", "critic/advantages/mean", "critic/score/mean", "response_length/mean",
                "timing_s/gen", "timing_s/update_actor"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    # The second epoch and mini-batch run on updated weights against the recomputed old log-probs.
    assert metrics["actor/ppo_kl"] != 0.0


def test_lm_head_loss_refuses_a_soft_capped_model(tmp_path, monkeypatch):
    """A Gemma-style model's logits are soft-capped: the LM-head loss (hidden @ W) would be silently
    wrong, so the learner refuses it through the one LM-head lookup (integrations.hf.lm_head_of)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fused_canon.trainer import learner as learner_module

    def tiny_gemma(model_cfg, tokenizer, seed):
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                              head_dim=16, final_logit_softcapping=30.0))

    monkeypatch.setattr(learner_module, "build_model", tiny_gemma)
    tokenizer = CharTokenizer(tasks.SYNTHETIC_TASKS["arithmetic"].alphabet)
    with pytest.raises(ConfigError, match=r"linear_policy_loss is not valid .*\(final_logit_softcapping\)"):
        Learner(tiny_trainer_config(tmp_path, "actor.loss_fn=linear_policy_loss"), tokenizer)
    assert Learner(tiny_trainer_config(tmp_path), tokenizer).lm_head is None  # logits: the model applies its capping


# ----------------------------------------------------------------------------- end to end

def test_e2e_reward_improves_and_outputs_are_written(tmp_path):
    """A shortened default run (same task, model, estimator) whose reward must visibly rise."""
    out = tmp_path / "run"
    code = train_main([f"trainer.out_dir={out}", "trainer.total_steps=60", "trainer.progress_bar=false",
                       "trainer.save_freq=30", "trainer.test_freq=30", "trainer.num_threads=2"])
    assert code == 0
    summary = learning_summary(str(out / "metrics.jsonl"))
    assert summary["steps"] == 60
    assert summary["improvement"] >= 0.15, summary
    rows = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert "val/score/mean" in rows[29]["data"] and "val/score/mean" not in rows[30]["data"]
    assert (out / "metrics.png").stat().st_size > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    assert checkpoint.pointed_step(str(out / "checkpoints")) == 60


def test_console_lines_follow_the_verl_format(tmp_path, capsys):
    train(tiny_trainer_config(tmp_path, "trainer.total_steps=2", "trainer.logger=[console]"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step:")]
    assert len(lines) == 2 and lines[1].startswith("step:2 - ")
    assert " - critic/score/mean:" in lines[0] and " - timing_s/step:" in lines[0]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["trainer.total_steps=4", "trainer.save_freq=2", "trainer.max_ckpt_to_keep=0"]
    train(tiny_trainer_config(straight, *common))
    # Keep only the step-2 checkpoint of the uninterrupted run, as if it had stopped there.
    shutil.copytree(straight / "checkpoints" / "global_step_2", resumed / "checkpoints" / "global_step_2")
    (resumed / "checkpoints" / checkpoint.POINTER).write_text("2")
    train(tiny_trainer_config(resumed, *common, "trainer.resume=true"))

    def steps_3_4(run):
        rows = read_metrics(str(run / "metrics.jsonl"))
        return {r["step"]: {k: v for k, v in r["data"].items() if not k.startswith("timing_s/")}
                for r in rows if r["step"] > 2}

    expected, got = steps_3_4(straight), steps_3_4(resumed)
    assert sorted(got) == [3, 4]
    assert got == expected  # exactly: same samples, same updates


def test_checkpoint_pointer_names_only_complete_checkpoints(tmp_path):
    root = str(tmp_path)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(root, step, lambda d: open(os.path.join(d, "model.pt"), "w").close(),
                                   {"data_position": step * 10}, max_to_keep=2)
    assert checkpoint.pointed_step(root) == 3
    assert sorted(os.listdir(root)) == ["global_step_2", "global_step_3", checkpoint.POINTER]
    assert checkpoint.load_trainer_state(checkpoint.checkpoint_path(root, 3)) == {"step": 3, "data_position": 30}


def test_compare_runs_each_estimator_and_plots(tmp_path, capsys):
    code = compare_main(["--estimators", "grpo,qae", "--out-dir", str(tmp_path)]
                        + TINY_TRAINER + ["trainer.total_steps=2"])
    assert code == 0
    for figure in ("curves.png", "gate.png", "halves.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    grpo = (tmp_path / "grpo" / "seed0" / "config.yaml").read_text()
    qae = (tmp_path / "qae" / "seed0" / "config.yaml").read_text()
    assert "estimator: grpo" in grpo and "baseline: mean" in grpo
    assert "estimator: qae" in qae
    assert compare_main(["--estimators", "ppo"]) == 2
