"""ImageFilter on crafted images, run directly (no Ray): every rule at, just below and just above
its threshold, bombs, animations, blank images against real photos, multi-image rows."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
from crafted_images import encode, noise, png_chunk
from PIL import Image, ImageDraw, ImageFile

from warren.stages.image_check import ImageCheck
from warren.stages.image_filter import ImageFilter
from warren.stages.schema import REJECT_COLUMN, image_value, rows_to_table

# ---------------------------------------------------------------------------------------------
# inputs


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    return encode(noise(width, height, seed))


def png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims width x height (1-bit grey) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 8))
        + png_chunk(b"IEND", b"")
    )


def flat_jpeg(colour: tuple[int, int, int], seed: int = 0) -> bytes:
    """A flat colour with sensor-like noise, saved as a mediocre JPEG: blank by any measure."""
    rng = np.random.default_rng(seed)
    pixels = np.full((300, 400, 3), colour, np.float32) + rng.normal(0, 4, (300, 400, 3))
    return encode(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), "JPEG", quality=60)


def white_wall_with_detail() -> bytes:
    """A white wall lit from one side (shading) with a picture frame and a switch on it."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:400, 0:600]
    wall = 225 + 25 * (x / 600) - 10 * (y / 400) + rng.normal(0, 2, (400, 600))
    pixels = np.repeat(np.clip(wall, 0, 255)[..., None], 3, axis=2).astype(np.uint8)
    pixels[120:260, 240:360] = (90, 60, 40)
    pixels[140:240, 260:340] = (180, 190, 200)
    pixels[200:230, 480:500] = (240, 240, 235)
    return encode(Image.fromarray(pixels), "JPEG", quality=85)


def line_drawing() -> bytes:
    """Clip art: a few black strokes on white (about 5% ink), the sparsest real picture."""
    img = Image.new("RGB", (300, 300), "white")
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 60, 240, 240), outline="black", width=4)
    draw.line((60, 150, 240, 150), fill="black", width=4)
    draw.line((150, 60, 150, 240), fill="black", width=4)
    return encode(img, "JPEG", quality=85)


def share_white(white: int, total: int = 400) -> bytes:
    """A 20x20 PNG (no reduction) with `white` white pixels and the rest black."""
    pixels = np.zeros(total, np.uint8)
    pixels[:white] = 255
    return encode(Image.fromarray(pixels.reshape(20, 20)).convert("RGB"))


def frames(fmt: str, n: int, size: tuple[int, int] = (220, 220), **save: object) -> bytes:
    images = [noise(*size, seed=i) for i in range(n)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], **save)


def row(id_: str, *blobs: bytes | None, **extra) -> dict:
    return {"id": id_, "images": [image_value(b) for b in blobs], "caption": "c", **extra}


def run(rows: list[dict], **params) -> pa.Table:
    return ImageFilter(**params).process(rows_to_table(rows))


def reasons(table: pa.Table) -> dict[str, str | None]:
    if REJECT_COLUMN not in table.column_names:
        return dict.fromkeys(table.column("id").to_pylist())
    return dict(
        zip(table.column("id").to_pylist(), table.column(REJECT_COLUMN).to_pylist(), strict=True)
    )


def scores(table: pa.Table, column: str) -> dict[str, object]:
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))


# The blank rule is off where a test is about another rule and uses noise images anyway.
NO_BLANK = {"max_blank_share": 0.0}

# ---------------------------------------------------------------------------------------------
# every header rule at, just below and just above its threshold

THRESHOLD_CASES = [
    # (params, size in, expected reason or None)
    ({}, (200, 200), None),
    ({}, (199, 250), "image_filter: too small (width 199 < min_width 200)"),
    ({}, (201, 250), None),
    ({}, (250, 199), "image_filter: too small (height 199 < min_height 200)"),
    ({"max_width": 300}, (300, 250), None),
    ({"max_width": 300}, (301, 250), "image_filter: too large (width 301 > max_width 300)"),
    ({"max_width": 300}, (299, 250), None),
    ({"max_height": 300}, (250, 300), None),
    ({"max_height": 300}, (250, 301), "image_filter: too large (height 301 > max_height 300)"),
    ({}, (600, 200), None),
    (
        {},
        (601, 200),
        "image_filter: extreme aspect ratio (aspect_ratio 3.005 > max_aspect_ratio 3)",
    ),
    ({}, (599, 200), None),
    (
        {},
        (200, 601),
        "image_filter: extreme aspect ratio (aspect_ratio 3.005 > max_aspect_ratio 3)",
    ),
    ({"max_aspect_ratio": 0.0}, (900, 200), None),
    ({"max_pixels": 40_000}, (200, 200), None),
    (
        {"max_pixels": 39_999},
        (200, 200),
        "image_filter: too many pixels (200x200 = 40000 pixels > max_pixels 39999, "
        "set by --image_filter.max_pixels)",
    ),
    ({"min_width": 0, "min_height": 0}, (1, 1), None),
]


@pytest.mark.parametrize(("params", "size", "expected"), THRESHOLD_CASES)
def test_header_rule_at_below_and_above_threshold(params, size, expected):
    out = run([row("r", noise_png(*size))], **NO_BLANK, **params)
    assert reasons(out)["r"] == expected
    assert scores(out, "width")["r"] == size[0]
    assert scores(out, "height")["r"] == size[1]
    assert scores(out, "aspect_ratio")["r"] == pytest.approx(max(size) / min(size), rel=1e-6)


def test_file_size_rules_at_below_and_above_threshold():
    blob = noise_png(210, 210)
    size = len(blob)
    cases = [
        ({"min_bytes": size}, None),
        ({"min_bytes": size - 1}, None),
        (
            {"min_bytes": size + 1},
            f"image_filter: file too small (image_bytes {size} < min_bytes {size + 1})",
        ),
        ({"max_bytes": size}, None),
        ({"max_bytes": size + 1}, None),
        (
            {"max_bytes": size - 1},
            f"image_filter: file too large (image_bytes {size} > max_bytes {size - 1})",
        ),
    ]
    for params, expected in cases:
        out = run([row("r", blob)], **NO_BLANK, **params)
        assert reasons(out)["r"] == expected, params
        assert scores(out, "image_bytes")["r"] == size


def test_decompression_bomb_rejected_from_header_without_decoding(monkeypatch):
    decoded: list[str] = []

    def no_decode(self, *args, **kwargs):
        decoded.append(type(self).__name__)
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    old_limit = Image.MAX_IMAGE_PIXELS
    bomb = png_claiming(30_000, 30_000)
    assert len(bomb) < 100
    out = run([row("bomb", bomb)])
    assert decoded == []
    assert reasons(out)["bomb"] == (
        "image_filter: too many pixels (30000x30000 = 900000000 pixels > max_pixels 268435456, "
        "set by --image_filter.max_pixels)"
    )
    assert (scores(out, "width")["bomb"], scores(out, "height")["bomb"]) == (30_000, 30_000)
    assert scores(out, "n_frames")["bomb"] is None
    assert scores(out, "blank_share")["bomb"] is None
    assert Image.MAX_IMAGE_PIXELS == old_limit  # PIL's global limit is restored


def test_header_rules_never_decode_pixels(monkeypatch):
    decoded: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append("load"))
    out = run([row("small", noise_png(120, 120)), row("gif", frames("GIF", 3))], **NO_BLANK)
    assert decoded == []
    assert reasons(out)["small"] == "image_filter: too small (width 120 < min_width 200)"
    assert reasons(out)["gif"].startswith("image_filter: multi-frame image (GIF, n_frames 3")


@pytest.mark.parametrize(
    ("blob", "fmt", "count"),
    [
        (frames("GIF", 3), "GIF", 3),
        (frames("TIFF", 2), "TIFF", 2),
        (frames("PNG", 2), "PNG", 2),
        (frames("WEBP", 2, lossless=True), "WEBP", 2),
    ],
    ids=["gif", "tiff", "apng", "webp"],
)
def test_animated_and_multi_page_images_are_rejected(blob, fmt, count):
    out = run([row("r", blob)], **NO_BLANK)
    assert reasons(out)["r"] == (
        f"image_filter: multi-frame image ({fmt}, n_frames {count} > max_frames 1)"
    )
    assert scores(out, "n_frames")["r"] == count
    assert reasons(run([row("r", blob)], max_frames=count, **NO_BLANK))["r"] is None
    assert reasons(run([row("r", blob)], max_frames=0, **NO_BLANK))["r"] is None
    assert reasons(run([row("r", blob)], max_frames=count - 1, **NO_BLANK))["r"] is not None


def test_camera_mpo_with_a_preview_counts_as_one_frame():
    blob = frames("MPO", 2)
    assert Image.open(io.BytesIO(blob)).n_frames == 2
    out = run([row("r", blob)], **NO_BLANK)
    assert reasons(out)["r"] is None
    assert scores(out, "n_frames")["r"] == 1


def test_single_frame_gif_passes_with_one_frame():
    out = run([row("r", encode(noise(220, 220), "GIF"))], **NO_BLANK)
    assert reasons(out)["r"] is None
    assert scores(out, "n_frames")["r"] == 1


# ---------------------------------------------------------------------------------------------
# blank images

PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket"]


def test_flat_colours_with_jpeg_noise_are_blank_and_real_photos_are_not():
    colours = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 30, 40), (20, 90, 200)]
    rows = [row(f"flat{i}", flat_jpeg(c, seed=i)) for i, c in enumerate(colours)]
    rows += [
        row(name, encode(Image.fromarray(getattr(skimage.data, name)()), "JPEG")) for name in PHOTOS
    ]
    rows.append(row("wall", white_wall_with_detail()))
    out = run(rows)
    got = reasons(out)
    blank = scores(out, "blank_share")
    for i in range(len(colours)):
        assert blank[f"flat{i}"] > 0.99
        shown = f"{blank[f'flat{i}']:.2f}".rstrip("0").rstrip(".")
        assert got[f"flat{i}"] == (
            f"image_filter: blank image (blank_share {shown} > max_blank_share 0.98)"
        )
    for name in [*PHOTOS, "wall"]:
        assert got[name] is None, (name, blank[name])
        assert blank[name] < 0.9, name
    drawing = run([row("drawing", line_drawing())])
    assert 0.9 < scores(drawing, "blank_share")["drawing"] < 0.98
    assert reasons(drawing)["drawing"] is None


@pytest.mark.parametrize(
    ("white", "expected"),
    [
        (392, None),  # exactly 0.98: passes
        (391, None),
        (393, "image_filter: blank image (blank_share 0.983 > max_blank_share 0.98)"),
    ],
)
def test_blank_rule_at_below_and_above_threshold(white, expected):
    out = run([row("r", share_white(white))], min_width=0, min_height=0)
    assert scores(out, "blank_share")["r"] == pytest.approx(white / 400)
    assert reasons(out)["r"] == expected


def test_fully_transparent_image_is_blank_and_rule_can_be_turned_off():
    clear = encode(Image.new("RGBA", (300, 300), (12, 200, 40, 0)))
    assert reasons(run([row("r", clear)]))["r"].startswith("image_filter: blank image (")
    out = run([row("r", clear)], max_blank_share=0.0)
    assert reasons(out)["r"] is None
    assert scores(out, "blank_share")["r"] is None


def test_blank_rule_decodes_jpeg_at_reduced_scale(monkeypatch):
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def record(self):
        result = original(self)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(ImageFile.ImageFile, "load", record)
    run([row("r", encode(noise(1024, 768), "JPEG"))])
    assert sizes and max(max(s) for s in sizes) <= 128


# ---------------------------------------------------------------------------------------------
# bad input, rows without or with several images, existing columns


def test_unreadable_images_get_a_reason_never_an_exception():
    jpeg = encode(noise(300, 300), "JPEG")
    rows = [
        row("html", b"<html><body>404</body></html>"),
        row("empty", b""),
        row("null", None),
        row("truncated", jpeg[: len(jpeg) // 2]),
        row("garbage", bytes(range(256)) * 4),
    ]
    got = reasons(run(rows))
    assert got["html"] == (
        "image_filter: unreadable image (not an image PIL reads here, starts with 3c68746d6c3e3c62)"
    )
    assert got["empty"] == "image_filter: unreadable image (0 bytes)"
    assert got["null"] == "image_filter: unreadable image (null bytes)"
    assert got["truncated"].startswith("image_filter: unreadable image (image file is truncated")
    assert got["garbage"].startswith("image_filter: unreadable image (")


def test_rows_without_images_pass_with_null_scores():
    out = run([{"id": "text", "caption": "just text"}, {"id": "empty", "images": []}])
    assert reasons(out) == {"text": None, "empty": None}
    for column in ("width", "height", "aspect_ratio", "image_bytes", "n_frames", "blank_share"):
        assert out.column(column).null_count == 2, column


def test_every_image_of_a_row_must_pass_and_scores_are_the_worst():
    first, wide, small = noise_png(300, 300), noise_png(500, 250, seed=1), noise_png(150, 300)
    out = run(
        [row("ok", first, wide), row("bad", first, wide, small), row("bad2", small, first)],
        **NO_BLANK,
    )
    got = reasons(out)
    assert got["ok"] is None
    assert got["bad"] == "image_filter: too small (image 3 of 3: width 150 < min_width 200)"
    assert got["bad2"] == "image_filter: too small (image 1 of 2: width 150 < min_width 200)"
    assert scores(out, "width") == {"ok": 300, "bad": 300, "bad2": 150}  # the first image
    assert scores(out, "aspect_ratio")["ok"] == pytest.approx(2.0)  # the largest
    assert scores(out, "image_bytes")["bad"] == min(len(first), len(wide), len(small))


def test_blank_second_image_rejects_the_row():
    out = run([row("r", encode(noise(300, 300), "JPEG"), flat_jpeg((255, 255, 255)))])
    assert reasons(out)["r"].startswith("image_filter: blank image (image 2 of 2: blank_share 1")
    assert scores(out, "blank_share")["r"] > 0.99


def test_width_and_height_written_by_image_check_are_kept():
    blob = noise_png(320, 240)
    checked = ImageCheck().process(rows_to_table([row("r", blob)]))
    out = ImageFilter(**NO_BLANK).process(checked)
    assert out.column("width").to_pylist() == [320]
    # a value already on the row wins over the header's (the column is image_check's)
    fake = checked.set_column(
        checked.column_names.index("width"), "width", pa.array([321], pa.int32())
    )
    assert ImageFilter(**NO_BLANK).process(fake).column("width").to_pylist() == [321]


def test_score_columns_have_their_types():
    out = run([row("r", noise_png(250, 250))])
    types = {f.name: f.type for f in out.schema}
    assert types["width"] == pa.int32()
    assert types["height"] == pa.int32()
    assert types["aspect_ratio"] == pa.float32()
    assert types["image_bytes"] == pa.int64()
    assert types["n_frames"] == pa.int32()
    assert types["blank_share"] == pa.float32()


@pytest.mark.parametrize(
    "bad",
    [
        {"min_width": -1},
        {"max_width": 100, "min_width": 200},
        {"max_aspect_ratio": 0.5},
        {"max_pixels": 0},
        {"max_blank_share": 1.5},
        {"blank_tolerance": 300},
        {"max_bytes": 10, "min_bytes": 20},
    ],
)
def test_impossible_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="image_filter"):
        ImageFilter(**bad)
