"""embed: CLIP-style image and caption embeddings for every row (Bunny: CLIP ViT-L/14).

The model is named by a spec (`open_clip:ViT-L-14:openai`, `hf:<model id or dir>`, a local
directory, ...; see `stages.models`) and loaded once per worker in `setup()`: a model that is not on
the machine fails there with a message saying which flag to give (`--embed.model`).

The first image of each row is decoded from its bytes by `stages.images.decode_image` (EXIF
orientation, transparency composited on white, first frame, at least twice the model's input side
kept when it decodes a large image at reduced scale) and embedded, and so is the caption
(`text_column`), in sub-batches of `model_batch_size`.

Embeddings are looked up first in the embedding store (`--embed.store`, `stages.embed_store`: keyed
by the image's bytes or the text, and by the model and its preprocessing), shared by every recipe
and output folder; only rows it does not hold are decoded and embedded, and their vectors are added
to it. `cache` (the default) is the user's cache (`$WARREN_CACHE/embeddings`, else
`~/.cache/warren/embeddings`), `none` turns it off, any other value is a path or a URI (s3://...).
The store changes no result: a vector from it is the float16 the model gave, bit for bit, and the
store's location is not part of the stage's cache key.

Decoding and preprocessing run in a thread pool as large as the worker's CPUs, one sub-batch ahead
of the model: the model embeds sub-batch k while the pool decodes k + 1 (a worker holds at most two
sub-batches of decoded images). In a Ray worker torch's intra-op threads are set to the worker's
CPUs. The model runs on the GPU when there is one (`stages.models.default_device`).

Adds:

- `image_emb`, `text_emb`: fixed_size_list<float16>[dim], L2-normalised (null where there is
  nothing to embed);
- `emb_model`: the model's name, for provenance.

Rejected rows: `embed: no image` (null or empty `images`), `embed: undecodable image (<error>)`,
and, when texts are embedded, `embed: missing caption` (null, empty or blank). A row with several
problems is rejected for its image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from warren.stages.base import BatchStage, Resources, param, put_column, reject
from warren.stages.embed_store import (
    DEFAULT_STORE,
    EmbeddingStore,
    content_keys,
    model_spec,
    store_location,
)
from warren.stages.images import decode_image
from warren.stages.schema import CORE_FIELDS, column_type, embedding_type

RULE = "embed"
MODEL_COLUMN = "emb_model"
CORE_NAMES = frozenset(f.name for f in CORE_FIELDS)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbedParams:
    model: str = param(
        "open_clip:ViT-L-14:openai",
        "model spec: open_clip:<arch>[:<pretrained tag or checkpoint path>], hf:<model id or "
        "local dir>, or a local model directory (CLIP ViT-L/14 as Bunny by default)",
    )
    images: bool = param(True, "embed each row's first image into `image_emb`")
    texts: bool = param(True, "embed each row's caption into `text_emb`")
    text_column: str = param("caption", "column holding the text to embed")
    model_batch_size: int = param(
        64, "images or texts per model call (a worker decodes one such sub-batch ahead)"
    )
    store: str = param(
        DEFAULT_STORE,
        "embedding store, shared by every recipe and output folder: 'cache' (the user's cache, "
        "$WARREN_CACHE/embeddings or ~/.cache/warren/embeddings), 'none' (off), a path or s3://...",
        fingerprint=False,  # where vectors are kept changes no result
    )


class Embed(BatchStage):
    """Embed each row's first image and its caption with a CLIP-style model."""

    name = "embed"
    # 2: images decoded by stages.images (transparency composited, EXIF orientation applied).
    version = "2"
    Params = EmbedParams
    uses_model = True
    resources = Resources(num_cpus=1.0, num_gpus=1.0, batch_size=256)
    #: The columns it writes (the `sscd` stage writes its own).
    image_output = "image_emb"
    text_output = "text_emb"
    model_output = MODEL_COLUMN

    def required_columns(self) -> tuple[str, ...]:
        p = self.params
        return (p.text_column,) if p.texts and p.text_column not in CORE_NAMES else ()

    def added_columns(self) -> dict[str, Any]:
        p = self.params
        names = [self.image_output] * p.images + [self.text_output] * p.texts + [self.model_output]
        return {name: column_type(name) for name in names}

    def check_params(self) -> None:
        p = self.params
        if not p.model.strip():
            raise ValueError(f"{self.name}: model must name a model spec")
        if not (p.images or p.texts):
            raise ValueError(f"{self.name}: nothing to do: images and texts are both off")
        if p.model_batch_size < 1:
            raise ValueError(
                f"{self.name}: model_batch_size must be >= 1, got {p.model_batch_size}"
            )

    def setup(self) -> None:
        from warren.stages.models import load_clip

        threads = _worker_cpus()
        if threads is not None:
            import torch

            # Ray gives a worker OMP_NUM_THREADS; say it to torch too, whatever was imported first.
            torch.set_num_threads(threads)
        self.model = load_clip(
            self.params.model, batch_size=self.params.model_batch_size, flag=f"--{self.name}.model"
        )
        self._pool = ThreadPoolExecutor(max_workers=threads or _cpu_count())
        self._stores: dict[str, EmbeddingStore | None] = {}
        #: Seconds the model waited for decoded input, seconds it ran, and rows by origin.
        self.stats = {"wait_s": 0.0, "model_s": 0.0, "computed": 0, "stored": 0}

    def __getstate__(self) -> dict[str, Any]:
        # A set-up stage travels without its model, pool and stores (each worker makes its own).
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "_pool", "_stores")}

    def store_for(self, kind: str) -> EmbeddingStore | None:
        """This worker's store of `kind` ("image" or "text") vectors, or None when off."""
        if kind not in self._stores:
            store = None
            try:
                root = store_location(self.params.store)
                if root is not None:
                    reduce_to = reduction_side(self.model) if kind == "image" else None
                    spec = model_spec(self.model, self.params.model, kind, reduce_to)
                    store = EmbeddingStore(root, spec)
            except Exception as exc:  # noqa: BLE001 - a store that cannot be had is only slower
                log.warning("%s: no embedding store (%s: %s)", self.name, type(exc).__name__, exc)
            self._stores[kind] = store
        return self._stores[kind]

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        model = getattr(self, "model", None)
        if model is None:
            self.setup()
            model = self.model
        if not hasattr(self, "_pool"):  # a model given without setup(), e.g. by a test
            self._pool = ThreadPoolExecutor(max_workers=_cpu_count())
            self._stores = {}
            self.stats = {"wait_s": 0.0, "model_s": 0.0, "computed": 0, "stored": 0}
        n = batch.num_rows
        reasons: list[str | None] = [None] * n
        out = batch
        if p.images:
            column, image_reasons = self._embed_images(batch)
            out = put_column(out, self.image_output, column)
            reasons = image_reasons
        if p.texts:
            column, has_text = self._embed_texts(batch)
            out = put_column(out, self.text_output, column)
            missing = f"{self.name}: missing caption"
            reasons = [r if r or ok else missing for r, ok in zip(reasons, has_text, strict=True)]
        out = put_column(out, self.model_output, pa.array([model.name] * n, pa.string()))
        mask = np.array([r is not None for r in reasons], dtype=bool)
        return reject(out, mask, reasons) if mask.any() else out

    def _embed_images(self, batch: pa.Table) -> tuple[pa.Array, list[str | None]]:
        n = batch.num_rows
        images = batch.column("images").combine_chunks()
        counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy(zero_copy_only=False)
        # flatten() honours slicing and skips null lists, so row i's images start at starts[i].
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rows = np.flatnonzero(counts > 0)
        # struct_field propagates null structs to their children: a null image has null bytes.
        blobs = pc.struct_field(images.flatten(), "bytes").take(pa.array(starts[rows]))

        reasons: list[str | None] = [f"{self.name}: no image" if c == 0 else None for c in counts]
        vectors = np.zeros((n, self.model.dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        buffers = [blobs[k].as_buffer() for k in range(len(rows))]
        store = self.store_for("image")
        todo = list(range(len(rows)))
        keys: list[bytes] = []
        if store is not None:
            hashable = [k for k, b in enumerate(buffers) if b is not None and b.size > 0]
            keys_of = dict(
                zip(hashable, content_keys([memoryview(buffers[k]) for k in hashable]), strict=True)
            )
            found = self._lookup(store, [keys_of[k] for k in hashable])
            for k, vec in zip(hashable, found, strict=True):
                if vec is not None:
                    vectors[rows[k]], ok[rows[k]] = vec, True
            todo = [k for k in todo if not ok[rows[k]]]
            self.stats["stored"] += len(rows) - len(todo)
        self._compute_images(rows, buffers, todo, reasons, vectors, ok)
        if store is not None:
            new = [k for k in todo if ok[rows[k]]]
            keys = [keys_of[k] for k in new]
            self._save(store, keys, vectors[rows[new]] if new else vectors[:0])
        return _embedding_column(vectors, ok), reasons

    def _compute_images(
        self,
        rows: np.ndarray,
        buffers: list[pa.Buffer | None],
        todo: list[int],
        reasons: list[str | None],
        vectors: np.ndarray,
        ok: np.ndarray,
    ) -> None:
        """Decode and embed `buffers[k]` for k in `todo` (row `rows[k]`): the pool decodes and
        preprocesses sub-batch j + 1 while the model embeds sub-batch j."""
        step = self.params.model_batch_size
        chunks = [todo[lo : lo + step] for lo in range(0, len(todo), step)]
        reduce_to = reduction_side(self.model)
        prepare = self.model.image_input

        def load(buffer: pa.Buffer | None) -> tuple[Any, str | None]:
            image, reason = _decode(buffer, reduce_to, self.name)
            return (None if image is None else prepare(image)), reason

        def submit(chunk: list[int]) -> list[Future]:
            return [self._pool.submit(load, buffers[k]) for k in chunk]

        pending = submit(chunks[0]) if chunks else []
        for j, chunk in enumerate(chunks):
            start = time.perf_counter()
            loaded = [f.result() for f in pending]
            waited = time.perf_counter()
            pending = submit(chunks[j + 1]) if j + 1 < len(chunks) else []
            inputs, done = [], []
            for k, (item, reason) in zip(chunk, loaded, strict=True):
                reasons[rows[k]] = reason
                if item is not None:
                    inputs.append(item)
                    done.append(int(rows[k]))
            if inputs:
                vectors[done] = self.model.encode_image_inputs(inputs)
                ok[done] = True
                self.stats["computed"] += len(done)
            self.stats["wait_s"] += waited - start
            self.stats["model_s"] += time.perf_counter() - waited

    def _lookup(self, store: EmbeddingStore, keys: list[bytes]) -> list[np.ndarray | None]:
        """The stored vector of each key, None where the store has none (or cannot be read)."""
        try:
            got, found = store.get(keys)
        except Exception as exc:  # noqa: BLE001 - the store is a cache: never fail the run
            log.warning("%s: embedding store lookup failed (%s: %s)", self.name, type(exc), exc)
            return [None] * len(keys)
        return [got[i] if found[i] else None for i in range(len(keys))]

    def _save(self, store: EmbeddingStore, keys: list[bytes], vectors: np.ndarray) -> None:
        try:
            # The float16 the column holds: a vector read back is the one computed, bit for bit.
            store.put(keys, vectors.astype(np.float16))
        except Exception as exc:  # noqa: BLE001 - the store is a cache: never fail the run
            log.warning("%s: embedding store write failed (%s: %s)", self.name, type(exc), exc)

    def _embed_texts(self, batch: pa.Table) -> tuple[pa.Array, np.ndarray]:
        name = self.params.text_column
        if name not in batch.column_names:
            raise ValueError(
                f"{self.name}: no column {name!r} to embed (columns: {batch.column_names}); "
                f"set --{self.name}.text_column or --{self.name}.texts false"
            )
        texts = batch.column(name).combine_chunks()
        stripped = pc.utf8_trim_whitespace(texts.cast(pa.string()))
        has_text = pc.fill_null(pc.greater(pc.utf8_length(stripped), 0), False)
        has_text = has_text.to_numpy(zero_copy_only=False)
        present = texts.filter(pa.array(has_text)).to_pylist()
        where = np.flatnonzero(has_text)
        vectors = np.zeros((batch.num_rows, self.model.dim), dtype=np.float32)
        store = self.store_for("text")
        todo = list(range(len(present)))
        if store is not None and present:
            keys = content_keys(present)
            found = self._lookup(store, keys)
            for i, vec in enumerate(found):
                if vec is not None:
                    vectors[where[i]] = vec
            todo = [i for i, vec in enumerate(found) if vec is None]
        if todo:
            # ClipModel batches by model_batch_size itself; texts are small, no need to chunk here.
            vectors[where[todo]] = self.model.encode_texts([present[i] for i in todo])
            if store is not None:
                self._save(store, [keys[i] for i in todo], vectors[where[todo]])
        return _embedding_column(vectors, has_text), has_text


def _worker_cpus() -> int | None:
    """The CPUs Ray gave this worker (at least 1), or None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return None
        cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    except Exception:  # noqa: BLE001 - no Ray, or not in a worker: leave torch as it is
        return None
    return max(1, round(cpus))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reduction_side(model: Any) -> int | None:
    """Twice the model's input side (open_clip's `visual.image_size`, or a transformers vision
    config's `image_size`), the shorter side a large image may be decoded down to: the model
    resizes it to its input anyway, and from at least twice that size the result is the same to
    the eye (PIL's `reducing_gap=2`). None when the model does not say."""
    module = getattr(model, "module", None)
    size = getattr(getattr(module, "visual", None), "image_size", None)
    if size is None:
        vision = getattr(getattr(module, "config", None), "vision_config", None)
        size = getattr(vision, "image_size", None)
    if isinstance(size, list | tuple):
        size = max(size)
    return 2 * int(size) if isinstance(size, int) and size > 0 else None


def _decode(
    data: pa.Buffer | None, reduce_to: int | None = None, rule: str = RULE
) -> tuple[Image.Image | None, str | None]:
    """An RGB image from `data`, or the reason it cannot be had (named for the stage `rule`);
    never raises for bad data."""
    if data is None or data.size == 0:
        return None, f"{rule}: undecodable image ({'null' if data is None else '0'} bytes)"
    raw = memoryview(data)
    try:
        return decode_image(raw, reduce_to=reduce_to), None
    except UnidentifiedImageError:
        head = bytes(raw[:8]).hex()
        return None, f"{rule}: undecodable image (unknown format, {len(raw)} bytes, starts {head})"
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder error is bad data
        # Reasons are data: keep them free of object addresses that change from run to run.
        message = _ADDRESS.sub(">", " ".join(str(exc).split())) or type(exc).__name__
        if not isinstance(exc, OSError | SyntaxError | ValueError):
            message = f"{type(exc).__name__}: {message}"
        return None, f"{rule}: undecodable image ({message[:200]})"


def _embedding_column(vectors: np.ndarray, ok: np.ndarray) -> pa.Array:
    """fixed_size_list<float16>[dim] of the rows of `vectors`, null where `ok` is false."""
    dim = vectors.shape[1]
    values = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(
        values, type=embedding_type(dim), mask=pa.array(~np.asarray(ok, dtype=bool))
    )
