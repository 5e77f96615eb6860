"""hf_policy_loss on a tiny Hugging Face model built from a config in code (nothing downloaded)."""

import pytest
import torch

import fused_canon as fc

transformers = pytest.importorskip("transformers")
from fused_canon.integrations.hf import hf_policy_loss  # noqa: E402


def tiny_model(tie_word_embeddings):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)
    return transformers.Qwen2ForCausalLM(config).float()


def sequences(batch_size=4, prompt=3, response=5, vocab=67):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch_size, prompt + response), generator=g)
    lengths = torch.tensor([5, 2, 4, 1])
    positions = torch.arange(prompt + response)
    response_mask = (positions >= prompt) & (positions < prompt + lengths[:, None])
    attention_mask = positions < prompt + lengths[:, None]
    return input_ids, attention_mask.long(), response_mask


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hf_policy_loss_equals_full_logits_path(tie_word_embeddings, backend):
    input_ids, attention_mask, response_mask = sequences()
    config = fc.LossConfig(entropy_coeff=0.01, temperature=0.9, advantage=fc.AdvantageConfig(estimator="canon"))
    kwargs = dict(rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]), config=config)

    fused_model = tiny_model(tie_word_embeddings)
    fused = hf_policy_loss(fused_model, input_ids, attention_mask, response_mask, backend=backend, **kwargs)
    fused.loss.backward()

    full_model = tiny_model(tie_word_embeddings)
    logits = full_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    reference = fc.policy_loss(logits, input_ids[:, 1:], response_mask[:, 1:], backend="torch", **kwargs)
    reference.loss.backward()

    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.logprobs, reference.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.entropy, reference.entropy, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(fused_model.named_parameters(), full_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_response_outside_attention_is_rejected():
    input_ids, attention_mask, response_mask = sequences()
    attention_mask[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask excludes"):
        hf_policy_loss(tiny_model(True), input_ids, attention_mask, response_mask, advantages=torch.ones(4))
