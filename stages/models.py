"""models: the one place that turns a model spec string into a loaded image-text embedding model.

Specs:

- `open_clip:<arch>:<pretrained tag>`, e.g. `open_clip:ViT-L-14:openai` (CLIP ViT-L/14, Bunny's
  choice) or `open_clip:ViT-B-32:laion2b_s34b_b79k`: an open_clip architecture and its weights,
  taken from the Hugging Face cache or `~/.cache/clip` when there, downloaded otherwise;
- `open_clip:<arch>:<checkpoint>`: the same architecture with weights from a local `.pt`, `.pth`,
  `.bin` or `.safetensors` file;
- `open_clip:<arch>`: the architecture with random weights drawn from a fixed seed (tests and the
  offline demo, usually with a tiny architecture made known by `register_open_clip_config`);
- `hf:<model id or local dir>`: a transformers CLIP-style model (CLIP, SigLIP, SigLIP 2, ...),
  chosen from its config's `model_type`, with its processor;
- a bare local directory: a transformers model directory, or an open_clip one (a directory holding
  `open_clip_config.json` and its weights);
- `sscd:<name>` (`sscd_disc_mixup`, ...; downloaded once into the weights cache of
  `stages.model_fetch.weights_file`) or `sscd:<TorchScript file or URL>`: Meta's SSCD
  copy-detection descriptors, images only (`SscdModel`; the `sscd` stage).

Weights already in a local cache (the Hugging Face cache, `~/.cache/clip`) are used without a
network round trip. Nothing is downloaded when the user is offline (`HF_HUB_OFFLINE` or
`TRANSFORMERS_OFFLINE` set) or the hub's host name does not resolve (a machine without network,
where huggingface_hub would otherwise retry each file for about 25 seconds); transformers loads of a
hub id try the hub first and fall back to the cache. A model that cannot be found is a
`ModelNotFoundError` (a ValueError) whose message names the spec and the flag to give another one
with (`--embed.model` unless the caller says otherwise).

`register_open_clip_config` is per process: Ray workers do not see a registration made on the
driver. To use a tiny architecture across workers, save it as an open_clip directory
(`open_clip_config.json` with `model_cfg`, and `open_clip_model.safetensors`) and give its path.

Heavy imports (torch, open_clip, transformers) happen when a model is loaded, never at import.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from warren.stages.model_fetch import (
    DEFAULT_FLAG,
    checked_cache_file,
    fetch_errors,
    from_hub,
    is_offline,
    may_download,
    not_found,
)
from warren.stages.model_fetch import (
    ModelNotFoundError as ModelNotFoundError,  # re-exported: the stages and tests import it here
)

log = logging.getLogger(__name__)

#: Seed of the random weights of an `open_clip:<arch>` spec (no pretrained weights).
RANDOM_INIT_SEED = 0
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# transformers model types with `get_image_features` / `get_text_features` in a shared space, and
# whether their text tower was trained on sequences padded to the full length (SigLIP).
HF_MODEL_TYPES = {"clip": False, "siglip": True, "siglip2": True}


class ClipModel:
    """An image-text embedding model: images and texts in, L2-normalised float32 rows out.

    `name` is a stable string for provenance (the spec, normalised); `dim` the embedding width.
    Work runs under `torch.inference_mode`, in batches of `batch_size`, on `device`, with fp16
    autocast when that device is CUDA.
    """

    def __init__(self, name: str, dim: int, module: Any, device: str, batch_size: int = 64):
        self.name = name
        self.dim = int(dim)
        #: The underlying torch module (open_clip CLIP or transformers model), in eval mode.
        self.module = module
        self.device = device
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, dim={self.dim}, device={self.device!r})"

    def encode_images(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """(len(images), dim) float32, unit rows; `images` are RGB PIL images."""
        return self._encode(self._image_features, images, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32, unit rows."""
        return self._encode(self._text_features, list(texts), batch_size)

    def image_input(self, image: Any) -> Any:
        """The model's input for one RGB PIL image, made without the model (safe to run in
        another thread while the model runs): here the image itself; open_clip: its tensor."""
        return image

    def encode_image_inputs(self, inputs: Sequence[Any]) -> np.ndarray:
        """`encode_images` of the images whose `image_input`s are `inputs` (same numbers)."""
        return self.encode_images(inputs)

    def _encode(self, features: Callable, items: Sequence[Any], batch_size: int | None):
        import torch
        import torch.nn.functional as F

        step = max(1, int(batch_size or self.batch_size))
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        cuda = torch.device(self.device).type == "cuda"
        with torch.inference_mode():
            for i in range(0, len(items), step):
                with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                    feats = features(items[i : i + step])
                out[i : i + step] = F.normalize(feats.float(), dim=-1).cpu().numpy()
        return out

    def _image_features(self, images: Sequence[Any]):  # pragma: no cover - abstract
        raise NotImplementedError

    def _text_features(self, texts: list[str]):  # pragma: no cover - abstract
        raise NotImplementedError


class OpenClipModel(ClipModel):
    def __init__(self, name, dim, module, device, preprocess, tokenizer, batch_size=64):
        super().__init__(name, dim, module, device, batch_size)
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def _image_features(self, images):
        return self._pixel_features([self.preprocess(im) for im in images])

    def image_input(self, image):
        return self.preprocess(image)

    def encode_image_inputs(self, inputs):
        return self._encode(self._pixel_features, list(inputs), None)

    def _pixel_features(self, pixels):
        import torch

        return self.module.encode_image(torch.stack(list(pixels)).to(self.device))

    def _text_features(self, texts):
        return self.module.encode_text(self.tokenizer(texts).to(self.device))


class HfClipModel(ClipModel):
    def __init__(
        self,
        name,
        dim,
        module,
        device,
        image_processor,
        tokenizer,
        max_length,
        pad_to_max,
        batch_size=64,
    ):
        super().__init__(name, dim, module, device, batch_size)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = pad_to_max

    def _image_features(self, images):
        inputs = self.image_processor(images=list(images), return_tensors="pt")
        # SigLIP 2 also needs the patch mask and shapes its processor returns: pass them all.
        return _pooled(self.module.get_image_features(**inputs.to(self.device)))

    def _text_features(self, texts):
        enc = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        keep = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask") if k in enc}
        return _pooled(self.module.get_text_features(**keep))


class SscdModel(ClipModel):
    """SSCD (Pizzi et al. 2022), Meta's self-supervised copy-detection descriptors: a TorchScript
    ResNet whose image descriptor (512-d for the `disc` models) is L2-normalised; copies of an
    image (crops, re-encodes, resizes, flips, overlays) lie close to it. Images only. Inputs are
    the SSCD README's batch preprocessing, `skew_320`: resized to 320x320 (bilinear, aspect ratio
    not kept), ImageNet normalisation."""

    SIDE = 320
    #: For the embedding store's key: what the model is given.
    preprocess = "resize 320x320 bilinear, to [0, 1], ImageNet mean/std (SSCD's skew_320)"

    def image_input(self, image: Any) -> Any:
        import torch
        from PIL import Image

        pixels = np.asarray(image.resize((self.SIDE, self.SIDE), Image.BILINEAR), np.float32)
        pixels = (pixels / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())

    def encode_image_inputs(self, inputs: Sequence[Any]) -> np.ndarray:
        return self._encode(self._pixel_features, list(inputs), None)

    def _pixel_features(self, tensors: Sequence[Any]):
        import torch

        return self.module(torch.stack(list(tensors)).to(self.device))

    def _image_features(self, images: Sequence[Any]):
        return self._pixel_features([self.image_input(i) for i in images])

    def _text_features(self, texts: list[str]):
        raise ValueError(f"{self.name}: SSCD embeds images only (it has no text tower)")


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
#: Meta's published SSCD TorchScript models, by name (`sscd:<name>`).
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{name}.torchscript.pt"
SSCD_NAMES = ("sscd_disc_mixup", "sscd_disc_large", "sscd_disc_blur", "sscd_imagenet_mixup")


def demo_copy_descriptor() -> Any:
    """`sscd:demo`, the offline demo's stand-in for SSCD: no weights, a flip-symmetric 8x8
    thumbnail of the normalised image, centred and unit-normed. Re-encodes, resizes, small crops
    and mirror images land close to their original, distinct pictures far, so the demo recipe's
    copy dedup has something to find; it is no copy detector for real data."""
    import torch

    class Thumbnail(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.nn.functional.adaptive_avg_pool2d(x, 8)
            v = (t + torch.flip(t, dims=[3])).flatten(1)
            return torch.nn.functional.normalize(v - v.mean(dim=1, keepdim=True), dim=1)

    return Thumbnail()


def _load_sscd(spec: str, ident: str, device: str, batch_size: int, flag: str) -> ClipModel:
    """`sscd:<name>` (one of SSCD_NAMES: downloaded once into the weights cache),
    `sscd:<path or URL of a TorchScript file>`, or `sscd:demo` (`demo_copy_descriptor`)."""
    import torch

    from warren.stages.model_fetch import weights_file

    if ident == "demo":
        module = demo_copy_descriptor().to(device).eval()
        return SscdModel(spec, 192, module, device, batch_size)
    source = SSCD_URL.format(name=ident) if ident in SSCD_NAMES else ident
    path = weights_file(source, flag)
    try:
        module = torch.jit.load(path, map_location=device).eval()
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files of another kind
        raise ValueError(f"{spec}: {path} is not a TorchScript model ({exc}); give {flag}") from exc
    with torch.inference_mode():
        probe = module(torch.zeros(1, 3, SscdModel.SIDE, SscdModel.SIDE, device=device))
    return SscdModel(spec, int(probe.shape[-1]), module, device, batch_size)


def _pooled(out):
    """transformers 5 returns a model output whose pooler_output is the projected feature."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_clip(
    spec: str, device: str | None = None, *, batch_size: int = 64, flag: str = DEFAULT_FLAG
) -> ClipModel:
    """Load the model `spec` names (see the module docstring) on `device` (default: CUDA if any).

    Raises ModelNotFoundError, naming `flag` as the way to choose another model, when the weights
    are neither on this machine nor downloadable.
    """
    spec = spec.strip()
    device = device or default_device()
    if spec.startswith("open_clip:"):
        _, arch, rest = (spec.split(":", 2) + [""])[:3]
        if not arch:
            raise not_found(spec, "no architecture after 'open_clip:'", flag)
        return _load_open_clip(spec, arch, rest or None, device, batch_size, flag)
    if spec.startswith("sscd:"):
        ident = spec[len("sscd:") :]
        if not ident:
            raise not_found(spec, "no model name, path or URL after 'sscd:'", flag)
        return _load_sscd(spec, ident, device, batch_size, flag)
    if spec.startswith("hf:"):
        ident = spec[len("hf:") :]
        if not ident:
            raise not_found(spec, "no model id or directory after 'hf:'", flag)
        return _load_hf(spec, ident, device, batch_size, flag)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "open_clip_config.json")):
            return _load_open_clip(spec, f"local-dir:{spec}", None, device, batch_size, flag)
        return _load_hf(spec, spec, device, batch_size, flag)
    raise not_found(
        spec,
        "a spec is open_clip:<arch>[:<pretrained tag or checkpoint path>], hf:<model id or local "
        "dir>, or a local model directory, and no such directory exists",
        flag,
    )


#: A file in a model's directory that marks it as a demo model, with the data it was trained on
#: (`trained_on`: file, bytes, sha256); the runner refuses such a model on other input.
DEMO_MARKER = "warren_demo.json"


def demo_model_marker(spec: str) -> dict | None:
    """The demo marker of the model `spec` names (a local directory, `hf:<dir>`, or
    `open_clip:<arch>:<checkpoint in a directory>`), or None for any other model."""
    path = spec.strip()
    if path.startswith("hf:"):
        path = path[len("hf:") :]
    elif path.startswith("open_clip:"):
        parts = path.split(":", 2)
        path = parts[2] if len(parts) == 3 else ""
    if not path or not os.path.exists(path):
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(folder, DEMO_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("demo_model") else None


_REGISTRY_DIR: Path | None = None


def register_open_clip_config(name: str, cfg: dict) -> None:
    """Make an open_clip architecture `name` (a model config dict: embed_dim, vision_cfg,
    text_cfg) known to open_clip, so that `open_clip:<name>[:checkpoint]` specs load it."""
    import open_clip

    global _REGISTRY_DIR
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"open_clip config {name!r} needs embed_dim, vision_cfg and text_cfg")
    if _REGISTRY_DIR is None:
        _REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="warren-open-clip-configs-"))
        # open_clip rereads every registered file on each later registration, so the folder
        # lives as long as the process, and goes with it (one folder per process was left in
        # the temp folder before).
        atexit.register(shutil.rmtree, _REGISTRY_DIR, True)
    path = _REGISTRY_DIR / f"{name}.json"
    path.write_text(json.dumps(cfg))
    # add_model_config appends the file to open_clip's config paths and rescans them all. The
    # registry is per process: Ray workers do not see it (give them a local open_clip directory).
    open_clip.add_model_config(path)


def _load_open_clip(
    spec: str, arch: str, pretrained: str | None, device: str, batch_size: int, flag: str
) -> ClipModel:
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    if not arch.startswith("local-dir:"):
        arch = arch.replace("/", "-")  # open_clip's own spelling: ViT-L/14 is ViT-L-14
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise not_found(spec, f"open_clip has no architecture {arch!r}{hint}", flag)

    kwargs: dict[str, Any] = {}
    if arch.startswith("local-dir:"):
        name = spec
    elif pretrained is None:
        name = f"open_clip:{arch}"
        kwargs["pretrained_text"] = False  # no base text weights from a hub for a random model
        log.warning(
            "%s: no pretrained weights given; random weights (seed %d)", spec, RANDOM_INIT_SEED
        )
    elif _looks_like_path(pretrained):
        if not os.path.isfile(pretrained):
            raise not_found(spec, f"checkpoint file {pretrained!r} does not exist", flag)
        name = f"open_clip:{arch}:{pretrained}"
        kwargs["pretrained"] = pretrained
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained weights"
            raise not_found(spec, f"open_clip has no tag {pretrained!r} for {arch} ({known})", flag)
        name = f"open_clip:{arch}:{pretrained}"
        # Resolve the weights before building the model: a missing one fails in milliseconds.
        kwargs["pretrained"] = _open_clip_weights(spec, tag_cfg, flag)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = merge_preprocess_dict({}, tag_cfg)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            module = open_clip.create_model(arch, device=device, **kwargs)
        tokenizer = open_clip.get_tokenizer(arch)
    except fetch_errors() as exc:
        raise not_found(spec, f"{type(exc).__name__}: {exc}", flag) from exc
    module.eval()
    preprocess = image_transform_v2(PreprocessCfg(**module.visual.preprocess_cfg), is_train=False)
    dim = cfg["embed_dim"]
    return OpenClipModel(name, dim, module, device, preprocess, tokenizer, batch_size)


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text or "/" in text or text.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(text)
    )


def _open_clip_weights(spec: str, tag_cfg: dict, flag: str) -> str:
    """The local file of a pretrained tag's weights: from a local cache when there (no network),
    else, unless offline, downloaded from the Hugging Face hub or the tag's URL."""
    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import download_pretrained_from_url

    if tag_cfg.get("file"):
        return tag_cfg["file"]
    # (where, fetch) in the order tried: local caches, then the hub, then the tag's URL.
    cached: list[tuple[str, Callable[[], str]]] = []
    from_hub: list[tuple[str, Callable[[], str]]] = []
    from_url: list[tuple[str, Callable[[], str]]] = []
    hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
    if hub:
        # 'org/repo/' names the repo's default file, 'org/repo/file.pt' a file of it.
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            fetch = functools.partial(hf_hub_download, repo, name, local_files_only=True)
            cached.append((f"{repo}/{name} in the HF cache", fetch))
            if may_download():
                fetch = functools.partial(hf_hub_download, repo, name)
                from_hub.append((f"hf.co/{repo}/{name}", fetch))
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        cached.append((path, functools.partial(checked_cache_file, path, url)))
        if not is_offline():
            from_url.append((url, functools.partial(download_pretrained_from_url, url)))
    errors = []
    for where, fetch in cached + from_hub + from_url:
        try:
            return fetch()
        except Exception as exc:  # noqa: BLE001 - any failure to fetch means "not here"
            errors.append(f"{where}: {type(exc).__name__}")
    looked = "; ".join(errors) or "the tag names no file"
    raise not_found(spec, f"its weights are not on this machine (looked at {looked})", flag)


def _load_hf(spec: str, ident: str, device: str, batch_size: int, flag: str) -> ClipModel:
    import torch
    import transformers
    from packaging.version import Version
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoProcessor,
        AutoTokenizer,
    )

    config = from_hub(spec, ident, AutoConfig.from_pretrained, flag)
    model_type = getattr(config, "model_type", None)
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"model {spec!r} is a {model_type!r} model; embedding needs one of "
            f"{', '.join(HF_MODEL_TYPES)} (image and text towers in one space)"
        )
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    module = from_hub(spec, ident, AutoModel.from_pretrained, flag, **{dtype_kw: torch.float32})
    module.to(device).eval()
    try:
        processor = from_hub(spec, ident, AutoProcessor.from_pretrained, flag)
    except (ValueError, TypeError, KeyError):  # no processor config: load its two parts below
        processor = None
    image_processor = getattr(processor, "image_processor", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if image_processor is None:
        image_processor = from_hub(spec, ident, AutoImageProcessor.from_pretrained, flag)
    if tokenizer is None:
        tokenizer = from_hub(spec, ident, AutoTokenizer.from_pretrained, flag)

    text_cfg = getattr(config, "text_config", config)
    max_length = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None
    if max_length is not None and getattr(tokenizer, "model_max_length", None):
        max_length = min(max_length, int(tokenizer.model_max_length))
    dim = getattr(config, "projection_dim", None) or config.vision_config.hidden_size
    name = spec if spec.startswith("hf:") else f"hf:{spec}"
    return HfClipModel(
        name,
        dim,
        module,
        device,
        image_processor,
        tokenizer,
        max_length,
        HF_MODEL_TYPES[model_type],
        batch_size,
    )
