"""The basic_filter recipe end to end on a crafted pool (one row planted per rule, each ending with
its reason), and `--basic-filter` putting its stages in front of another recipe."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from outputs import rejected_reasons, table
from PIL import Image
from skimage import data as skdata

from warren.pipelines import basic_filter, bunny_pretrain
from warren.pipelines.recipe import main
from warren.stages.schema import rows_to_table

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins"]


def _encode(array: np.ndarray, fmt: str = "PNG", size: int | None = 256) -> bytes:
    im = Image.fromarray(array).convert("RGB")
    if size:
        im = im.resize((size, size))
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _wide(array: np.ndarray) -> bytes:
    """900 x 250 px: both sides over 200 px, aspect ratio 3.6."""
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize((900, 250)).save(buf, "PNG")
    return buf.getvalue()


def _row(rid: str, image: bytes | None, caption: str) -> dict:
    return {
        "id": rid,
        "images": [] if image is None else [{"bytes": image, "path": None}],
        "caption": caption,
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    photo = {name: getattr(skdata, name)() for name in PHOTOS}
    good = "A clear photograph of {} taken in daylight"
    rows = [_row(name, _encode(photo[name]), good.format(name)) for name in PHOTOS]
    rows += [
        _row("tiny", _encode(photo["astronaut"], size=120), good.format("a tiny thing")),
        _row("wide", _wide(photo["astronaut"]), good.format("a long banner")),
        _row("stock", _encode(photo["coffee"][::-1]), "Cup of coffee stock photo by Shutterstock"),
        _row("short", _encode(photo["chelsea"][:, ::-1]), "cat"),
        _row("german", _encode(photo["rocket"][::-1]), "Eine Rakete steht auf der Startrampe"),
        # the same pixels as `coffee`, stored as BMP: an exact pixel duplicate with other bytes
        _row("coffee-bmp", _encode(photo["coffee"], "BMP"), good.format("a coffee cup")),
        # `camera` scaled to 200 px and saved as JPEG: a perceptual near duplicate
        _row("camera-small", _encode(photo["camera"], "JPEG", size=200), good.format("a camera")),
        _row("broken", _encode(photo["coins"])[:300], good.format("coins again")),
    ]
    pq.write_table(rows_to_table(rows), root / "pool.parquet")
    return root / "pool.parquet"


def test_basic_filter_rejects_each_planted_row_for_its_rule(ray_session, pool, tmp_path):
    out = tmp_path / "out"
    assert (
        main(basic_filter.pipeline(), ["--input", str(pool), "--output", str(out), "--quiet"]) == 0
    )
    reasons = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name[:2].isdigit()):
        reasons.update(rejected_reasons(folder))
    rules = {rid: r.split(" (")[0] for rid, r in reasons.items()}
    assert rules == {
        "broken": "image_check: truncated image",
        "tiny": "image_filter: too small",
        "wide": "image_filter: extreme aspect ratio",
        "stock": "caption_filter: boilerplate",
        "short": "caption_filter: too few words",
        "german": "language: not wanted",
        "coffee-bmp": "exact_dedup: duplicate",
        "camera-small": "phash_dedup: near duplicate",
    }
    assert "coffee" in reasons["coffee-bmp"]
    assert reasons["camera-small"].startswith("phash_dedup: near duplicate (of camera,")
    final = table(out / "07-phash_dedup")
    assert sorted(final.column("id").to_pylist()) == sorted(PHOTOS)
    # every filter left its score on the kept rows
    for column in ("aspect_ratio", "caption_words", "lang", "lang_score", "nsfw_score", "phash"):
        assert final.column(column).null_count == 0, column
    run = json.loads((out / "run.json").read_text())
    for stage in run["stages"][1:]:
        assert stage["rows_in"] == stage["kept"] + stage["rejected"]


def test_the_flag_puts_the_basic_filter_in_front_of_a_recipe(capsys):
    assert main(bunny_pretrain.pipeline(), ["--basic-filter", "--describe"]) == 0
    described = capsys.readouterr().out
    order = [line.split()[1] for line in described.splitlines() if line.strip()[:2].isdigit()]
    assert order[:8] == [
        "ingest:",
        "image_check",
        "image_filter",
        "caption_filter",
        "language",
        "nsfw",
        "exact_dedup",
        "phash_dedup",
    ]
    assert order[8:] == [
        "caption_check",
        "embed",
        "cluster",
        "semdedup",
        "clip_score",
        "centroid_window",
        "sample",
    ]
    # the basic filter's thresholds become flags of the recipe
    assert (
        main(
            bunny_pretrain.pipeline(),
            ["--basic-filter", "--image_filter.min_width", "300", "--describe"],
        )
        == 0
    )
    assert "'min_width': 300" in capsys.readouterr().out
