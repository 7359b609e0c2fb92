"""ImageCheck and CaptionCheck on hand-built batches, run directly (no Ray)."""

from __future__ import annotations

import struct
import time
import zlib

import pyarrow as pa
import pytest
from crafted_images import encode, noise, png_chunk
from PIL import Image, ImageFile

from warren.stages.base import reason_key
from warren.stages.caption_check import CaptionCheck
from warren.stages.image_check import ImageCheck
from warren.stages.schema import REJECT_COLUMN, image_value, rows_to_table, validate

# ---------------------------------------------------------------------------------------------
# inputs


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (1-bit grayscale) with a few rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = (b"\x00" + bytes((width + 7) // 8)) * 4
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def corrupt_idat(png: bytes) -> bytes:
    """Flip bytes inside the first IDAT chunk's zlib data."""
    data = bytearray(png)
    start = png.index(b"IDAT") + 4
    for i in range(start + 8, start + 40):
        data[i] ^= 0x5A
    return bytes(data)


VALID_PNG = encode(noise(64, 48), "PNG")
VALID_JPEG = encode(noise(80, 60, seed=1), "JPEG", quality=90)
TRUNCATED_JPEG = VALID_JPEG[: len(VALID_JPEG) // 2]
CORRUPT_PNG = corrupt_idat(VALID_PNG)
BOMB_PNG = png_claiming(30_000, 30_000)  # 900M pixels, > 2x PIL's limit: PIL's error band
HUGE_BOMB_PNG = png_claiming(50_000, 50_000)  # 2.5G pixels
# 100M pixels: PIL's default limit would warn; under warren's 2**28 it is decoded (PIL's PNG
# decoder accepts a zlib stream that ends early, so this one decodes to a mostly black picture).
WARNING_BAND_PNG = png_claiming(10_000, 10_000)
ANIMATED_GIF = encode(
    Image.new("RGB", (20, 10), "red"),
    "GIF",
    save_all=True,
    append_images=[Image.new("RGB", (20, 10), c) for c in ("blue", "green")],
)
HTML = b"<html><head><title>404 Not Found</title></head><body>gone</body></html>"


def row(id_: str, *blobs: bytes | None, path: str | None = None, **extra) -> dict:
    return {"id": id_, "images": [image_value(b, path) for b in blobs], "caption": "c", **extra}


def run_image_check(rows: list[dict], **params) -> pa.Table:
    table = rows_to_table(rows)
    out = ImageCheck(**params).process(table)
    assert out.num_rows == table.num_rows
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    for name in table.column_names:  # input columns untouched, outputs only added
        if name != REJECT_COLUMN:
            assert out.column(name).equals(table.column(name)), name
    validate(out)
    return out


def reasons_of(table: pa.Table) -> dict[str, str | None]:
    ids = table.column("id").to_pylist()
    if REJECT_COLUMN not in table.column_names:
        return dict.fromkeys(ids)
    return dict(zip(ids, table.column(REJECT_COLUMN).to_pylist(), strict=True))


def keys_of(table: pa.Table) -> dict[str, str | None]:
    return {k: reason_key(r) if r else None for k, r in reasons_of(table).items()}


# ---------------------------------------------------------------------------------------------
# ImageCheck


def test_image_check_keeps_valid_images_and_names_each_failure():
    rows = [
        row("png", VALID_PNG),
        row("jpeg", VALID_JPEG),
        row("truncated", TRUNCATED_JPEG),
        row("zero", b""),
        row("null", None, path="missing.jpg"),
        row("html", HTML, path="photo.jpg"),
        row("bomb", BOMB_PNG),
        row("warning_band", WARNING_BAND_PNG),
        row("corrupt", CORRUPT_PNG),
        row("animated", ANIMATED_GIF),
        {"id": "no_image", "images": [], "caption": "c"},
        {"id": "null_images", "images": None, "caption": "c"},
    ]
    out = run_image_check(rows)
    assert keys_of(out) == {
        "png": None,
        "jpeg": None,
        "truncated": "image_check: truncated image",
        "zero": "image_check: empty image",
        "null": "image_check: empty image",
        "html": "image_check: not an image",
        "bomb": "image_check: too many pixels",
        "warning_band": None,  # under max_pixels: decoded, not rejected
        "corrupt": "image_check: corrupt image",
        "animated": None,  # not this stage's business unless asked
        "no_image": "image_check: no image",
        "null_images": "image_check: no image",
    }
    reasons = reasons_of(out)
    assert "HTML" in reasons["html"] and HTML[:16].hex() in reasons["html"]
    assert reasons["bomb"] == (
        "image_check: too many pixels (30000x30000 = 900000000 pixels > max_pixels 268435456, "
        "set by --image_check.max_pixels)"
    )
    assert "missing.jpg" in reasons["null"]

    sizes = dict(
        zip(
            out.column("id").to_pylist(),
            zip(out.column("width").to_pylist(), out.column("height").to_pylist(), strict=True),
            strict=True,
        )
    )
    assert sizes == {
        "png": (64, 48),
        "jpeg": (80, 60),
        "truncated": (None, None),
        "zero": (None, None),
        "null": (None, None),
        "html": (None, None),
        "bomb": (None, None),
        "warning_band": (10_000, 10_000),
        "corrupt": (None, None),
        "animated": (20, 10),
        "no_image": (None, None),
        "null_images": (None, None),
    }
    assert out.schema.field("width").type == pa.int32()
    assert out.schema.field("height").type == pa.int32()


def test_image_check_reads_the_format_from_bytes_not_the_extension():
    out = run_image_check(
        [
            row("png_named_jpg", VALID_PNG, path="a.jpg"),
            row("jpeg_named_png", VALID_JPEG, path="b.png"),
            row("text_named_png", b"just some text, not pixels", path="c.png"),
            row("pdf_named_jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", path="d.jpg"),
        ]
    )
    reasons = reasons_of(out)
    assert reasons["png_named_jpg"] is None and reasons["jpeg_named_png"] is None
    assert reasons["text_named_png"].startswith("image_check: not an image (text, starts with ")
    assert reasons["pdf_named_jpg"].startswith("image_check: not an image (PDF, ")


def test_decompression_bomb_is_rejected_from_its_header_without_decoding(monkeypatch):
    original_load = ImageFile.ImageFile.load
    decoded: list[tuple[int, int]] = []

    def guarded_load(self):
        decoded.append(self.size)
        if self.size[0] * self.size[1] > 2**28:
            raise AssertionError(f"decoded a {self.size} bomb")
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    start = time.perf_counter()
    out = run_image_check([row("bomb", BOMB_PNG), row("huge", HUGE_BOMB_PNG), row("ok", VALID_PNG)])
    elapsed = time.perf_counter() - start
    assert keys_of(out) == {
        "bomb": "image_check: too many pixels",
        "huge": "image_check: too many pixels",
        "ok": None,
    }
    assert reasons_of(out)["huge"] == (
        "image_check: too many pixels (50000x50000 = 2500000000 pixels > max_pixels 268435456, "
        "set by --image_check.max_pixels)"
    )
    assert set(decoded) == {(64, 48)}  # only the valid image reached PIL's decoder
    assert elapsed < 0.5


def test_max_pixels_is_the_limit_in_both_directions(monkeypatch):
    # Lower than PIL's default: the 64x48 PNG (3072 pixels) and the 80x60 JPEG (4800 pixels) are
    # both too large for 3000; 4000 keeps the PNG only.
    out = run_image_check([row("png", VALID_PNG), row("jpeg", VALID_JPEG)], max_pixels=3000)
    assert keys_of(out) == {
        "png": "image_check: too many pixels",
        "jpeg": "image_check: too many pixels",
    }
    out = run_image_check([row("png", VALID_PNG), row("jpeg", VALID_JPEG)], max_pixels=4000)
    assert keys_of(out) == {"png": None, "jpeg": "image_check: too many pixels"}
    assert out.column("width").to_pylist() == [64, None]

    # Higher than PIL's default: a 15000x15000 header passes the size check and goes on to be
    # decoded (the decode is stubbed here so the test does not allocate 225M pixels).
    def stub_load(self):
        raise OSError("decode stubbed by the test")

    monkeypatch.setattr(ImageFile.ImageFile, "load", stub_load)
    big = png_claiming(15_000, 15_000)
    out = run_image_check([row("big", big)], max_pixels=300_000_000)
    assert reasons_of(out)["big"] == "image_check: corrupt image (decode stubbed by the test)"
    out = run_image_check([row("bigger", png_claiming(20_000, 20_000))])  # 400M > 2**28
    assert keys_of(out)["bigger"] == "image_check: too many pixels"


def test_pil_global_settings_are_restored_after_a_batch():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        out = run_image_check([row("truncated", TRUNCATED_JPEG)], max_pixels=1_000_000)
        # Truncated files are refused even when the process had allowed them.
        assert keys_of(out) == {"truncated": "image_check: truncated image"}
        assert Image.MAX_IMAGE_PIXELS == before[0]
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before[1]


def test_animated_images_are_rejected_only_when_not_allowed():
    out = run_image_check(
        [row("animated", ANIMATED_GIF), row("still", VALID_PNG)], allow_animated=False
    )
    reasons = reasons_of(out)
    assert reasons == {
        "animated": "image_check: animated image (GIF, 3 frames)",
        "still": None,
    }
    assert out.column("width").to_pylist() == [20, 64]  # decodable, so its size is known


def test_rows_without_images_pass_when_images_are_not_required():
    out = run_image_check(
        [{"id": "text_only", "images": [], "caption": "c"}, row("png", VALID_PNG)],
        require_image=False,
    )
    assert keys_of(out) == {"text_only": None, "png": None}
    assert out.column("width").to_pylist() == [None, 64]


def test_min_side_rejects_images_with_a_short_side():
    tiny = encode(Image.new("RGB", (3, 40), "white"), "PNG")
    out = run_image_check([row("tiny", tiny), row("png", VALID_PNG)], min_side=4)
    assert reasons_of(out) == {
        "tiny": "image_check: too small (3x40, shorter side < min_side 4)",
        "png": None,
    }
    assert out.column("width").to_pylist() == [3, 64]


def test_multi_image_rows_report_the_first_failing_image_by_index():
    out = run_image_check(
        [
            row("second_bad", VALID_PNG, TRUNCATED_JPEG, HTML),
            row("first_bad", b"", VALID_PNG),
            row("all_good", VALID_JPEG, VALID_PNG),
        ]
    )
    reasons = reasons_of(out)
    assert reasons["second_bad"].startswith("image_check: truncated image (image 2 of 3: ")
    assert reasons["first_bad"] == "image_check: empty image (image 1 of 2: 0 bytes)"
    assert reasons["all_good"] is None
    # width/height describe the first image, whatever happened to the others.
    assert out.column("width").to_pylist() == [64, None, 80]
    assert out.column("height").to_pylist() == [48, None, 60]


def test_image_check_keeps_an_earlier_reason_and_replaces_old_sizes():
    table = rows_to_table(
        [
            row("earlier", HTML, **{REJECT_COLUMN: "reader: bad row (x)"}, width=1, height=1),
            row("png", VALID_PNG, width=999, height=999),
        ]
    )
    out = ImageCheck().process(table)
    assert out.column_names.count("width") == 1
    assert reasons_of(out) == {"earlier": "reader: bad row (x)", "png": None}
    assert out.column("width").to_pylist() == [None, 64]


def test_image_check_handles_sliced_and_chunked_batches():
    table = rows_to_table([row(str(i), VALID_PNG if i % 2 else b"") for i in range(6)])
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 3), table.slice(5)])
    out = ImageCheck().process(chunked.slice(1, 4))
    assert out.column("id").to_pylist() == ["1", "2", "3", "4"]
    assert keys_of(out) == {
        "1": None,
        "2": "image_check: empty image",
        "3": None,
        "4": "image_check: empty image",
    }
    assert out.column("width").to_pylist() == [64, None, 64, None]


def test_image_check_on_an_empty_batch_adds_its_columns():
    out = ImageCheck().process(rows_to_table([]))
    assert out.num_rows == 0
    assert out.schema.field("width").type == pa.int32()


def test_image_check_refuses_impossible_params():
    with pytest.raises(ValueError, match="max_pixels"):
        ImageCheck(max_pixels=0)


# ---------------------------------------------------------------------------------------------
# CaptionCheck


def caption_rows(captions: dict[str, str | None], **extra) -> list[dict]:
    return [{"id": k, "caption": v, **extra} for k, v in captions.items()]


def test_caption_check_names_each_failure():
    table = rows_to_table(
        caption_rows(
            {
                "good": "A dog runs on the beach.",
                "null": None,
                "empty": "",
                "blank": " \t\n ",
                "long": "x" * 10_001,
                "at_max": "y" * 10_000,
                "one_char": "z",
            }
        )
    )
    out = CaptionCheck().process(table)
    assert out.num_rows == table.num_rows
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    assert reasons_of(out) == {
        "good": None,
        "null": "caption_check: missing caption",
        "empty": "caption_check: empty caption",
        "blank": "caption_check: empty caption",
        "long": "caption_check: caption too long (10001 chars > max_chars 10000)",
        "at_max": None,
        "one_char": None,
    }


def test_caption_lengths_count_characters_of_the_trimmed_caption():
    table = rows_to_table(
        caption_rows({"padded": "   ab   ", "accents": "héllo wörld", "emoji": "🐶🐶🐶"})
    )
    out = CaptionCheck(min_chars=3, max_chars=10).process(table)
    assert reasons_of(out) == {
        "padded": "caption_check: caption too short (2 chars < min_chars 3)",
        "accents": "caption_check: caption too long (11 chars > max_chars 10)",
        "emoji": None,
    }


def test_caption_check_leaves_a_clean_batch_unchanged():
    table = rows_to_table(caption_rows({"a": "fine", "b": "also fine"}))
    assert CaptionCheck().process(table).equals(table)


def test_instruction_rows_need_no_caption_when_captions_are_not_required():
    turns = [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."},
    ]
    rows = [
        {"id": "conv_null", "caption": None, "conversations": turns},
        {"id": "conv_empty", "caption": " ", "conversations": turns},
        {"id": "conv_long", "caption": "x" * 20, "conversations": turns},
        {"id": "caption_row_null", "caption": None},
        {"id": "no_turns_null", "caption": None, "conversations": []},
        {"id": "caption_row_good", "caption": "A cat on a mat."},
    ]
    table = rows_to_table(rows)
    relaxed = CaptionCheck(require_caption=False, max_chars=10).process(table)
    assert reasons_of(relaxed) == {
        "conv_null": None,
        "conv_empty": None,
        "conv_long": "caption_check: caption too long (20 chars > max_chars 10)",
        "caption_row_null": "caption_check: missing caption",
        "no_turns_null": "caption_check: missing caption",
        "caption_row_good": "caption_check: caption too long (15 chars > max_chars 10)",
    }
    strict = CaptionCheck().process(table)
    assert keys_of(strict) == {
        "conv_null": "caption_check: missing caption",
        "conv_empty": "caption_check: empty caption",
        "conv_long": None,
        "caption_row_null": "caption_check: missing caption",
        "no_turns_null": "caption_check: missing caption",
        "caption_row_good": None,
    }


def test_caption_check_refuses_impossible_params():
    with pytest.raises(ValueError, match="max_chars"):
        CaptionCheck(min_chars=10, max_chars=5)
