"""Jigsaw puzzles (Noroozi & Favaro 2016; Goyal et al. 2019 / VISSL): 9 tiles + the permutation label.

    loader = make_loader("jigsaw", "shards/x", batch_size=256, permutations=2000)   # or a .npy path
    batch["tiles"]  # [B, 9, 3, 64, 64] float32, in permuted order
    batch["perm"]   # [B] int64 in [0, |P|): the row of the permutation set that shuffled them

Tile order convention (VISSL's `ImgPatchesFromTensor` + `ShuffleImgPatches`, METHODS.md §1.1):
- the crop is cut into a 3x3 grid of `cell` px cells; the ORIGINAL index of the tile of the cell in
  column i (x from i*cell) and row j (y from j*cell) is c = 3*i + j -- column-major, so tile 1 is the
  middle-LEFT cell, tile 3 the top-middle one;
- each cell gives one `tile` x `tile` patch at a random offset (oy, ox), drawn independently per
  cell and per axis ([0, 20] for "goyal", [0, 11] for "noroozi");
- with P the permutation set (0-based rows) and p = batch["perm"], output position k holds original
  tile P[p][k]:  tiles[k] = original[P[p][k]];  to undo it, original[P[p][k]] = tiles[k].

Geometries (`geometry=`):
- "goyal" (default; VISSL jigsaw_8gpu_resnet.yaml): resize the shorter side to 256, horizontal
  flip, random 255x255 crop, grayscale with p = 0.66 on the whole crop, ImageNet normalisation of the
  whole crop, 85 px cells, 64 px tiles, offsets in [0, 20];
- "noroozi" (the paper's 225/75/64): resize the shorter side to 256, random 225x225 crop, no flip
  and no grayscale, 75 px cells, 64 px tiles (a RandomCrop of the cell: offsets in [0, 11]); per
  tile and per channel a colour jitter x * U(0.8, 1.2) + U(-5, 5) grey levels (clamped to 0..255),
  then every tile normalised by its own per-channel mean and std (this replaces the global
  ImageNet normalisation, which it would cancel anyway).

Graph per image, identical on both devices (every random draw is a per-sample DALI random op):
decode -> ONE antialiased ROI resize straight from the source to the crop (the shorter-side resize,
the crop window and the flip are folded into it, so the full image is never resampled) -> ONE
`multi_paste` that cuts the nine tiles and writes them, already permuted, into a [9 * tile, tile]
strip: tile c is pasted at row tile * inv[c], inv = P[p]^-1, read from a constant table of all
|P| inverses with the run-time index p = `fn.random.choice(|P|)` -> grayscale (conditional: only
the samples that drew it) -> reshape to 9 frames -> normalisation (crop_mirror_normalize to FCHW;
Noroozi: arithmetic + per-frame `fn.normalize`). No Python runs per sample. (The same result from
9 `fn.slice` + `fn.stack` + `fn.sequence_rearrange(new_order=P[p])` costs ~1 ms more CPU per image.)
With `with_params=True` the batch also holds params.window ([y0, x0, h, w] of the crop in source
pixels, before the flip), params.flip, params.gray, params.offsets ([9, 2] (oy, ox) per ORIGINAL
cell c), params.order (the permutation row P[p]) and params.crop (the uint8 crop the tiles come from,
flipped, before grayscale).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from sslkit import permutations as perm_sets

from . import augment as A
from .family import DTYPES, GraphInputs
from .spec import IMAGENET_MEAN, IMAGENET_STD, SpecError

GRID = 3
N_TILES = GRID * GRID


@dataclass(frozen=True)
class JigsawGeometry:
    resize: int              # shorter side before cropping
    crop: int                # square crop, cut into a 3x3 grid of `crop // 3` px cells
    tile: int                # tile side
    jitter: int              # the tile's offset inside its cell is drawn from [0, jitter - 1] (each axis)
    flip_p: float
    gray_p: float
    tile_norm: bool          # per-tile, per-channel normalisation (Noroozi) instead of ImageNet's
    jitter_scale: tuple[float, float] = (1.0, 1.0)   # per tile and channel: x * U(scale) + U(shift)
    jitter_shift: tuple[float, float] = (0.0, 0.0)

    @property
    def cell(self) -> int:
        return self.crop // GRID

    def validate(self) -> "JigsawGeometry":
        if not 8 <= self.crop <= self.resize:
            raise SpecError(f"jigsaw crop {self.crop} must be >= 8 and <= the resize {self.resize}")
        if not 1 <= self.tile <= self.cell or not 1 <= self.jitter <= self.cell - self.tile + 1:
            raise SpecError(f"jigsaw tile {self.tile} with offsets in [0, {self.jitter - 1}] does not fit in "
                            f"the {self.cell} px cell (crop {self.crop} / 3)")
        for name in ("flip_p", "gray_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SpecError(f"{name}={getattr(self, name)}: a probability must be in [0, 1]")
        return self


GEOMETRIES = {
    # VISSL ImgPatchesFromTensor: patch_jitter 21, offsets np.random.randint(0, 21) -> [0, 20]
    "goyal": JigsawGeometry(resize=256, crop=255, tile=64, jitter=21, flip_p=0.5, gray_p=0.66, tile_norm=False),
    # a 64 px RandomCrop of each 75 px cell (torchvision: offsets [0, 75 - 64] = [0, 11])
    "noroozi": JigsawGeometry(resize=256, crop=225, tile=64, jitter=12, flip_p=0.0, gray_p=0.0, tile_norm=True,
                              jitter_scale=(0.8, 1.2), jitter_shift=(-5.0, 5.0)),
}


def load_permutations(permutations) -> np.ndarray:
    """An int N (generated: max_avg, seed 0) or a path to a .npy set -> 0-based int64 [|P|, 9]."""
    if isinstance(permutations, (int, np.integer)) and not isinstance(permutations, bool):
        try:
            return perm_sets.generate(int(permutations), "max_avg", seed=0)
        except ValueError as e:
            raise SpecError(f"permutations={permutations}: {e}") from None
    if isinstance(permutations, (str, os.PathLike)):
        path = os.fspath(permutations)
        if not os.path.isfile(path):
            raise SpecError(f"permutations={path!r}: no such file")
        try:
            table = perm_sets.load(path)
        except ValueError as e:
            raise SpecError(f"permutations: {e}") from None
        if table.shape[1] != N_TILES:
            raise SpecError(f"permutations={path!r}: rows permute {table.shape[1]} tiles, a 3x3 jigsaw needs {N_TILES}")
        return table
    raise SpecError(f"permutations={permutations!r}: expected a number of permutations or a .npy path")


def _to(node, device: str):
    """A CPU-drawn random tensor as an operand of `device` arithmetic."""
    return node.gpu() if device == "gpu" else node


class Jigsaw:
    name = "jigsaw"

    def __init__(self, permutations=2000, geometry: str = "goyal", dtype: str = "float32"):
        if geometry not in GEOMETRIES:
            raise SpecError(f"geometry={geometry!r}: choose from {sorted(GEOMETRIES)}")
        if dtype not in DTYPES:
            raise SpecError(f"dtype={dtype!r}: choose from {sorted(DTYPES)}")
        self.geometry = GEOMETRIES[geometry].validate()
        self.geometry_name, self.dtype = geometry, dtype
        self.perms = load_permutations(permutations)
        cell, t = self.geometry.cell, self.geometry.tile
        # Top-left corner of each cell, in the original order c = 3 * column + row.
        self._cells = np.array([[(c % GRID) * cell, (c // GRID) * cell] for c in range(N_TILES)], np.int32)
        # For each permutation, where each original tile goes in the [9t, t] output strip: row t * inv[c].
        inverse = np.argsort(self.perms, axis=1)
        self._out_anchors = np.stack([inverse * t, np.zeros_like(inverse)], axis=-1).astype(np.int32)
        self.source = os.fspath(permutations) if isinstance(permutations, (str, os.PathLike)) else int(permutations)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.perms)

    def describe(self) -> dict:
        return {"family": self.name, "geometry": self.geometry_name, "spec": asdict(self.geometry),
                "permutations": self.source, "num_permutations": self.num_classes, "dtype": self.dtype}

    def graph(self, g: GraphInputs) -> dict:
        geo, t = self.geometry, self.geometry.tile
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        anchor, extent = A.shorter_side_window(g.shape, geo.resize, geo.crop)
        flip = A.coin(geo.flip_p)
        crop = A.resized_crop(img, anchor, extent, geo.crop, flip, g.device)         # [crop, crop, 3] uint8

        # Tile c comes from cell c (column c // 3, row c % 3) at its own offset; it is pasted into the
        # output strip at position inv[c] (inv = P[p]^-1), so position k holds tile P[p][k]. One
        # multi_paste cuts and permutes all nine; the crop is passed once per region because
        # without `in_ids` each input supplies one region (DALI 2.4 semantics).
        offsets = fn.random.choice(geo.jitter, shape=[N_TILES, 2])             # (oy, ox) per cell
        p = fn.random.choice(self.num_classes)
        strip = fn.multi_paste(*([crop] * N_TILES), in_anchors=offsets + types.Constant(self._cells),
                               shapes=types.Constant(np.full((N_TILES, 2), t, np.int32)),
                               out_anchors=types.Constant(self._out_anchors, device="cpu")[p],
                               output_size=[N_TILES * t, t], device=g.device)   # [9t, t, 3] uint8

        gray = fn.random.coin_flip(probability=geo.gray_p, dtype=types.BOOL)
        if geo.gray_p > 0:
            # Per pixel, so on the tiles it equals VISSL's grayscale of the whole crop (57% of the pixels).
            if gray:  # RGB -> GRAY -> RGB: ~10x cheaper on the CPU than a 3x3 coord_transform
                luma = fn.color_space_conversion(strip, image_type=types.RGB, output_type=types.GRAY,
                                                 device=g.device)
                strip = fn.color_space_conversion(luma, image_type=types.GRAY, output_type=types.RGB,
                                                  device=g.device)
        tiles = fn.reshape(strip, shape=[N_TILES, t, t, 3], layout="FHWC", device=g.device)

        if geo.tile_norm:
            x = fn.cast(tiles, dtype=types.FLOAT)
            scale = _to(fn.random.uniform(range=list(geo.jitter_scale), shape=[N_TILES, 1, 1, 3]), g.device)
            shift = _to(fn.random.uniform(range=list(geo.jitter_shift), shape=[N_TILES, 1, 1, 3]), g.device)
            x = dmath.clamp(x * scale + shift, 0.0, 255.0)
            # Per tile and channel over H and W; epsilon (in grey levels^2) keeps flat tiles finite.
            x = fn.normalize(x, axes=[1, 2], epsilon=1.0, device=g.device)
            out_tiles = fn.transpose(x, perm=[0, 3, 1, 2], output_layout="FCHW", device=g.device)
            if self.dtype != "float32":
                out_tiles = fn.cast(out_tiles, dtype=DTYPES[self.dtype])
        else:
            out_tiles = fn.crop_mirror_normalize(tiles, dtype=DTYPES[self.dtype], output_layout="FCHW",
                                                 mean=[255.0 * m for m in self.mean],
                                                 std=[255.0 * s for s in self.std], device=g.device)
        out = {"tiles": out_tiles, "perm": fn.cast(p, dtype=types.INT64)}
        if g.with_params:
            order = types.Constant(self.perms.astype(np.int32), device="cpu")[p]   # the row P[p]
            out.update({"params.window": fn.cat(anchor, extent), "params.offsets": offsets, "params.order": order,
                        "params.crop": crop, "params.flip": flip, "params.gray": gray})
        return out
