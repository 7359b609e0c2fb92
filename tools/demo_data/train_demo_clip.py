#!/usr/bin/env python
"""Train the bundled demo CLIP: a tiny open_clip model fitted on CPU to Open Clip Art pairs.

    python tools/demo_data/train_demo_clip.py [--out DIR] [--epochs N] [--seed S] [--threads T]

What it trains: every usable (image, caption) pair of the Debian packages ``openclipart-png`` /
``openclipart-svg`` (~2,400 pairs: the SVG ``dc:title``, plus its ``dc:description`` when short and
useful), chosen and captioned with build_demo_data.py's own functions. The demo pool's 600 clip-art
images are a subset of them, so the model has seen the pool's images and captions: it is a demo
model for exercising the pipelines offline, not a model for real use.

Model (``MODEL_CFG``): open_clip ``CLIP`` with a ViT image tower (96 x 96 input, 12 px patches,
width 128, 4 layers, MLP ratio 2), a text transformer (context 32, width 64, 3 layers, open_clip's
BPE vocabulary) and a 96-d joint space: 3.9 M parameters, 7.8 MB as float16 safetensors. Images
are squashed to 96 x 96 (``PREPROCESS_CFG``). The demo pool's 20 scikit-image photographs join the
clip art, all of them in every batch, so the image-image loss keeps them apart.

Training: image-text InfoNCE (learned temperature) on two augmented views of each image plus an
image-image InfoNCE between the views (temperature 0.05). The augmentations are what the demo
pool's near-duplicate plants do: crops of up to 12% per axis, resizing to 0.55-1.0x, JPEG
re-encoding at quality 35-95; captions sometimes get the pool's light rewordings. AdamW, lr 2e-3,
batch 128, warmup then cosine decay. Deterministic for a seed on one thread (``--threads 1``).

Time: about 1.1 s a step (25 s an epoch of 22 steps) on one CPU thread; the default 60 epochs take
about 25 minutes, plus ~40 s to cache the decoded images (in ``--cache``) on the first run.

The output directory (default ``pipelines/demo_data/demo_clip/``) holds ``open_clip_config.json``
(``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors`` and a README.md with the
evaluation numbers; ``warren.stages.models.load_clip(<dir>)`` loads it. ``evaluate`` measures it on
demo.parquet: near-duplicate vs original cosines, unrelated-pair cosines, and where the
``swapped_caption`` rows' CLIP scores rank among the ordinary rows'.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import time
from pathlib import Path

# Run as a script (`python tools/demo_data/train_demo_clip.py`), Python puts this folder first on
# sys.path, so the builder next to it imports by name.
import build_demo_data as bdd
import numpy as np
from PIL import Image

DEFAULT_OUT = bdd.DEMO_DATA_DIR / "demo_clip"
DEFAULT_CACHE = Path("/tmp/warren_demo_clip_cache_v3.pkl")
#: Longer side of the cached training images: the demo pool's own size (build_demo_data --size).
SOURCE_SIZE = 160
MIN_SOURCE_SIZE = 64


def load_pairs(cache: Path | None = DEFAULT_CACHE) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Every usable Open Clip Art (image, caption) pair, then the demo pool's scikit-image
    photographs with their hand-written captions: images prepared exactly as the demo pool
    prepares them (flattened on white, longer side 160, JPEG quality 85), as uint8 HxWx3 arrays,
    their captions and their sources (library path, or `skimage-<name>`). Cached in `cache` (a
    pickle) when given."""
    if cache is not None and cache.is_file():
        with open(cache, "rb") as f:
            return pickle.load(f)
    cands, _ = bdd.clipart_candidates()
    images, captions, rels = [], [], []
    for c in cands:
        # Sources smaller than the pool's size are kept at their own size (down to 64 px).
        im = bdd.load_clipart(c, SOURCE_SIZE) or bdd.load_clipart(c, MIN_SOURCE_SIZE)
        if im is None:
            continue
        im = bdd.decode(bdd.jpeg_bytes(im, bdd.JPEG_QUALITY)).convert("RGB")
        images.append(np.asarray(im, dtype=np.uint8))
        captions.append(c.caption)
        rels.append(c.rel)
    for spec in bdd.SKIMAGE_IMAGES:
        arr = bdd.load_skimage_array(spec)
        if arr is None:
            continue
        im = bdd.fit_longer_side(Image.fromarray(arr), SOURCE_SIZE)
        im = bdd.decode(bdd.jpeg_bytes(im, bdd.JPEG_QUALITY)).convert("RGB")
        images.append(np.asarray(im, dtype=np.uint8))
        captions.append(spec.caption)
        rels.append(f"skimage-{spec.name}")
    out = (images, captions, rels)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache, "wb") as f:
            pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

#: The open_clip model config (written to open_clip_config.json as `model_cfg`). The text tower
#: keeps open_clip's 49,408-token BPE vocabulary, so its token embedding (49,408 x 64) is most of
#: the weights.
MODEL_CFG = {
    "embed_dim": 96,
    "vision_cfg": {
        "image_size": 96,
        "patch_size": 12,
        "width": 128,
        "layers": 4,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 3,
        "mlp_ratio": 4.0,
    },
}
#: Squash to 96 x 96 (no centre crop: clip art is often far from square).
PREPROCESS_CFG = {"size": 96, "resize_mode": "squash", "interpolation": "bicubic"}
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def set_image_size(size: int, patch: int) -> None:
    """Train at another input size: the same 8 x 8 patch grid keeps the cost about the same."""
    if size % patch:
        raise SystemExit(f"--image-size {size} is not a multiple of --patch-size {patch}")
    MODEL_CFG["vision_cfg"].update(image_size=size, patch_size=patch)
    PREPROCESS_CFG["size"] = size


def make_model(seed: int):
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**MODEL_CFG)


def eval_transform():
    """The same preprocessing load_clip uses for this model (open_clip's eval transform)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**PREPROCESS_CFG), is_train=False)


# --------------------------------------------------------------------------------------------
# Augmentation: what the demo pool's near-duplicate plants do
# --------------------------------------------------------------------------------------------


def augment(arr: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate-like view: crop 0-10% of each side (split unevenly between the two ends),
    resize 0.6-1.0x, re-encode as JPEG at quality 35-95; each with some probability, and the
    unchanged image in ~15% of views."""
    im = Image.fromarray(arr)
    if rng.random() < 0.15:
        return im
    w, h = im.size
    if rng.random() < 0.7:
        fx, fy = rng.uniform(0.0, 0.12), rng.uniform(0.0, 0.12)
        dx, dy = round(w * fx), round(h * fy)
        lx, ty = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        im = im.crop((lx, ty, w - (dx - lx), h - (dy - ty)))
    if rng.random() < 0.6:
        s = rng.uniform(0.55, 1.0)
        w, h = im.size
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    if rng.random() < 0.7:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(35, 96)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


def text_variant(caption: str, rng: np.random.Generator) -> str:
    """The caption, or one of the demo pool's light rewordings of it (20%)."""
    if rng.random() < 0.2:
        return bdd.REWORDINGS[int(rng.integers(len(bdd.REWORDINGS)))](caption)
    return caption


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(
    out: Path,
    epochs: int = 60,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    cache: Path | None = DEFAULT_CACHE,
    log_every: int = 10,
    ii_temperature: float = 0.05,
):
    """Contrastive training: image-text InfoNCE (learned temperature) on two augmented views of
    each image, plus an image-image InfoNCE between the two views (`ii_temperature`), which is
    what makes near duplicates embed close. Deterministic for a seed on one thread."""
    import open_clip
    import torch
    import torch.nn.functional as F

    images, captions, sources = load_pairs(cache)
    # The 20 photographs are a sliver of the pairs, and grayscale textures look alike to a small
    # model: every batch carries all of them, so each is contrasted with the others at every step.
    photos = np.array([i for i, s in enumerate(sources) if s.startswith("skimage-")], dtype=int)
    clipart = np.array([i for i, s in enumerate(sources) if not s.startswith("skimage-")])
    n = len(clipart)
    print(f"{len(images)} image-caption pairs ({len(photos)} photographs)", flush=True)
    tokenizer = open_clip.get_tokenizer(
        "ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"]
    )
    to_tensor = eval_transform()
    model = make_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters ({2 * n_params / 1e6:.1f} MB as float16)")

    decay = [p for nm, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in nm]
    no_decay = [
        p for nm, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in nm)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    per_batch = batch_size - len(photos)
    steps_per_epoch = n // per_batch
    total = epochs * steps_per_epoch
    warmup = max(1, min(100, total // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1 + np.cos(np.pi * t))

    step = 0
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = clipart[rng.permutation(n)]
        for b in range(steps_per_epoch):
            idx = np.concatenate([order[b * per_batch : (b + 1) * per_batch], photos])
            v1 = torch.stack([to_tensor(augment(images[i], rng)) for i in idx])
            v2 = torch.stack([to_tensor(augment(images[i], rng)) for i in idx])
            toks = tokenizer([text_variant(captions[i], rng) for i in idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            img = F.normalize(model.encode_image(torch.cat([v1, v2])), dim=-1)
            txt = F.normalize(model.encode_text(toks), dim=-1)
            i1, i2 = img[: len(idx)], img[len(idx) :]
            labels = torch.arange(len(idx))
            scale = model.logit_scale.exp().clamp(max=100)
            loss_it = 0.0
            for iv in (i1, i2):
                logits = scale * iv @ txt.T
                loss_it = (
                    loss_it
                    + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 4
                )
            ii = i1 @ i2.T / ii_temperature
            loss_ii = (F.cross_entropy(ii, labels) + F.cross_entropy(ii.T, labels)) / 2
            loss = loss_it + loss_ii
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            step += 1
            if step % log_every == 0 or step == total:
                el = time.time() - t0
                print(
                    f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss.item():.3f} "
                    f"(it {loss_it.item():.3f} ii {loss_ii.item():.3f}) "
                    f"scale {scale.item():.1f} {el:.0f}s (eta {el / step * (total - step):.0f}s)",
                    flush=True,
                )
    model.eval()
    info = {
        "seed": seed,
        "epochs": epochs,
        "steps": total,
        "pairs": len(images),
        "params": n_params,
        "ii_temperature": ii_temperature,
    }
    info["train_seconds"] = round(time.time() - t0)
    save(model, out, info)
    return info


def save(model, out: Path, info: dict) -> None:
    import json

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    os.chmod(out / WEIGHTS_FILE, 0o644)
    cfg = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"saved {out} ({(out / WEIGHTS_FILE).stat().st_size / 1e6:.2f} MB weights) {info}")


# --------------------------------------------------------------------------------------------
# Evaluation on the demo pool
# --------------------------------------------------------------------------------------------

NEAR_DUP_THRESHOLD = 0.86


def evaluate(model_dir: Path, parquet: Path = bdd.DEFAULT_OUT) -> dict:
    """Load `model_dir` with stages.models.load_clip and measure, on the demo pool:
    (a) cosine of each planted near duplicate with its original (median, share > 0.86);
    (b) cosine of unrelated ordinary image pairs (median, share > 0.86, 99th percentile);
    (c) the CLIP score (image-caption cosine) percentile of each `swapped_caption` row among the
    ordinary rows' scores (mean; low is good: the swapped caption does not fit its image)."""
    import pyarrow.parquet as pq

    from warren.stages.models import load_clip

    model = load_clip(str(model_dir), device="cpu")
    rows = pq.read_table(parquet, columns=["id", "images", "caption", "planted"]).to_pylist()
    ids, ims, caps, planted = [], [], [], []
    for r in rows:
        kind = bdd.planted_kind(r["planted"])
        if kind is not None and (kind.startswith("broken") or kind.startswith("bad_caption")):
            continue
        try:
            im = bdd.decode(r["images"][0]["bytes"]).convert("RGB")
        except Exception:
            continue
        ids.append(r["id"])
        ims.append(im)
        caps.append(r["caption"] or "")
        planted.append(r["planted"])
    emb = model.encode_images(ims)
    txt = model.encode_texts(caps)
    pos = {i: k for k, i in enumerate(ids)}
    ordinary = np.array([p is None for p in planted])

    near = [
        float(emb[k] @ emb[pos[p.split(":", 1)[1]]])
        for k, p in enumerate(planted)
        if p is not None and p.startswith("near_dup_of:") and p.split(":", 1)[1] in pos
    ]
    o = emb[ordinary]
    sim = o @ o.T
    iu = np.triu_indices(len(o), k=1)
    unrel = sim[iu]
    score = (emb * txt).sum(1)
    ord_scores = np.sort(score[ordinary])
    swapped = [k for k, p in enumerate(planted) if p == "swapped_caption"]
    pct = [float(np.searchsorted(ord_scores, score[k]) / len(ord_scores)) for k in swapped]
    res = {
        "near_dup_pairs": len(near),
        "near_dup_median_cos": float(np.median(near)),
        "near_dup_min_cos": float(np.min(near)),
        "near_dup_share_above": float(np.mean(np.array(near) > NEAR_DUP_THRESHOLD)),
        "unrelated_pairs": int(len(unrel)),
        "unrelated_median_cos": float(np.median(unrel)),
        "unrelated_p99_cos": float(np.quantile(unrel, 0.99)),
        "unrelated_share_above": float(np.mean(unrel > NEAR_DUP_THRESHOLD)),
        "ordinary_clip_score_median": float(np.median(ord_scores)),
        "swapped_clip_score_median": float(np.median(score[swapped])),
        "swapped_mean_percentile": float(np.mean(pct)),
        "swapped_in_lowest_30pct": float(np.mean(np.array(pct) < 0.3)),
    }
    for k, v in res.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return res


README = """# demo_clip: a tiny demo CLIP (not for real use)

A demo model trained on the demo pool's own images: an open_clip CLIP with a 4-layer ViT image
tower ({size} x {size} input, {patch} px patches) and a 3-layer text tower, {params:.1f} M
parameters, trained contrastively on CPU by `tools/demo_data/train_demo_clip.py` on every
usable (image, title) pair of the Debian `openclipart-png` / `openclipart-svg` packages plus the
demo pool's scikit-image photographs with their captions ({pairs} pairs: public domain or CC0,
but for three photographs whose licence scikit-image does not state; see the demo pool's README).
The demo pool's 600 clip-art images and 20 photographs are among its training pairs, so it has
seen the pool: it exists so the pipelines and tests can run offline with a model that behaves
sensibly on `pipelines/demo_data/demo.parquet`. It is NOT a general image-text model; do not use
it for real curation.

Load it with `warren.stages.models.load_clip("pipelines/demo_data/demo_clip")` (or give the directory as
`--embed.model`); the recipes use it when `--input` is left at the demo pool.

- `open_clip_config.json`: `model_cfg` (the architecture) and `preprocess_cfg` (squash to
  {size} x {size})
- `open_clip_model.safetensors`: the weights, float16 ({mb:.1f} MB)

Trained with `python tools/demo_data/train_demo_clip.py --epochs {epochs} --seed {seed}
--image-size {size} --patch-size {patch} --ii-temperature {ii_temperature} --threads 1` ({steps}
steps, {minutes:.0f} minutes on one CPU thread). Augmentations mimic the demo pool's
near-duplicate plants (crop, resize, JPEG re-encoding), so near duplicates embed close; an
image-image loss between two views of each image, with every photograph in every batch, keeps
distinct images apart. Re-measure with
`python tools/demo_data/train_demo_clip.py --eval-only`.

## Evaluation on demo.parquet

{eval_table}
"""


def write_readme(out: Path, info: dict, res: dict) -> None:
    rows = [
        ("planted near duplicates vs their originals: median cosine", "near_dup_median_cos"),
        ("... share above 0.86", "near_dup_share_above"),
        ("... lowest cosine", "near_dup_min_cos"),
        ("unrelated ordinary image pairs: median cosine", "unrelated_median_cos"),
        ("... 99th percentile cosine", "unrelated_p99_cos"),
        ("... share above 0.86", "unrelated_share_above"),
        ("ordinary rows: median CLIP score", "ordinary_clip_score_median"),
        ("swapped_caption rows: median CLIP score", "swapped_clip_score_median"),
        ("... mean percentile among ordinary rows' scores", "swapped_mean_percentile"),
        ("... share in the lowest 30%", "swapped_in_lowest_30pct"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(
        f"| {label} | {100 * res[key]:.2f}% |"
        if "share" in key or "percentile" in key or "lowest" in key
        else f"| {label} | {res[key]:.3f} |"
        for label, key in rows
    )
    text = README.format(
        size=MODEL_CFG["vision_cfg"]["image_size"],
        patch=MODEL_CFG["vision_cfg"]["patch_size"],
        ii_temperature=info.get("ii_temperature", 0.1),
        params=info.get("params", 0) / 1e6,
        pairs=info["pairs"],
        epochs=info["epochs"],
        seed=info["seed"],
        steps=info["steps"],
        minutes=info["train_seconds"] / 60,
        eval_table=table,
        mb=(out / WEIGHTS_FILE).stat().st_size / 1e6,
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: deterministic)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="decoded-image cache")
    p.add_argument(
        "--image-size", type=int, default=MODEL_CFG["vision_cfg"]["image_size"], help="input px"
    )
    p.add_argument(
        "--patch-size", type=int, default=MODEL_CFG["vision_cfg"]["patch_size"], help="ViT patch px"
    )
    p.add_argument(
        "--ii-temperature", type=float, default=0.05, help="temperature of the image-image loss"
    )
    p.add_argument("--eval-only", action="store_true", help="only evaluate --out")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.eval_only:
        evaluate(args.out)
        return
    set_image_size(args.image_size, args.patch_size)
    info = train(
        args.out,
        epochs=args.epochs,
        seed=args.seed,
        cache=args.cache,
        ii_temperature=args.ii_temperature,
    )
    print(f"evaluating {args.out} on demo.parquet:")
    res = evaluate(args.out)
    write_readme(args.out, info, res)


if __name__ == "__main__":
    main()
