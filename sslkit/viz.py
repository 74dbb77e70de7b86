"""python -m sslkit.viz --pipeline multicrop --data DIR --out views.png  |  --run RUN --out curves.png

A PNG grid of real samples pushed through a pipeline, to eyeball an augmentation recipe: one row
per sample with the source image (crop windows drawn on it when the pipeline reports them) followed
by every view, de-normalised. Or, with --run, a run's curves from its log.jsonl: loss, lr, images/s,
data stall and every other logged number (sslkit.curves; the fields are described in docs/LOGS.md).
Each pipeline has a row renderer here, listed in `RENDERERS`.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from .config import ConfigError, parse_set
from .errors import SslkitError, UnknownNameError

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


def _window(batch, k: int, i: int) -> tuple:
    """Crop window (y, x, h, w) of view k of sample i, from the pipeline's params outputs."""
    return tuple(batch["params.windows"][i, k].tolist())


def _multicrop_rows(batch, loader, reader, n) -> tuple[list, list]:
    spec = loader.family.spec
    rows, captions = [], []
    for i in range(n):
        index = int(batch["index"][i])
        boxes = [_window(batch, k, i) for k in range(len(batch["views"]))]
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
        boxes = [_window(batch, 0, i)] if "params.windows" in batch else []
        rows.append([source_with_boxes(reader.component(index, "jpg"), boxes),
                     Image.fromarray(denormalize(batch["views"][0][i], spec.mean, spec.std))])
        captions.append(f"sample {index}: source, then the {loader.family.name} crop")
    return rows, captions


def _tile_grid(tiles: list[np.ndarray], gap: int = 4) -> Image.Image:
    """Nine HWC uint8 tiles on a 3x3 board, tile k in column k // 3, row k % 3 (the jigsaw's
    column-major cell order), so un-permuted tiles show the crop's layout."""
    t = tiles[0].shape[0]
    board = np.full((3 * t + 2 * gap, 3 * t + 2 * gap, 3), 32, np.uint8)
    for k, tile in enumerate(tiles):
        col, row = divmod(k, 3)
        board[row * (t + gap):row * (t + gap) + t, col * (t + gap):col * (t + gap) + t] = tile
    return Image.fromarray(board)


def _jigsaw_rows(batch, loader, reader, n) -> tuple[list, list]:
    fam = loader.family
    rows, captions = [], []
    for i in range(n):
        index, p = int(batch["index"][i]), int(batch["perm"][i])
        y, x, h, w = batch["params.window"][i].tolist()
        tiles = batch["tiles"][i].float().numpy()
        if fam.geometry.tile_norm:  # per-tile normalised: stretch each tile for display
            lo = tiles.min(axis=(2, 3), keepdims=True)
            hi = tiles.max(axis=(2, 3), keepdims=True)
            shown = [(((t - l) / np.maximum(u - l, 1e-6)) * 255).astype(np.uint8).transpose(1, 2, 0)
                     for t, l, u in zip(tiles, lo, hi)]
        else:
            shown = [denormalize(t, fam.mean, fam.std) for t in tiles]
        order = fam.perms[p]
        original = [None] * 9
        for k, c in enumerate(order):  # position k holds original tile order[k]
            original[c] = shown[k]
        rows.append([source_with_boxes(reader.component(index, "jpg"), [(y, x, h, w)]),
                     Image.fromarray(batch["params.crop"][i].numpy()).resize((CELL, CELL)),
                     fit(_tile_grid(shown)), fit(_tile_grid(original))])
        gray = " gray" if bool(batch["params.gray"][i]) else ""
        flip = " flipped" if bool(batch["params.flip"][i]) else ""
        captions.append(f"sample {index}: crop{flip}{gray}; tiles as fed (perm {p} = {order.tolist()}); "
                        "un-permuted")
    return rows, captions


ANNEALED_T = 0.38  # Zhang's deploy-time temperature (logits x 2.606)


def _colorization_rows(batch, loader, reader, n) -> tuple[list, list]:
    import torch

    from .color import ab_bins, lab_to_rgb_nchw

    def lab_to_rgb(lab):  # [S, S, 3] -> [S, S, 3]
        return lab_to_rgb_nchw(lab.permute(2, 0, 1)[None])[0].permute(1, 2, 0)

    bins = torch.from_numpy(ab_bins())
    rows, captions = [], []
    for i in range(n):
        index = int(batch["index"][i])
        y, x, h, w = batch["params.window"][i].tolist()
        L = batch["L"][i, 0].float() + 50.0                                       # [S, S], 0..100
        # Annealed mean (Zhang's decoding temperature) of the soft target, upsampled x4 to L's size.
        wt = batch["ab_w"][i].double() ** (1 / ANNEALED_T)
        ab = ((wt / wt.sum(-1, keepdim=True))[..., None] * bins[batch["ab_idx"][i]].double()).sum(-2).float()
        ab = ab.repeat_interleave(4, 0).repeat_interleave(4, 1)                  # [S, S, 2]
        decoded = lab_to_rgb(torch.cat([L[..., None], ab], -1))
        gray_lab = torch.stack([L, torch.zeros_like(L), torch.zeros_like(L)], -1)
        rows.append([source_with_boxes(reader.component(index, "jpg"), [(y, x, h, w)]),
                     Image.fromarray(batch["params.rgb"][i].numpy()),
                     Image.fromarray((lab_to_rgb(gray_lab).numpy() * 255 + 0.5).astype(np.uint8)),
                     Image.fromarray((decoded.numpy() * 255 + 0.5).astype(np.uint8))])
        ng = "" if bool(batch["nongray"][i]) else " (gray image: no colour target)"
        captions.append(f"sample {index}: crop, L input, L + decoded 1/4-res soft target{ng}")
    return rows, captions


def _jigclu_rows(batch, loader, reader, n) -> tuple[list, list]:
    from sslkit.methods.jigclu import LOCATIONS, QUADRANTS, make_montages, montage_permutation
    spec = loader.family.views
    m = make_montages(batch["patches"], montage_permutation(len(batch["patches"]), 0, 0))
    rows, captions = [], []
    for i in range(n):
        index = int(batch["index"][i])
        # each patch's window (inside its 0.8 x 0.8 box), colours in TL, BL, TR, BR order
        boxes = [_window(batch, k, i) for k in range(4)]
        row = [source_with_boxes(reader.component(index, "jpg"), boxes)]
        row += [Image.fromarray(denormalize(v, spec.mean, spec.std)) for v in batch["patches"][i]]
        row.append(Image.fromarray(denormalize(m["montages"][i], spec.mean, spec.std)))
        rows.append(row)
        quads = ", ".join(f"{q}=s{int(batch['index'][int(s)])}.{LOCATIONS[int(loc)]}"
                          for q, s, loc in zip(QUADRANTS, m["image_id"][i], m["location"][i]))
        captions.append(f"sample {index}: windows + patches {'/'.join(LOCATIONS)} (red/blue/yellow/green); "
                        f"montage {i}: {quads}")
    return rows, captions


# pipeline -> its row renderer: (batch, loader, SampleReader, n) -> (rows of images, captions)
RENDERERS = {"multicrop": _multicrop_rows, "eval_val": _eval_rows, "eval_train": _eval_rows,
             "jigsaw": _jigsaw_rows, "colorization": _colorization_rows, "jigclu": _jigclu_rows}


def render(pipeline: str, data: str, out: str, n: int = 6, seed: int = 0, **options) -> str:
    from .deps import require_dali
    require_dali("sslkit viz --data")
    from pipelines import make_loader

    from .shard.access import SampleReader
    if pipeline not in RENDERERS:
        raise UnknownNameError(f"unknown renderer {pipeline!r}; choose from {', '.join(sorted(RENDERERS))}")
    draw = RENDERERS[pipeline]
    print(f"building the {pipeline} pipeline (DALI graph and numba kernels: a few seconds) ...", file=sys.stderr,
          flush=True)
    loader = make_loader(pipeline, data, batch_size=n, seed=seed, with_params=True, shuffle_buffer=256,
                         **options)
    batch = next(iter(loader))
    rows, captions = draw(batch, loader, SampleReader(data), n)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid(rows, captions).save(out)
    return out


def _with_presets() -> list[str]:
    """The pipelines that take a `preset` option."""
    from pipelines import list_families   # no DALI graph is built

    from . import registry
    return [p for p in list_families()
            if "preset" in (registry.accepted_options(registry.entry("pipeline", p).factory) or [])]


def _curves(run: str, out: str) -> int:
    from .curves import plot
    try:
        path, n, bad = plot(run, out)
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f"; skipped {bad} unreadable line(s)" if bad else ""
    print(f"wrote {path} ({n} panels{skipped})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sslkit.viz", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="shard folder (with manifest.json): the pipeline's views")
    what.add_argument("--run", help="run folder (or its log.jsonl): the training curves")
    p.add_argument("--pipeline", default="multicrop", help=f"one of: {', '.join(sorted(RENDERERS))}")
    p.add_argument("--out", default=None, help="PNG to write (default: views.png, or curves.png with --run)")
    p.add_argument("--n", type=int, default=6, help="samples (rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None,
                   help="a preset of the pipelines that have them (multicrop: 2x224+6x96, 2x160+4x96, 2x224, small, "
                        "tiny)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the pipeline, e.g. permutations=100, geometry=noroozi, size=176")
    args = p.parse_args(argv)
    if args.run:
        return _curves(args.run, args.out or "curves.png")
    args.out = args.out or "views.png"
    options = {}
    if args.preset:
        if args.pipeline not in _with_presets():
            print(f"error: --preset: the {args.pipeline} pipeline has no presets (only {', '.join(_with_presets())} "
                  "has them); set its options with --option KEY=VALUE", file=sys.stderr)
            return 2
        options["preset"] = args.preset
    try:
        texts = parse_set(args.option)
    except ConfigError:
        bad = next(item for item in args.option if not all(item.partition("=")[:2]))
        print(f"error: --option {bad!r}: expected KEY=VALUE", file=sys.stderr)
        return 2
    for key, value in texts.items():
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a plain string, e.g. a path
    try:
        path = render(args.pipeline, args.data, args.out, n=args.n, seed=args.seed, **options)
    except SslkitError as e:   # a bad setting or input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an internal failure, still one line for the user
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
