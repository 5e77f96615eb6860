"""Slim RL trainer that uses the fused loss (installed as ``fused_canon.trainer``).

    fused-canon train                                   # the embedded CPU demo (the defaults in config.py)
    fused-canon train actor.lr=3e-3 trainer.total_steps=50 ray.enabled=true
    fused-canon train --config my.yaml --resume
    fused-canon compare --estimators grpo,qae,canon trainer.total_steps=100

Modules, in the order a step uses them: config (schema and defaults + YAML + overrides), tasks (prompts and
rewards), model (tokenizer, policy and value models), rollout (HF / vLLM engines), learner (fused-loss
update), critic (gae's value model and loss, owned by the learner), workers (in-process or Ray actors),
tracking (metrics, plots), checkpoint, trainer (the loop), cli.
"""
