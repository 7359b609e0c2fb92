"""The embedding store on object storage: an S3-compatible server (moto) on 127.0.0.1, reached
through pyarrow's filesystem from an `s3://` URI, as `--embed.store s3://...` would be."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from warren.stages.embed_store import EmbeddingStore, content_keys, store_location

moto_server = pytest.importorskip("moto.server")


@pytest.fixture()
def s3_uri(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    create = f"s3://warren-test{query}&allow_bucket_creation=true"
    store_location(create).fs.create_dir("warren-test")
    yield f"s3://warren-test/embeddings{query}"
    server.stop()


def test_store_on_s3_returns_what_another_writer_put(s3_uri):
    spec = {"kind": "image", "dim": 3, "model": "m"}
    keys = content_keys([b"one", b"two", b"three"])
    vecs = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float16) / 10
    EmbeddingStore(store_location(s3_uri), spec).put(keys[:2], vecs[:2])
    got, found = EmbeddingStore(store_location(s3_uri), spec).get(keys)
    assert found.tolist() == [True, True, False]
    assert np.array_equal(got[:2].view(np.uint16), vecs[:2].view(np.uint16))
