"""Input and output on s3://, against an S3-compatible server on 127.0.0.1 (moto's server mode).

A user points warren at an S3-compatible store the way pyarrow's S3 filesystem reads it from the
environment: `AWS_ENDPOINT_URL` (here `http://127.0.0.1:PORT`, so the scheme is http), and the keys
in `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (docs/cluster.md, "Object storage"). The recipe
runs as a user runs it, as a script with a Ray of its own, reading its input from s3:// and
writing its output folder to s3://; every stage's kept and rejected rows must be the local run's,
byte for byte, and `warren report`, `warren explain` and `warren export` must work on the s3
output (an export to s3:// must hold what the same export to a local folder holds).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from outputs import table
from test_determinism import FLAGS, SCRIPT, assert_same_output, demo_slice_pool
from worker_env import worker_pythonpath

pytest.importorskip("moto.server", reason="the S3 test server is moto's (the dev extra)")

BUCKET = "warren-test"
# Uneven shards, so each map stage has several pieces (as tests/test_determinism.py's pool).
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server on 127.0.0.1, stopped (by its pid) after the module's tests."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not start on {url}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> dict[str, str]:
    """What a user sets to reach the store: the endpoint and the keys, nothing else."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        **FAKE_KEYS,
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _s3(endpoint: str) -> pafs.S3FileSystem:
    host = endpoint.split("://", 1)[1]
    return pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
        secret_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        allow_bucket_creation=True,
    )


def _download(fs: pafs.FileSystem, path: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    pafs.copy_files(
        path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return dest


def _funnel(run: dict) -> list[tuple]:
    return [
        (
            s["name"],
            s["rows_in"],
            s["kept"],
            s["rejected"],
            json.dumps(s.get("reasons"), sort_keys=True),
        )
        for s in run["stages"]
    ]


def test_a_recipe_reads_and_writes_s3_and_report_explain_export_work_there(
    ray_session, s3_env, tmp_path, capsys
):
    from warren.pipelines import bunny_pretrain
    from warren.pipelines.cli import main as cli
    from warren.pipelines.recipe import main as recipe_main

    fs = _s3(s3_env["AWS_ENDPOINT_URL"])
    fs.create_dir(BUCKET)
    pool = demo_slice_pool(tmp_path / "pool")
    pafs.copy_files(
        str(pool),
        f"{BUCKET}/pool",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )

    # The reference: the same recipe on the same rows, local folders in and out.
    local = tmp_path / "local"
    assert (
        recipe_main(
            bunny_pretrain.pipeline(), ["--input", str(pool), "--output", str(local), *FLAGS]
        )
        == 0
    )

    # The s3 run, as a user starts it: a script, only the environment names the store.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_env, PYTHONPATH=worker_pythonpath())
    uri = f"s3://{BUCKET}/bunny"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", f"s3://{BUCKET}/pool/", "--output", uri, *FLAGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / BUCKET).exists() and not Path(BUCKET).exists(), "s3 output went to disk"

    # Every stage's rows, reasons and shard bytes are the local run's; so is the funnel.
    copy = _download(fs, f"{BUCKET}/bunny", tmp_path / "from_s3")
    assert_same_output(local, copy)
    s3_run = json.loads(fs.open_input_stream(f"{BUCKET}/bunny/run.json").read())
    assert _funnel(s3_run) == _funnel(json.loads((local / "run.json").read_text()))
    assert s3_run["stages"][-1]["kept"] > 0
    assert fs.get_file_info(f"{BUCKET}/bunny/.lock").type == pafs.FileType.NotFound

    # A second run into the same s3 folder computes nothing (the manifests are found there); run
    # in this process, whose environment names the store too.
    capsys.readouterr()
    args = ["--input", f"s3://{BUCKET}/pool/", "--output", uri, *FLAGS]
    assert recipe_main(bunny_pretrain.pipeline(), args) == 0
    statuses = {
        s["status"]
        for s in json.loads(fs.open_input_stream(f"{BUCKET}/bunny/run.json").read())["stages"]
    }
    assert statuses == {"cached"}, capsys.readouterr().out[-3000:]

    # warren report on the s3 output writes its report there.
    capsys.readouterr()
    assert cli(["report", uri]) == 0
    report = fs.open_input_stream(f"{BUCKET}/bunny/report.html").read().decode()
    assert "bunny_pretrain" in report and "08-sample" in report

    # warren explain reads a row's journey from s3.
    final_id = table(copy / "08-sample").column("id")[0].as_py()
    capsys.readouterr()
    assert cli(["explain", uri, final_id]) == 0
    assert final_id in capsys.readouterr().out

    # warren export to s3 writes what the same export writes to a local folder.
    for fmt, name in (("llava", "llava.json"), ("sharegpt", "data.json")):
        assert cli(["export", uri, "--format", fmt, "--to", f"s3://{BUCKET}/{fmt}"]) == 0
        assert cli(["export", str(local), "--format", fmt, "--to", str(tmp_path / fmt)]) == 0
        got = _download(fs, f"{BUCKET}/{fmt}", tmp_path / f"{fmt}_from_s3")
        files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
        want = sorted(
            str(p.relative_to(tmp_path / fmt)) for p in (tmp_path / fmt).rglob("*") if p.is_file()
        )
        assert files == want and name in files
        assert (got / name).read_bytes() == (tmp_path / fmt / name).read_bytes()
    # hf: `datasets` writes local paths only; the export saves locally and copies to s3.
    import datasets

    assert cli(["export", uri, "--format", "hf", "--to", f"s3://{BUCKET}/hf"]) == 0
    hf = datasets.load_from_disk(str(_download(fs, f"{BUCKET}/hf", tmp_path / "hf_from_s3")))
    assert sorted(hf["id"]) == sorted(table(local / "08-sample").column("id").to_pylist())
    leftovers = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
        if ".tmp-" in i.path
    ]
    assert not leftovers, leftovers
