"""watermark: LAION's watermark detector on real photographs, against LAION's own preprocessing
(torchvision's transforms), with a tiny timm backbone under LAION's head."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from warren.stages.model_fetch import ModelNotFoundError
from warren.stages.watermark import Watermark, detector

ARCH = "test_efficientnet"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wm") / "watermark.pt"
    torch.save(detector(ARCH).state_dict(), path)
    return path


def test_the_head_is_laions_layout():
    # LAION-5B-WatermarkDetection's head on EfficientNet-B3's 1536 features: the keys and shapes
    # watermark_model_v1.pt holds (written out by hand, not from detector()).
    head = {
        k: tuple(v.shape)
        for k, v in detector("efficientnet_b3a").state_dict().items()
        if k.startswith("classifier.")
    }
    assert head == {
        "classifier.0.weight": (625, 1536), "classifier.0.bias": (625,),
        "classifier.3.weight": (256, 625), "classifier.3.bias": (256,),
        "classifier.5.weight": (2, 256), "classifier.5.bias": (2,),
    }  # fmt: skip


def photos() -> dict[str, Image.Image]:
    from skimage import data

    return {
        "astronaut": Image.fromarray(data.astronaut()),
        "chelsea": Image.fromarray(data.chelsea()),
        "coffee": Image.fromarray(data.coffee()),
    }


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def laion(weights, images: list[Image.Image]) -> list[float]:
    """LAION-5B-WatermarkDetection's inference: torchvision's transforms, softmax, class 0."""
    import torchvision.transforms as T

    model = detector(ARCH)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    transforms = T.Compose(
        [
            T.Resize((256, 256)),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    batch = torch.stack([transforms(i.convert("RGB")) for i in images])
    with torch.no_grad():
        return torch.softmax(model(batch), dim=1)[:, 0].tolist()


def table(rows: list[list[bytes | None]]) -> pa.Table:
    images = [[{"bytes": b, "path": None} for b in r] if r else None for r in rows]
    return pa.table({"id": [f"r{i}" for i in range(len(rows))], "images": images})


def test_scores_equal_laions_own_pipeline_and_a_row_takes_its_highest_image(weights):
    pics = photos()
    want = dict(zip(pics, laion(weights, list(pics.values())), strict=True))
    stage = Watermark(model=str(weights), arch=ARCH, max_score=1.0)
    rows = [[encoded(pics["astronaut"])], [encoded(pics["chelsea"]), encoded(pics["coffee"])], None]
    out = stage.process(table(rows))
    got = out.column("watermark_prob").to_pylist()
    assert got[0] == pytest.approx(want["astronaut"], abs=1e-5)
    assert got[1] == pytest.approx(max(want["chelsea"], want["coffee"]), abs=1e-5)
    # A row without images has no score and is kept; nothing here is above 1.0.
    assert got[2] is None
    assert "_reject" not in out.column_names or out.column("_reject").null_count == 3


def test_transparent_images_are_seen_on_white_and_unreadable_ones_reject_their_row(weights):
    pics = photos()
    rgba = pics["chelsea"].convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], np.uint8)
    alpha[:, : rgba.size[0] // 2] = 255  # the right half transparent
    rgba.putalpha(Image.fromarray(alpha))
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    stage = Watermark(model=str(weights), arch=ARCH, max_score=1.0)
    out = stage.process(
        table([[encoded(rgba)], [b"not an image"], [encoded(pics["coffee"])[:500]]])
    )
    probs = out.column("watermark_prob").to_pylist()
    assert probs[0] == pytest.approx(laion(weights, [on_white])[0], abs=1e-5)
    reasons = out.column("_reject").to_pylist()
    assert reasons[0] is None
    assert reasons[1].startswith("watermark: unreadable image (") and probs[1] is None
    assert reasons[2].startswith("watermark: unreadable image (")


def test_rows_above_max_score_are_rejected_as_watermarked(weights):
    pics = photos()
    scores = laion(weights, list(pics.values()))
    cut = float(np.median(scores))
    out = Watermark(model=str(weights), arch=ARCH, max_score=cut).process(
        table([[encoded(p)] for p in pics.values()])
    )
    for score, why in zip(scores, out.column("_reject").to_pylist(), strict=True):
        if score > cut + 1e-6:
            assert why.startswith("watermark: watermarked (watermark_prob ")
        elif score < cut - 1e-6:
            assert why is None


def test_weights_not_on_this_machine_are_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WARREN_WEIGHTS_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="--watermark.model"):
        Watermark().setup()
    (tmp_path / "other.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a test_efficientnet watermark detector"):
        Watermark(model=str(tmp_path / "other.pt"), arch=ARCH).setup()
