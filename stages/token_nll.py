"""Token negative log-likelihoods of texts under a causal LM: the scoring behind the perplexity
stage (its module doc gives the conventions). Texts are tokenized with the tokenizer's default
special tokens; token i is predicted from tokens < i; texts longer than the context are cut into
windows (`token_windows`); windows are packed into padded forward passes within a row and a token
budget, longest first, and pad positions are never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Tokens per log-softmax chunk: bounds the float32 temporaries beside the logits.
_SOFTMAX_TOKENS = 1024


def token_windows(
    n_tokens: int, max_length: int, long_text: str = "truncate", stride: int = 0
) -> list[tuple[int, int, int]]:
    """The forward passes that score a text of `n_tokens` tokens: (begin, end, first scored)
    token positions per window, tokens [first scored, end) being scored from tokens [begin, i)."""
    if n_tokens < 2:
        return []
    if n_tokens <= max_length:
        return [(0, n_tokens, 1)]
    if long_text == "truncate":
        return [(0, max_length, 1)]
    stride = stride or max_length // 2
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be in [1, max_length - 1], got {stride} for {max_length}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        # stride < max_length makes prev_end > begin: every scored token has some context.
        windows.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _micro_batches(
    lengths: Sequence[int], batch_size: int, batch_tokens: int, sort_by_length: bool
) -> list[list[int]]:
    """Groups of item indices whose padded size (rows x longest) stays within the budgets."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length else None
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order if order is not None else range(len(lengths)):
        grown = max(longest, lengths[i])
        if current and (len(current) >= batch_size or grown * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


def score_token_ids(
    lm: Any,
    ids: Sequence[Sequence[int]],
    *,
    max_length: int,
    long_text: str = "truncate",
    stride: int = 0,
    batch_size: int = 256,
    batch_tokens: int = 512,
    sort_by_length: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of token NLLs in nats as float64, number of scored tokens as int64) per sequence.

    `lm` is a `stages.lm.LoadedLM`. Sequences of fewer than 2 tokens score nothing (0, 0).
    """
    import torch

    # One item per forward-pass window: (sequence, token ids, first scored position in the item).
    items: list[tuple[int, Sequence[int], int]] = []
    for row, seq in enumerate(ids):
        for begin, end, first in token_windows(len(seq), max_length, long_text, stride):
            items.append((row, seq[begin:end], first - begin))
    nll_sum = np.zeros(len(ids), dtype=np.float64)
    counts = np.zeros(len(ids), dtype=np.int64)
    if not items:
        return nll_sum, counts
    pad_id = lm.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    lengths = [len(it[1]) for it in items]
    for group in _micro_batches(lengths, batch_size, batch_tokens, sort_by_length):
        width = max(lengths[i] for i in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(group), width), dtype=torch.long)
        first = torch.empty(len(group), dtype=torch.long)
        for b, i in enumerate(group):
            input_ids[b, : lengths[i]] = torch.as_tensor(items[i][1], dtype=torch.long)
            attention[b, : lengths[i]] = 1
            first[b] = items[i][2]
        with torch.inference_mode():
            logits = lm.module(
                input_ids=input_ids.to(lm.device),
                attention_mask=attention.to(lm.device),
                use_cache=False,
            ).logits
            nll = _next_token_nll(logits, input_ids.to(lm.device)).cpu()
        # Target position j (1..width-1) is scored when it is a real token the window owns.
        pos = torch.arange(1, width).unsqueeze(0)
        scored = (pos >= first.unsqueeze(1)) & (attention[:, 1:] > 0)
        # where, not multiply: a pad position's logits may be anything, NaN included.
        sums = torch.where(scored, nll, torch.zeros_like(nll)).double().sum(dim=1).numpy()
        rows = np.array([items[i][0] for i in group])
        np.add.at(nll_sum, rows, sums)
        np.add.at(counts, rows, scored.sum(dim=1).numpy())
    return nll_sum, counts


def _next_token_nll(logits: Any, input_ids: Any) -> Any:
    """-log p(token j | tokens < j) for j = 1..T-1, float32, shape (B, T-1)."""
    import torch

    b, t, _ = logits.shape
    out = torch.empty((b, t - 1), dtype=torch.float32, device=logits.device)
    rows = max(1, _SOFTMAX_TOKENS // max(t - 1, 1))
    for r in range(0, b, rows):
        lg = logits[r : r + rows, :-1].float()
        target = input_ids[r : r + rows, 1:].unsqueeze(-1)
        out[r : r + rows] = torch.logsumexp(lg, dim=-1) - lg.gather(-1, target).squeeze(-1)
    return out


def tokenize(lm: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's default special tokens, never truncated."""
    if not texts:
        return []
    # verbose=False: texts longer than the model are expected here; long_text handles them.
    return lm.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
