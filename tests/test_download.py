"""The `download` reader: URL tables fetched with img2dataset from a local HTTP server (offline)."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from PIL import Image

from warren.stages.readers import READERS, detect_format, get_reader
from warren.stages.readers.base import InputError
from warren.stages.readers.download import (
    DownloadReader,
    error_types,
    shard_complete,
)
from warren.stages.schema import REJECT_COLUMN, content_id
from warren.stages.shards import Location

TIMEOUT_S = 1
SLOW_S = 2.5


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _photos() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """path -> (body, (width, height)) for scikit-image's sample photos."""
    import skimage.data as data

    out = {}
    for name, fmt in (("astronaut", "JPEG"), ("chelsea", "JPEG"), ("coffee", "JPEG")):
        arr = getattr(data, name)()
        out[f"/img/{name}.jpg"] = (_encode(arr, fmt), (arr.shape[1], arr.shape[0]))
    camera = data.camera()
    out["/img/camera.png"] = (_encode(camera, "PNG"), (camera.shape[1], camera.shape[0]))
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default listen backlog (5) drops connections when the download threads connect at once,
    # and a dropped SYN is retried after 1 s: past the test's time-out.
    request_queue_size = 256


class ImageServer:
    """Real images, a 404, a slow response, an HTML body, a truncated JPEG and an opted-out
    image, on 127.0.0.1; counts requests per path."""

    def __init__(self) -> None:
        self.photos = _photos()
        jpeg = self.photos["/img/astronaut.jpg"][0]
        self.bodies: dict[str, tuple[bytes, dict[str, str]]] = {
            path: (body, {"Content-Type": "image/jpeg"}) for path, (body, _) in self.photos.items()
        }
        self.bodies["/bad/page.jpg"] = (b"<html><body>not here</body></html>", {})
        self.bodies["/bad/truncated.jpg"] = (jpeg[: len(jpeg) // 2], {})
        self.bodies["/bad/noai.jpg"] = (jpeg, {"X-Robots-Tag": "noai"})
        self.bodies["/bad/slow.jpg"] = (jpeg, {})
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.requests[self.path] += 1
                if self.path == "/bad/slow.jpg":
                    time.sleep(SLOW_S)
                found = server.bodies.get(self.path)
                if found is None:
                    self.send_error(404, "Not Found")
                    return
                body, headers = found
                try:
                    self.send_response(200)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# path -> the error type its URL is rejected with
FAILURES = {
    "/bad/missing.jpg": "http 404",
    "/bad/slow.jpg": "timeout",
    "/bad/page.jpg": "decode error",
    "/bad/truncated.jpg": "decode error",
    "/bad/noai.jpg": "opt-out header",
}
GOOD = ["/img/astronaut.jpg", "/img/chelsea.jpg", "/img/coffee.jpg", "/img/camera.png"]


@pytest.fixture(scope="module")
def server():
    srv = ImageServer()
    yield srv
    srv.close()


def _url_table(server: ImageServer, paths: list[str] | None = None) -> pa.Table:
    paths = paths or [*GOOD, *FAILURES]
    return pa.table(
        {
            "URL": [server.url(p) for p in paths],
            "TEXT": [f"a photo at {p}" for p in paths],
            "similarity": [0.25 + i / 100 for i in range(len(paths))],
            "LICENSE": ["cc-by" if i % 2 else None for i in range(len(paths))],
        }
    )


FAST = {"timeout": TIMEOUT_S, "image_size": 64, "thread_count": 8}


def _read_all(reader: DownloadReader) -> pa.Table:
    tables = [t for unit in reader.plan() for t in reader.read(unit)]
    return pa.concat_tables(tables)


def test_download_keeps_good_images_and_rejects_each_failure_with_its_type(server, tmp_path):
    pq.write_table(_url_table(server), tmp_path / "urls.parquet")
    reader = get_reader(
        "download",
        str(tmp_path / "urls.parquet"),
        url_col="URL",
        caption_col="TEXT",
        downloads=str(tmp_path / "dl"),
        **FAST,
    )
    table = _read_all(reader)
    assert table.num_rows == len(GOOD) + len(FAILURES)  # rows in = URLs asked for
    rows = {r["url"]: r for r in table.to_pylist()}

    for path in GOOD:
        row = rows[server.url(path)]
        assert row[REJECT_COLUMN] is None, row[REJECT_COLUMN]
        assert row["caption"] == f"a photo at {path}"
        assert row["id"] == content_id(server.url(path), row["caption"])
        assert row["source"] == "urls"
        (image,) = row["images"]
        with Image.open(io.BytesIO(image["bytes"])) as im:
            im.load()
            assert im.size == (64, 64) == (row["width"], row["height"])  # resize_mode border
        assert (row["original_width"], row["original_height"]) == server.photos[path][1]
        assert row["similarity"] is not None and "LICENSE" in row  # extra columns kept
        assert len(row["sha256"]) == 64

    for path, kind in FAILURES.items():
        row = rows[server.url(path)]
        assert row["images"] == []
        reason = row[REJECT_COLUMN]
        assert reason.startswith(f"download: {kind} ({server.url(path)}: "), reason
        assert row["caption"] == f"a photo at {path}" and row["similarity"] is not None
    assert "HTTP Error 404" in rows[server.url("/bad/missing.jpg")][REJECT_COLUMN]
    assert "X-Robots-Tag" in rows[server.url("/bad/noai.jpg")][REJECT_COLUMN]

    # A second read of the same units converts the cached shards: not one more request.
    before = sum(server.requests.values())
    again = _read_all(reader)
    assert sum(server.requests.values()) == before
    assert sorted(again.column("id").to_pylist()) == sorted(table.column("id").to_pylist())


def test_opt_out_header_is_fetched_when_no_directives_are_respected(server, tmp_path):
    pq.write_table(_url_table(server, ["/bad/noai.jpg"]), tmp_path / "urls.parquet")
    reader = DownloadReader(
        str(tmp_path / "urls.parquet"),
        downloads=str(tmp_path / "dl"),
        disallowed_header_directives=[],
        **FAST,
    )
    (row,) = _read_all(reader).to_pylist()
    assert row[REJECT_COLUMN] is None and row["caption"] == "a photo at /bad/noai.jpg"


def _write(table: pa.Table, path: Path, kind: str) -> None:
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind in ("csv", "tsv"):
        opts = pacsv.WriteOptions(delimiter="\t" if kind == "tsv" else ",")
        pacsv.write_csv(table, path, opts)
    else:
        with open(path, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "jsonl"])
def test_url_tables_of_every_format_map_their_columns(server, tmp_path, kind):
    paths = ["/img/chelsea.jpg", "/bad/missing.jpg", "/img/coffee.jpg"]
    src = _url_table(server, paths).rename_columns(["link", "alt", "similarity", "uid"])
    src = src.set_column(3, "uid", pa.array(["u0", "u1", "u2"]))
    path = tmp_path / f"urls.{kind}"
    _write(src, path, kind)
    reader = get_reader(
        "download",
        str(path),
        url_col="link",
        caption_col="alt",
        id_col="uid",
        save_additional_columns=["similarity"],
        downloads=str(tmp_path / "dl"),
        **FAST,
    )
    rows = {r["id"]: r for r in _read_all(reader).to_pylist()}
    assert set(rows) == {"u0", "u1", "u2"}
    assert rows["u0"]["caption"] == "a photo at /img/chelsea.jpg"
    assert rows["u0"]["url"] == server.url("/img/chelsea.jpg")
    assert (rows["u0"]["original_width"], rows["u0"]["original_height"]) == (451, 300)
    assert rows["u1"][REJECT_COLUMN].startswith("download: http 404 (")
    assert rows["u2"][REJECT_COLUMN] is None
    assert float(rows["u2"]["similarity"]) == pytest.approx(0.27)
    assert rows["u0"]["uid"] == "u0" and "link" not in rows["u0"]


def test_unknown_column_and_option_are_clear_errors(server, tmp_path):
    pq.write_table(_url_table(server), tmp_path / "urls.parquet")
    with pytest.raises(InputError, match="unknown option"):
        DownloadReader(str(tmp_path / "urls.parquet"), image_sise=64)
    with pytest.raises(InputError, match="resize_mode"):
        DownloadReader(str(tmp_path / "urls.parquet"), resize_mode="stretch")
    reader = DownloadReader(str(tmp_path / "urls.parquet"), url_col="link")
    with pytest.raises(InputError, match="no URL column"):
        reader.plan()


def test_error_messages_map_to_short_types():
    messages = pa.array(
        [
            "HTTP Error 503: Service Unavailable",
            "<urlopen error timed out>",
            "The read operation timed out",
            "<urlopen error [Errno 111] Connection refused>",
            "<urlopen error [Errno -2] Name or service not known>",
            "Use of image disallowed by X-Robots-Tag directive",
            "Image decoding error",
            "image too small",
            "aspect ratio too large",
            "unknown url type: 'ftp2'",
            "something new",
            None,
        ]
    )
    assert error_types(messages).to_pylist() == [
        "http 503",
        "timeout",
        "timeout",
        "connection error",
        "connection error",
        "opt-out header",
        "decode error",
        "too small",
        "aspect ratio",
        "bad url",
        "other",
        None,
    ]


def test_detect_format_picks_download_for_url_tables(server, tmp_path):
    table = _url_table(server, GOOD[:2])
    for kind in ("parquet", "csv", "tsv", "jsonl"):
        _write(table, tmp_path / f"urls.{kind}", kind)
        assert detect_format(str(tmp_path / f"urls.{kind}")) == "download"
    folder = tmp_path / "pool"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    assert detect_format(str(folder)) == "download"
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    _write(table, csvs / "a.csv", "csv")
    assert detect_format(str(csvs)) == "download"
    # A Parquet pool with images next to its urls is a pool, not a download.
    images = table.append_column("jpg", pa.array([b"x", b"y"], pa.binary()))
    pq.write_table(images, tmp_path / "pool.parquet")
    assert detect_format(str(tmp_path / "pool.parquet")) == "parquet"
    # LLaVA JSON lines stay llava_json.
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"id": "1", "image": "a.jpg", "url": "u", "conversations": []}) + "\n"
    )
    assert detect_format(str(tmp_path / "chat.jsonl")) == "llava_json"
    assert "download" in READERS


def _unit_folders(downloads: Path) -> list[Path]:
    return sorted(p.parent for p in downloads.glob("*/*/urls.feather"))


def test_rerun_after_deleting_one_shard_refetches_that_shard_alone(ray_session, server, tmp_path):
    from warren.pipelines.runner import Pipeline, Runner

    paths = [*GOOD, "/bad/missing.jpg", "/bad/page.jpg"]
    pq.write_table(_url_table(server, paths), tmp_path / "urls.parquet")
    downloads = tmp_path / "out" / "_downloads"

    def run(force: bool) -> dict:
        reader = DownloadReader(
            str(tmp_path / "urls.parquet"),
            url_col="URL",
            caption_col="TEXT",
            rows_per_shard=2,
            **FAST,
        )
        reader.bind_output(Location.of(str(tmp_path / "out")))  # as the runner would
        runner = Runner(
            Pipeline("dl", []),
            "unused",
            str(tmp_path / "out"),
            reader=reader,
            progress=False,
            force=force,
        )
        (report,) = runner.run()
        return report

    with server.lock:
        server.requests.clear()
    report = run(force=False)
    assert (report.rows_in, report.kept, report.rejected) == (6, 4, 2)
    assert report.reasons == {"download: http 404": 1, "download: decode error": 1}
    assert all(server.requests[p] == 1 for p in paths)
    units = _unit_folders(downloads)
    assert len(units) == 3 and all(shard_complete(Location.of(str(u))) for u in units)

    # Delete the second unit's img2dataset shard: only its two URLs are fetched again.
    (units[1] / "00000.parquet").unlink()
    refetched = set(feather.read_table(units[1] / "urls.feather").column("url").to_pylist())
    with server.lock:
        server.requests.clear()
    report = run(force=True)
    assert (report.rows_in, report.kept, report.rejected) == (6, 4, 2)
    assert {server.url(p) for p, n in server.requests.items() if n} == refetched
    assert sum(server.requests.values()) == 2


@pytest.mark.parametrize("recipe", ["bunny_pretrain", "datacomp_filter"])
def test_recipes_download_a_url_table_first(ray_session, server, tmp_path, recipe):
    import importlib

    from warren.pipelines.recipe import DEMO_CLIP, main

    module = importlib.import_module(f"pipelines.{recipe}")
    pq.write_table(_url_table(server, GOOD + ["/bad/missing.jpg"]), tmp_path / "urls.parquet")
    out = tmp_path / recipe
    argv = [
        "--input", str(tmp_path / "urls.parquet"),
        "--output", str(out),
        "--input-option", "image_size=64",
        "--input-option", f"timeout={TIMEOUT_S}",
        "--embed.model", DEMO_CLIP,
        "--allow-demo-model",  # a toy model on toy images: the run is what is tested
        "--quiet",
    ]  # fmt: skip
    code = main(module.pipeline(), argv)
    summary = json.loads((out / "run.json").read_text())
    # Four toy rows through bunny_pretrain's rank windows may leave none: such a run fails (exit
    # 2, its folders and funnel written); a run that kept rows succeeds.
    assert code == (2 if summary["stages"][-1]["kept"] == 0 else 0), summary["stages"]
    assert summary["input"]["format"] == "download"  # detected: a url column, no images
    ingest = summary["stages"][0]
    assert (ingest["rows_in"], ingest["kept"]) == (5, 4)
    assert ingest["reasons"] == {"download: http 404": 1}
    assert summary["stages"][1]["name"] == "image_check" and summary["stages"][1]["rows_in"] == 4
    assert all(s["rows_in"] > 0 for s in summary["stages"][:3])
    # The cache: `_downloads` by the input, or under the output once the runner binds it.
    assert list(tmp_path.glob("**/_downloads/*/*/00000.parquet"))
