"""Tokenizers and models: a char-level tokenizer and tiny Qwen2 built in code, or a HF model; the
policy, the value model built from it, their inputs for a rollout batch, and their optimizer step."""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

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
        return [self.bos_id] + self._ids(text)

    def encode_response(self, text: str) -> List[int]:
        """A response as the policy generates it: the text's tokens, then <eos>."""
        return self._ids(text) + [self.eos_id]

    def _ids(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self.alphabet))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.alphabet!r}")
        return [self.ids[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= len(self.specials) and i < len(self.tokens))


class HFTokenizer:
    """The same members (encode, encode_response, decode, pad_id, eos_id) over a transformers tokenizer."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode_response(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]

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


class ValueModel(torch.nn.Module):
    """The policy's backbone (decoder) with a scalar head in place of the LM head: one value per position.

    The head starts as Open-Reasoner-Zero's (OpenRLHF's) does: no bias, weights ~ N(0, 1/(H+1)), so the
    first values are small, whatever the backbone; drawn from ``seed``, so every process builds the same."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, seed: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(hidden_size, 1, bias=False, dtype=next(backbone.parameters()).dtype)
        with torch.no_grad():
            self.value_head.weight.normal_(0.0, 1.0 / (hidden_size + 1), generator=torch.Generator().manual_seed(seed))

    def forward(self, **inputs) -> torch.Tensor:
        """Values [N, L] in fp32 for the model inputs (``model_inputs``)."""
        hidden = self.backbone(**inputs).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


def build_value_model(model_cfg: ModelConfig, tokenizer, seed: int) -> ValueModel:
    """The critic's network: ``build_model``'s (so the same tiny-char model, or the same HF weights)
    without its LM head, plus a freshly initialised scalar head."""
    policy = build_model(model_cfg, tokenizer, seed)
    return ValueModel(policy.get_decoder(), policy.config.get_text_config().hidden_size, seed)


def model_inputs(batch: Dict[str, torch.Tensor], rows: slice) -> Tuple[Dict[str, torch.Tensor], int]:
    """The model's keyword inputs for the prompt + response rows of a rollout batch, and the response
    width R: position L - R - 1 + t predicts (the policy) or values (the critic) response token t."""
    response_ids = batch["response_ids"][rows]
    attention_mask = torch.cat([batch["prompt_mask"][rows], batch["response_mask"][rows]], dim=1).long()
    # Prompts are left-padded: count positions from each row's first real token, as generate() does.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    inputs = dict(input_ids=torch.cat([batch["prompt_ids"][rows], response_ids], dim=1),
                  attention_mask=attention_mask, position_ids=position_ids)
    return inputs, response_ids.shape[1]


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim) -> torch.optim.Optimizer:
    """AdamW from an actor or critic config section (lr, betas, weight_decay)."""
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def clipped_optimizer_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the accumulated gradient to ``grad_clip`` and step; a non-finite gradient would poison Adam's
    moments, so that step is skipped. Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    if torch.isfinite(grad_norm):
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)
