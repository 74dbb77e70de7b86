"""python -m sslkit.viz --pipeline multicrop --data DIR --out views.png

A PNG grid of real samples pushed through a pipeline, to eyeball an augmentation recipe: one row
per sample with the source image (crop windows drawn on it when the family reports them) followed
by every view, de-normalised. Each pipeline family plugs in a row renderer here.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

CELL = 224
PAD = 6
BOX_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 200, 120), (200, 80, 255), (255, 128, 0),
               (0, 220, 220), (255, 255, 255)]


def denormalize(x, mean, std) -> np.ndarray:
    """CHW normalised float tensor/array -> HWC uint8."""
    x = np.asarray(x, dtype=np.float32)
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def fit(img: Image.Image, size: int = CELL) -> Image.Image:
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)


def source_with_boxes(jpg: bytes, boxes) -> Image.Image:
    """The stored image with crop windows (y, x, h, w in its pixels) outlined."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for k, (y, x, h, w) in enumerate(boxes):
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_COLOURS[k % len(BOX_COLOURS)],
                       width=max(2, img.width // 150))
    return fit(img)


def grid(rows: list[list[Image.Image]], captions: list[str]) -> Image.Image:
    width = max(sum(c.width for c in row) + PAD * (len(row) + 1) for row in rows)
    height = sum(max(c.height for c in row) + PAD + 14 for row in rows) + PAD
    canvas = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for row, caption in zip(rows, captions):
        draw.text((PAD, y), caption, fill=(230, 230, 230))
        y += 14
        x = PAD
        for cell in row:
            canvas.paste(cell, (x, y))
            x += cell.width + PAD
        y += max(c.height for c in row) + PAD
    return canvas


def _multicrop_rows(batch, loader, reader, n) -> tuple[list, list]:
    spec = loader.family.spec
    rows, captions = [], []
    for i in range(n):
        index = int(batch["index"][i])
        boxes = []
        for k in range(len(batch["views"])):
            a, e = batch[f"params.{k}.anchor"][i].tolist(), batch[f"params.{k}.extent"][i].tolist()
            boxes.append((a[0], a[1], e[0], e[1]))
        row = [source_with_boxes(reader.component(index, "jpg"), boxes)]
        row += [Image.fromarray(denormalize(v[i], spec.mean, spec.std)) for v in batch["views"]]
        rows.append(row)
        label = f" label {int(batch['label'][i])}" if "label" in batch else ""
        captions.append(f"sample {index}{label}: source with crop windows, then views (largest first, same colours)")
    return rows, captions


def _eval_rows(batch, loader, reader, n) -> tuple[list, list]:
    spec = loader.family.spec
    rows, captions = [], []
    for i in range(n):
        index = int(batch["index"][i])
        boxes = []
        if "params.0.anchor" in batch:
            a, e = batch["params.0.anchor"][i].tolist(), batch["params.0.extent"][i].tolist()
            boxes.append((a[0], a[1], e[0], e[1]))
        rows.append([source_with_boxes(reader.component(index, "jpg"), boxes),
                     Image.fromarray(denormalize(batch["views"][0][i], spec.mean, spec.std))])
        captions.append(f"sample {index}: source, then the {loader.family.name} crop")
    return rows, captions


# Row renderers per pipeline family; later families register theirs with `register_renderer`.
RENDERERS: dict[str, Callable] = {"multicrop": _multicrop_rows, "eval_val": _eval_rows, "eval_train": _eval_rows}


def register_renderer(name: str, fn: Callable):
    RENDERERS[name] = fn


def render(pipeline: str, data: str, out: str, n: int = 6, seed: int = 0, **options) -> str:
    from pipelines import make_loader

    from .shard.access import SampleReader
    if pipeline not in RENDERERS:
        raise ValueError(f"no visualizer for pipeline {pipeline!r}; choose from {sorted(RENDERERS)}")
    loader = make_loader(pipeline, data, batch_size=n, seed=seed, with_params=True, shuffle_buffer=256,
                         **options)
    batch = next(iter(loader))
    rows, captions = RENDERERS[pipeline](batch, loader, SampleReader(data), n)
    grid(rows, captions).save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslkit.viz", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline", default="multicrop", help=f"one of: {', '.join(sorted(RENDERERS))}")
    p.add_argument("--data", required=True, help="shard folder (with manifest.json)")
    p.add_argument("--out", default="views.png", help="PNG to write")
    p.add_argument("--n", type=int, default=6, help="samples (rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None, help="multicrop preset, e.g. 2x224+6x96, 2x160+4x96, 2x224, tiny")
    args = p.parse_args(argv)
    options = {"preset": args.preset} if args.preset else {}
    try:
        path = render(args.pipeline, args.data, args.out, n=args.n, seed=args.seed, **options)
    except Exception as e:  # noqa: BLE001 - one line for the user, whatever went wrong
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
