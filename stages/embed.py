"""embed: CLIP-style image and caption embeddings for every row (Bunny: CLIP ViT-L/14).

The model is named by a spec (`open_clip:ViT-L-14:openai`, `hf:<model id or dir>`, a local
directory, ...; see `stages.models`) and loaded once per worker in `setup()`: a model that is not on
the machine fails there with a message saying which flag to give (`--embed.model`).

The first image of each row is decoded from its bytes by `stages.images.decode_image` (EXIF
orientation, transparency composited on white, first frame, at least twice the model's input side
kept when it decodes a large image at reduced scale) and embedded, and so is the caption (`text_column`), in sub-batches of `model_batch_size` so that a worker holds at most
that many decoded images at a time. Adds:

- `image_emb`, `text_emb`: fixed_size_list<float16>[dim], L2-normalised (null where there is
  nothing to embed);
- `emb_model`: the model's name, for provenance.

Rejected rows: `embed: no image` (null or empty `images`), `embed: undecodable image (<error>)`,
and, when texts are embedded, `embed: missing caption` (null, empty or blank). A row with several
problems is rejected for its image.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from warren.stages.base import BatchStage, Resources, param, put_column, reject
from warren.stages.images import decode_image
from warren.stages.schema import CORE_FIELDS, column_type, embedding_type

RULE = "embed"
MODEL_COLUMN = "emb_model"
CORE_NAMES = frozenset(f.name for f in CORE_FIELDS)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


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
        64, "images or texts per model call (also the most images decoded at once)"
    )


class Embed(BatchStage):
    """Embed each row's first image and its caption with a CLIP-style model."""

    name = "embed"
    # 2: images decoded by stages.images (transparency composited, EXIF orientation applied).
    version = "2"
    Params = EmbedParams
    uses_model = True
    resources = Resources(num_cpus=1.0, num_gpus=1.0, batch_size=256)

    def required_columns(self) -> tuple[str, ...]:
        p = self.params
        return (p.text_column,) if p.texts and p.text_column not in CORE_NAMES else ()

    def added_columns(self) -> dict[str, Any]:
        p = self.params
        names = ["image_emb"] * p.images + ["text_emb"] * p.texts + [MODEL_COLUMN]
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

        self.model = load_clip(
            self.params.model, batch_size=self.params.model_batch_size, flag=f"--{self.name}.model"
        )

    def process(self, batch: pa.Table) -> pa.Table:
        p = self.params
        model = getattr(self, "model", None)
        if model is None:
            self.setup()
            model = self.model
        n = batch.num_rows
        reasons: list[str | None] = [None] * n
        out = batch
        if p.images:
            column, image_reasons = self._embed_images(batch)
            out = put_column(out, "image_emb", column)
            reasons = image_reasons
        if p.texts:
            column, has_text = self._embed_texts(batch)
            out = put_column(out, "text_emb", column)
            missing = f"{RULE}: missing caption"
            reasons = [r if r or ok else missing for r, ok in zip(reasons, has_text, strict=True)]
        out = put_column(out, MODEL_COLUMN, pa.array([model.name] * n, pa.string()))
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

        reasons: list[str | None] = [f"{RULE}: no image" if c == 0 else None for c in counts]
        vectors = np.zeros((n, self.model.dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        step = self.params.model_batch_size
        reduce_to = reduction_side(self.model)
        for lo in range(0, len(rows), step):
            decoded, decoded_rows = [], []
            for k in range(lo, min(lo + step, len(rows))):
                row = int(rows[k])
                image, reasons[row] = _decode(blobs[k].as_buffer(), reduce_to)
                if image is not None:
                    decoded.append(image)
                    decoded_rows.append(row)
            if decoded:
                vectors[decoded_rows] = self.model.encode_images(decoded)
                ok[decoded_rows] = True
        return _embedding_column(vectors, ok), reasons

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
        vectors = np.zeros((batch.num_rows, self.model.dim), dtype=np.float32)
        if present:
            # ClipModel batches by model_batch_size itself; texts are small, no need to chunk here.
            vectors[has_text] = self.model.encode_texts(present)
        return _embedding_column(vectors, has_text), has_text


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
    data: pa.Buffer | None, reduce_to: int | None = None
) -> tuple[Image.Image | None, str | None]:
    """An RGB image from `data`, or the reason it cannot be had; never raises for bad data."""
    if data is None or data.size == 0:
        return None, f"{RULE}: undecodable image ({'null' if data is None else '0'} bytes)"
    raw = memoryview(data)
    try:
        return decode_image(raw, reduce_to=reduce_to), None
    except UnidentifiedImageError:
        head = bytes(raw[:8]).hex()
        return None, f"{RULE}: undecodable image (unknown format, {len(raw)} bytes, starts {head})"
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder error is bad data
        # Reasons are data: keep them free of object addresses that change from run to run.
        message = _ADDRESS.sub(">", " ".join(str(exc).split())) or type(exc).__name__
        if not isinstance(exc, OSError | SyntaxError | ValueError):
            message = f"{type(exc).__name__}: {message}"
        return None, f"{RULE}: undecodable image ({message[:200]})"


def _embedding_column(vectors: np.ndarray, ok: np.ndarray) -> pa.Array:
    """fixed_size_list<float16>[dim] of the rows of `vectors`, null where `ok` is false."""
    dim = vectors.shape[1]
    values = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(
        values, type=embedding_type(dim), mask=pa.array(~np.asarray(ok, dtype=bool))
    )
