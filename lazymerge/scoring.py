"""Scoring preference pairs with a reward model: the accuracy RewardBench reports.

A pair counts as correct when the chosen response scores strictly higher than the rejected one.
Each (prompt, response) is formatted with the tokenizer's chat template when it has one (a user
turn, then an assistant turn, as RewardBench does); otherwise the text is `prompt + "\\n" +
response` tokenized with the tokenizer's special tokens (BOS). The score is the model's first
logit (`LlamaForSequenceClassification` and other `*ForSequenceClassification` reward models).

Texts are tokenized once per search (`encode_pairs`) and scored in batches, right-padded with the
config's pad token; without a pad token the batch size is 1. The texts are sorted by length so a
batch holds similar lengths (less padding), and put back in order afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lazymerge.errors import EvalDataError
from lazymerge.pairs import Pair

__all__ = ["Accuracy", "EncodedPairs", "accuracy", "encode_pairs", "format_text", "score_texts"]


def format_text(tokenizer: Any, prompt: str, response: str) -> tuple[str, bool]:
    """The text a (prompt, response) is scored as, and whether it already holds special tokens."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    return f"{prompt}\n{response}", False


@dataclass
class EncodedPairs:
    """Token ids of each pair's chosen (`ids[2 * i]`) and rejected (`ids[2 * i + 1]`) text."""

    pairs: list[Pair]
    ids: list[list[int]]


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], max_length: int | None = None) -> EncodedPairs:
    """Tokenize every pair's two texts once (a search scores them with every weight).

    Raises:
        EvalDataError: a text tokenizes to nothing.
    """
    if tokenizer is None:
        raise EvalDataError("the merged model has no tokenizer to score text with", hint="merge models with one")
    ids: list[list[int]] = []
    for i, p in enumerate(pairs):
        for response in (p.chosen, p.rejected):
            text, templated = format_text(tokenizer, p.prompt, response)
            tokens = tokenizer(text, add_special_tokens=not templated)["input_ids"]
            if max_length is not None:
                tokens = tokens[:max_length]  # truncated on the right, as transformers does by default
            if not tokens:
                raise EvalDataError(f"pair {i}: a text tokenizes to no token")
            ids.append(list(tokens))
    return EncodedPairs(list(pairs), ids)


@torch.no_grad()
def score_texts(model: Any, ids: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
    """The reward (first logit, as fp32) of each token sequence, in the given order."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        batch_size = 1  # the model finds each sequence's last token by the pad id: without one, no padding
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    scores = torch.empty(len(ids), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, : len(ids[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        scores[batch] = logits[:, 0].float().cpu()
    return scores


@dataclass
class Accuracy:
    """Pairs where chosen scored higher than rejected, overall and per subset."""

    correct: int
    pairs: int
    subsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # subset -> (correct, pairs)

    @property
    def value(self) -> float:
        return self.correct / self.pairs if self.pairs else 0.0

    def subset_values(self) -> dict[str, float]:
        return {k: c / n for k, (c, n) in sorted(self.subsets.items())}


def accuracy(pairs: Sequence[Pair], scores: torch.Tensor) -> Accuracy:
    """Accuracy of `scores` (chosen, rejected interleaved, as `encode_pairs` lays them out)."""
    wins = (scores[0::2] > scores[1::2]).tolist()
    result = Accuracy(sum(wins), len(pairs))
    for p, win in zip(pairs, wins, strict=True):
        if p.subset:
            c, n = result.subsets.get(p.subset, (0, 0))
            result.subsets[p.subset] = (c + int(win), n + 1)
    return result
