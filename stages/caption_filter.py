"""Reject rows whose caption is cheap-to-spot junk: too few or too many words or characters,
stock-photo credits, file names, URLs and placeholders, and repetitive text.

Rules, in the order they are checked (a row reports the first one it breaks; a threshold value
itself always passes; 0 turns a rule off):

- no caption: a null or whitespace-only caption is rejected, `caption_filter: no caption` (or
  `no caption (blank)`), unless the row has conversations: instruction rows carry their text in
  their turns, which these caption rules (tuned on alt-text) do not judge; such rows pass with null
  scores. A row with both a caption and conversations has its caption checked.
- `boilerplate`: a list of regular expressions searched case-insensitively in the caption; the
  first pattern of the list that matches rejects the row and is written to `boilerplate_pattern`
  (checked before the length rules: "IMG_1234.jpg" is better explained as a file name than as a
  one-word caption):
  `boilerplate (pattern '\\bshutterstock' matched 'Shutterstock')`. The default list
  (`DEFAULT_BOILERPLATE`) covers stock-photo credits (Shutterstock, Getty Images, Alamy, iStock,
  Dreamstime, 123RF, Depositphotos, "stock photo", "royalty free", "©", "(c) Name", "all rights
  reserved"), file names as captions ("IMG_1234.jpg", "DSC01234", "image.png"), URLs as captions,
  and placeholders ("click to enlarge", "no description", "untitled", "image", "thumbnail").
  Patterns are matched by Arrow's RE2 engine (vectorised), so they must use the syntax RE2 and
  Python's `re` share: no look-arounds or back-references (checked when the stage is built).
- `min_words` (3) / `max_words` (off): words are whitespace-separated tokens, as DataComp counts
  them (`len(text.split())`; its basic filter keeps captions of more than 2 words).
  `too few words (caption_words 2 < min_words 3)`, `too many words (... > max_words ...)`.
- `min_chars` (6) / `max_chars` (off): Unicode characters of the caption with leading and trailing
  whitespace removed (DataComp keeps captions of more than 5 characters).
  `too short (caption_chars 5 < min_chars 6)`, `too long (... > max_chars ...)`.
- `max_char_rep_ratio` (0.5) with `char_rep_len` (10): Data-Juicer's `character_repetition_filter`
  (data_juicer/ops/filter/character_repetition_filter.py): take every character n-gram of the raw
  caption (n = char_rep_len), count each distinct n-gram; with D distinct n-grams of which R occur
  more than once, sum the counts of the min(floor(sqrt(D)), R) most frequent n-grams and divide
  by the number of n-grams. 0 when the caption has no n-gram. `repeated characters
  (char_rep_ratio 0.62 > max_char_rep_ratio 0.5)`.
- `max_word_rep_ratio` (0.5) with `word_rep_len` (10): Data-Juicer's `word_repetition_filter`:
  words are the caption split on whitespace, lower-cased, with non-letter characters (punctuation,
  digits, symbols, emoji) stripped from both ends and empty words dropped; take every word n-gram
  (n = word_rep_len) and divide the count of n-gram occurrences whose n-gram occurs more than once
  by the number of n-grams. 0 when there is no n-gram. Data-Juicer splits on space, tab and
  newline and strips a fixed character list; splitting on any whitespace and stripping by Unicode
  category is the same on ordinary text. `repeated words (word_rep_ratio 0.62 > max_word_rep_ratio
  0.5)`.

Score columns (null for rows without a caption): `caption_words` (int32), `caption_chars`
(int32), `char_rep_ratio` (float32), `word_rep_ratio` (float32), `boilerplate_pattern` (string,
the first matching pattern, null if none).
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warren.stages.base import BatchStage, beyond, param, put_columns, reject

RULE = "caption_filter"
_NULL_INT = pa.scalar(None, pa.int32())
# RE2's \s is ASCII only; with \pZ and the remaining controls this is Python's str.isspace().
_WORD = r"[^\s\pZ\x0b\x1c-\x1f\x85]+"
# str.strip in C handles the common case; other non-letters go through Unicode categories.
_ASCII_NON_LETTERS = string.punctuation + string.digits + string.whitespace

# Searched case-insensitively, first match wins; the order puts the most specific patterns first so
# the reason names the clearest one.
DEFAULT_BOILERPLATE: list[str] = [
    # stock-photo credits and copyright lines
    r"\bshutterstock",
    r"\bgetty\s*images\b",
    r"\balamy\b",
    r"\bistock(?:photo)?",
    r"\bdreamstime",
    r"\b123rf",
    r"\bdepositphotos",
    r"\bstock\s+(?:photo|photograph|image|picture|footage|vector|illustration)s?\b",
    r"\broyalty[\s-]*free\b",
    r"\ball rights reserved\b",
    r"©",
    # "(c) Jane Doe", "(C) 2019 Acme": a capital or a year after it, not "(c) the third option"
    r"\(c\)\s*(?-i:[A-Z0-9])",
    # file names: camera names (IMG_1234, DSC01234, DSCN0042, PXL_2021..., GOPR0001) and any
    # name with an image extension
    r"\b(?:img|dsc[nf]?|dcim|gopr|pxl|mvimg|screenshot)[\s_-]?\d{3,}",
    r"[\w\-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif|svg)\b",
    # a URL or a bare domain as the whole caption
    r"^\s*(?:https?://|www\.)\S*\s*$",
    r"^\s*[\w\-]+(?:\.[\w\-]+)*\.(?:com|net|org|io|co|uk|de|fr|ru|jp|cn|info|biz)(?:/\S*)?\s*$",
    # placeholders
    r"\b(?:click|tap)\s+(?:here\s+)?(?:to|for)\s+(?:enlarge|zoom|view|see|open)",
    r"\bview\s+(?:larger|full[\s-]*size)\b",
    r"^\W*(?:no|without)\s+(?:description|caption|alt(?:\s+text)?|title|image)"
    r"(?:\s+available)?\W*$",
    r"^\W*(?:image|photo|picture)\s+(?:not\s+(?:found|available)|unavailable|coming\s+soon)\W*$",
    r"^\W*untitled(?:[\s_-]*\d+)?\W*$",
    r"^\W*(?:image|img|photo|picture|pic|thumbnail|thumb|placeholder|default|null|none|undefined"
    r"|n/?a|alt|logo|icon|banner|spacer|blank|loading)(?:[\s_-]*\d+)?\W*$",
]


@dataclasses.dataclass(frozen=True)
class CaptionFilterParams:
    min_words: int = param(
        3,
        "Reject captions with fewer whitespace-separated words; exactly this many pass "
        "(DataComp basic filtering keeps more than 2 words). 0 = off.",
        threshold="min",
        column="caption_words",
        off=0,
    )
    max_words: int = param(
        0,
        "Reject captions with more whitespace-separated words; exactly this many pass. 0 = off.",
        threshold="max",
        column="caption_words",
        off=0,
    )
    min_chars: int = param(
        6,
        "Reject captions with fewer characters (whitespace-trimmed); exactly this many pass "
        "(DataComp basic filtering keeps more than 5). 0 = off.",
        threshold="min",
        column="caption_chars",
        off=0,
    )
    max_chars: int = param(
        0,
        "Reject captions with more characters (whitespace-trimmed); exactly this many pass. "
        "0 = off.",
        threshold="max",
        column="caption_chars",
        off=0,
    )
    boilerplate: list[str] = param(
        DEFAULT_BOILERPLATE,
        "Regular expressions (RE2/Python common syntax) searched case-insensitively in the "
        "caption; the first that matches rejects the row. [] = off.",
    )
    char_rep_len: int = param(10, "Character n-gram length of char_rep_ratio (Data-Juicer: 10).")
    max_char_rep_ratio: float = param(
        0.5,
        "Reject captions whose char_rep_ratio (Data-Juicer's character_repetition_filter) is "
        "above this; exactly this ratio passes (Data-Juicer's default max_ratio). 0 = off.",
        threshold="max",
        column="char_rep_ratio",
        off=0,
    )
    word_rep_len: int = param(10, "Word n-gram length of word_rep_ratio (Data-Juicer: 10).")
    max_word_rep_ratio: float = param(
        0.5,
        "Reject captions whose word_rep_ratio (Data-Juicer's word_repetition_filter) is above "
        "this; exactly this ratio passes (Data-Juicer's default max_ratio). 0 = off.",
        threshold="max",
        column="word_rep_ratio",
        off=0,
    )


class CaptionFilter(BatchStage):
    """Reject short, long, boilerplate and repetitive captions, with their scores."""

    name = "caption_filter"
    version = "1"
    Params = CaptionFilterParams
    adds = (
        "caption_words",
        "caption_chars",
        "char_rep_ratio",
        "word_rep_ratio",
        "boilerplate_pattern",
    )

    def check_params(self) -> None:
        p = self.params
        for field in ("min_words", "max_words", "min_chars", "max_chars"):
            if getattr(p, field) < 0:
                raise ValueError(f"{self.name}: {field} must be >= 0, got {getattr(p, field)}")
        if p.max_words and p.max_words < p.min_words:
            raise ValueError(f"{self.name}: max_words ({p.max_words}) < min_words ({p.min_words})")
        if p.max_chars and p.max_chars < p.min_chars:
            raise ValueError(f"{self.name}: max_chars ({p.max_chars}) < min_chars ({p.min_chars})")
        for field in ("char_rep_len", "word_rep_len"):
            if getattr(p, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(p, field)}")
        for field in ("max_char_rep_ratio", "max_word_rep_ratio"):
            if not 0 <= getattr(p, field) <= 1:
                raise ValueError(
                    f"{self.name}: {field} must be in [0, 1] (0 = off), got {getattr(p, field)}"
                )
        if isinstance(p.boilerplate, str) or not all(isinstance(x, str) for x in p.boilerplate):
            raise ValueError(f"{self.name}: boilerplate must be a list of regular expressions")
        probe = pa.array(["probe"])
        for pattern in p.boilerplate:
            try:
                re.compile(pattern, re.IGNORECASE)
                pc.match_substring_regex(probe, pattern, ignore_case=True)
            except (re.error, pa.ArrowInvalid) as exc:
                raise ValueError(
                    f"{self.name}: boilerplate pattern {pattern!r} is not a regular expression "
                    f"both RE2 and Python accept ({exc})"
                ) from exc

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        n = batch.num_rows
        caption = batch.column("caption").combine_chunks()
        turns = pc.fill_null(pc.list_value_length(batch.column("conversations")), 0)
        has_turns = pc.greater(turns, 0).to_numpy(zero_copy_only=False)
        trimmed = pc.utf8_trim_whitespace(caption)
        chars = pc.utf8_length(trimmed)
        # Runs of non-whitespace, as str.split() sees words (Arrow's split_whitespace would count
        # the empty strings between consecutive spaces).
        words = pc.count_substring_regex(caption, _WORD)
        null = pc.is_null(caption).to_numpy(zero_copy_only=False)
        blank = pc.fill_null(pc.equal(chars, 0), False).to_numpy(zero_copy_only=False)
        # Rows without text to judge: instruction rows pass, the rest are rejected below.
        checked = ~(null | blank)
        chars_np = pc.fill_null(chars, 0).to_numpy(zero_copy_only=False)
        words_np = pc.fill_null(words, 0).to_numpy(zero_copy_only=False)

        pattern_idx = np.full(n, -1, dtype=np.int64)
        for i, pattern in enumerate(p.boilerplate):
            hit = pc.fill_null(pc.match_substring_regex(caption, pattern, ignore_case=True), False)
            hit = hit.to_numpy(zero_copy_only=False) & (pattern_idx < 0) & checked
            pattern_idx[hit] = i

        texts = caption.to_pylist()
        char_rep: list[float | None] = [None] * n
        word_rep: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        for row in range(n):
            if not checked[row]:
                if not has_turns[row]:
                    reasons[row] = f"{RULE}: no caption" + ("" if null[row] else " (blank)")
                continue
            text = texts[row]
            # Fewer than two n-grams cannot repeat: skip the counting (most captions, for words).
            char_rep[row] = (
                char_rep_ratio(text, p.char_rep_len) if len(text) > p.char_rep_len else 0.0
            )
            word_rep[row] = (
                word_rep_ratio(text, p.word_rep_len) if words_np[row] > p.word_rep_len else 0.0
            )
            reasons[row] = self._reason(
                int(words_np[row]),
                int(chars_np[row]),
                int(pattern_idx[row]),
                text,
                char_rep[row],
                word_rep[row],
            )

        patterns = [p.boilerplate[i] if i >= 0 else None for i in pattern_idx]
        valid = pa.array(checked)
        out = put_columns(
            batch,
            {
                "caption_words": pc.if_else(valid, words.cast(pa.int32()), _NULL_INT),
                "caption_chars": pc.if_else(valid, chars.cast(pa.int32()), _NULL_INT),
                "char_rep_ratio": pa.array(char_rep, type=pa.float32()),
                "word_rep_ratio": pa.array(word_rep, type=pa.float32()),
                "boilerplate_pattern": pa.array(patterns, type=pa.string()),
            },
        )
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out

    def _reason(
        self,
        words: int,
        chars: int,
        pattern_idx: int,
        text: str,
        char_rep: float,
        word_rep: float,
    ) -> str | None:
        p = self.params
        if pattern_idx >= 0:
            pattern = p.boilerplate[pattern_idx]
            # RE2 decided; Python's re finds the text to show (the shared syntax means the same).
            found = re.search(pattern, text, re.IGNORECASE)
            matched = f" matched '{found.group(0).strip()[:60]}'" if found else ""
            return f"{RULE}: boilerplate (pattern '{pattern}'{matched})"
        if p.min_words and words < p.min_words:
            return f"{RULE}: too few words (caption_words {words} < min_words {p.min_words})"
        if p.max_words and words > p.max_words:
            return f"{RULE}: too many words (caption_words {words} > max_words {p.max_words})"
        if p.min_chars and chars < p.min_chars:
            return f"{RULE}: too short (caption_chars {chars} < min_chars {p.min_chars})"
        if p.max_chars and chars > p.max_chars:
            return f"{RULE}: too long (caption_chars {chars} > max_chars {p.max_chars})"
        if p.max_char_rep_ratio and char_rep > p.max_char_rep_ratio:
            return (
                f"{RULE}: repeated characters (char_rep_ratio "
                f"{beyond(char_rep, p.max_char_rep_ratio)} > max_char_rep_ratio "
                f"{p.max_char_rep_ratio:g})"
            )
        if p.max_word_rep_ratio and word_rep > p.max_word_rep_ratio:
            return (
                f"{RULE}: repeated words (word_rep_ratio "
                f"{beyond(word_rep, p.max_word_rep_ratio)} > max_word_rep_ratio "
                f"{p.max_word_rep_ratio:g})"
            )
        return None


def char_rep_ratio(text: str, n: int = 10) -> float:
    """Data-Juicer's character repetition ratio of `text` (see the module doc)."""
    total = len(text) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter([text[i : i + n] for i in range(total)])
    if len(counts) == total:  # nothing repeats: most captions stop here
        return 0.0
    freqs = sorted(counts.values(), reverse=True)
    repeated = sum(1 for f in freqs if f > 1)
    top = min(math.isqrt(len(freqs)), repeated)
    return sum(freqs[:top]) / total


def word_rep_ratio(text: str, n: int = 10) -> float:
    """Data-Juicer's word repetition ratio of `text` (see the module doc)."""
    words = refined_words(text)
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(total))
    return sum(f for f in counts.values() if f > 1) / total


def refined_words(text: str) -> list[str]:
    """Words as Data-Juicer's word filters see them: lower-cased, non-letters stripped at both
    ends, empty ones dropped."""
    words = [w.strip(_ASCII_NON_LETTERS) for w in text.lower().split()]
    words = [w if w[:1].isalpha() and w[-1:].isalpha() else _strip_non_letters(w) for w in words]
    return [w for w in words if w]


def _strip_non_letters(word: str) -> str:
    # Letters and combining marks (accents, Indic vowel signs) belong to words; punctuation,
    # digits, symbols (emoji among them), separators and controls are stripped.
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start])[0] not in "LM":
        start += 1
    while end > start and unicodedata.category(word[end - 1])[0] not in "LM":
        end -= 1
    return word[start:end]
