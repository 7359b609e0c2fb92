"""ocr: known text rendered into images is read back, its area measured, the filters applied."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

pytest.importorskip("rapidocr_onnxruntime")

from warren.stages.ocr import Ocr, caption_overlap, text_area  # noqa: E402


def font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font


def rendered(lines: list[str], size=(480, 160), font_size=36, mode="RGB", background="white"):
    """An image with `lines` written on it, and the box each line's ink fills."""
    img = Image.new(mode, size, background)
    draw = ImageDraw.Draw(img)
    y, boxes = 20, []
    for line in lines:
        boxes.append(draw.textbbox((20, y), line, font=font(font_size)))
        draw.text((20, y), line, fill="black", font=font(font_size))
        y += int(font_size * 1.6)
    return img, boxes


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def table(images: list[list[bytes] | None], captions: list[str | None]) -> pa.Table:
    return pa.table(
        {
            "id": [f"r{i}" for i in range(len(images))],
            "images": [[{"bytes": b, "path": None} for b in r] if r else None for r in images],
            "caption": captions,
        }
    )


@pytest.fixture(scope="module")
def stage():
    s = Ocr()
    s.setup()
    return s


def words(text: str) -> str:
    return " ".join(text.lower().split())


def test_rendered_text_is_read_back_with_its_boxes_and_area(stage):
    sign, ink = rendered(["Hello warren 2026"])
    blank = Image.new("RGB", (300, 200), "white")
    # Transparent text on a transparent canvas: seen on white, as every stage sees images.
    clear, _ = rendered(["OPEN LATE"], mode="RGBA", background=(0, 0, 0, 0))
    out = stage.process(
        table([[png(sign)], [png(blank)], [png(clear)], None], ["a", "b", "c", None])
    )
    text = out.column("ocr_text").to_pylist()
    assert words(text[0]).replace(" ", "") == "hellowarren2026"
    assert text[1] == "" and words(text[2]).replace(" ", "") == "openlate"
    assert text[3] is None and out.column("ocr_area")[3].as_py() is None
    boxes = out.column("ocr_boxes").to_pylist()[0]
    assert "".join(b["text"] for b in boxes).replace(" ", "").lower() == "hellowarren2026"
    assert all(b["image"] == 0 and len(b["box"]) == 8 and 0.5 <= b["score"] <= 1 for b in boxes)
    # The boxes cover the line's ink (a detector box has a margin around it).
    x0, y0, x1, y1 = ink[0]
    xs = [v for b in boxes for v in b["box"][0::2]]
    ys = [v for b in boxes for v in b["box"][1::2]]
    assert min(xs) <= x0 + 4 and max(xs) >= x1 - 4 and min(ys) <= y0 + 4 and max(ys) >= y1 - 4
    ink_share = (x1 - x0) * (y1 - y0) / (480 * 160)
    area = out.column("ocr_area").to_pylist()
    assert ink_share * 0.7 <= area[0] <= ink_share * 2.0 and area[1] == 0.0


def test_text_heavy_images_and_captions_that_ignore_the_text_are_filtered(stage):
    page, _ = rendered(
        [f"line {k} of the page text" for k in range(9)], size=(520, 560), font_size=34
    )
    sign, _ = rendered(["Hello warren 2026"], size=(480, 400))
    rows = table(
        [[png(page)], [png(sign)], [png(sign)]], ["a page", "a sign: hello warren", "a cat"]
    )
    out = Ocr(max_area=0.2, min_overlap=0.5).process(rows)
    reasons = out.column("_reject").to_pylist()
    assert reasons[0].startswith("ocr: text-heavy (ocr_area ")
    assert reasons[1] is None
    assert reasons[2].startswith("ocr: caption ignores the text (ocr_caption_overlap 0.00")
    # "hello" and "warren" cover 11 of the 15 characters of "Hello warren 2026".
    assert out.column("ocr_caption_overlap")[1].as_py() == pytest.approx(11 / 15)
    rich = Ocr(min_area=0.2).process(rows).column("_reject").to_pylist()
    assert rich[0] is None and rich[1].startswith("ocr: too little text")


def test_an_unreadable_image_rejects_its_row_in_image_checks_words(stage):
    sign, _ = rendered(["STOP"])
    out = stage.process(table([[png(sign), b"not an image"]], ["stop"]))
    assert out.column("_reject")[0].as_py().startswith("ocr: unreadable image (")
    assert "image 2 of 2" in out.column("_reject")[0].as_py()


def test_area_and_overlap_by_hand():
    # Two overlapping 10x10 squares on a 100x100 image: 175 of 10,000 pixels.
    squares = [[(0, 0), (10, 0), (10, 10), (0, 10)], [(5, 5), (15, 5), (15, 15), (5, 15)]]
    assert text_area(squares, 100, 100) == pytest.approx(0.0175)
    assert text_area([[(90, 90), (120, 90), (120, 120), (90, 120)]], 100, 100) == pytest.approx(
        0.01
    )
    # "sale" and "off" cover 7 of the 9 characters of "sale50off"; "a" is too short to count.
    assert caption_overlap("SALE 50% off", "Big sale, half off a") == pytest.approx(7 / 9)
    assert caption_overlap("HelloWarren", "hello warren") == 1.0
    assert caption_overlap("", "x") is None and caption_overlap("a", None) is None


def test_append_text_puts_the_text_read_after_the_caption_and_keeps_the_caption(stage):
    sign, _ = rendered(["Hello warren 2026"])
    out = Ocr(append_text=True).process(table([[png(sign)], None], ["a sign", "no image"]))
    caption, original = (
        out.column("caption").to_pylist(),
        out.column("original_caption").to_pylist(),
    )
    assert original == ["a sign", "no image"] and caption[1] == "no image"
    head, text = caption[0].split("\n", 1)
    assert head == "a sign" and words(text).replace(" ", "") == "hellowarren2026"
