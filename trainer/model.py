"""Tokenizers and policy models: a char-level tokenizer and tiny Qwen2 built in code, or a HF model."""

from __future__ import annotations

from typing import List, Sequence

import torch

from .config import ModelConfig

TINY_CHAR = "tiny-char"


class CharTokenizer:
    """One token per character of ``alphabet`` plus <pad>, <bos>, <eos>. Plain Python, so it pickles
    into Ray actors and its vocabulary is fixed by the alphabet alone."""

    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str):
        self.alphabet = "".join(sorted(set(alphabet)))
        self.tokens = list(self.specials) + list(self.alphabet)
        self.ids = {tok: i for i, tok in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self.alphabet))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.alphabet!r}")
        return [self.bos_id] + [self.ids[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= len(self.specials) and i < len(self.tokens))


class HFTokenizer:
    """The same four members (encode, decode, pad_id, eos_id) over a transformers tokenizer."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def build_tokenizer(model_cfg: ModelConfig, alphabet: str):
    return CharTokenizer(alphabet) if model_cfg.path == TINY_CHAR else HFTokenizer(model_cfg.path)


def build_model(model_cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """The policy network. Every process builds it the same way; the rollout engines then receive
    the learner's weights, so their initialisation never matters."""
    dtype = getattr(torch, model_cfg.dtype)  # one of config.DTYPES
    if model_cfg.path != TINY_CHAR:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=tokenizer.vocab_size,  # exact: no padded ids that could be sampled
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        head_dim=model_cfg.hidden_size // model_cfg.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
