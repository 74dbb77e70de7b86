"""Jigsaw puzzles (Noroozi & Favaro 2016; Goyal et al. 2019 / VISSL): 9 tiles + the permutation label.

    loader = make_loader("jigsaw", "shards/x", batch_size=256, permutations=2000)   # or a .npy path
    batch["tiles"]  # [B, 9, 3, 64, 64] float32, in permuted order
    batch["perm"]   # [B] int64 in [0, |P|): the row of the permutation set that shuffled them

Tile order: the convention stated in `sslkit.permutations` (VISSL's `ImgPatchesFromTensor` +
`ShuffleImgPatches`: cells numbered column-major, c = 3 * column + row; output position k holds
original tile P[p][k]; `sslkit.permutations.unpermute_tiles` undoes it). Each cell gives one `tile` x
`tile` patch at a random offset (oy, ox), drawn independently per cell and per axis ([0, 20] for
"goyal", [0, 11] for "noroozi").

Geometries (`geometry=`):
- "goyal" (default; VISSL jigsaw_8gpu_resnet.yaml): resize the shorter side to 256, horizontal
  flip, random 255x255 crop, grayscale with p = 0.66 on the whole crop, ImageNet normalisation of the
  whole crop, 85 px cells, 64 px tiles, offsets in [0, 20];
- "small" (data of 28-96 px such as Fashion-MNIST or CIFAR): goyal's recipe at a quarter of the size:
  shorter side 64, a 63 px crop, 21 px cells, 16 px tiles, offsets in [0, 5];
- "noroozi" (the paper's 225/75/64): resize the shorter side to 256, random 225x225 crop, no flip
  and no grayscale, 75 px cells, 64 px tiles (a RandomCrop of the cell: offsets in [0, 11]); per
  tile and per channel a colour jitter x * U(0.8, 1.2) + U(-5, 5) grey levels (clamped to 0..255),
  then every tile normalised by its own per-channel mean and std (this replaces the global
  ImageNet normalisation, which it would cancel anyway).

Graph per image, identical on both devices: decode -> ONE uniform op (every random draw of the
sample: window, flip, gray, permutation, tile offsets, Noroozi's jitter) -> ONE numba op
(`_tiles_run`) that turns them into the crop window (`ViewRule(square=crop / resize)` of
pipelines/spec.py, flip folded in), the permutation index p = floor(u |P|), each cell's tile
position and where it goes: tile c is pasted at row tile * inv[c] of the output strip, inv = P[p]^-1
read from a constant table of all |P| inverses -> ONE antialiased ROI resize straight from the source
to the crop (the full image is never resampled) -> ONE `multi_paste` that cuts the nine tiles and
writes them, already permuted, into a [9 * tile, tile] uint8 strip. `postprocess` then does the
rest on the whole batch in torch: 9 frames, grayscale of the samples that drew it (luma, as VISSL
converts the whole crop), normalisation (ImageNet's, or Noroozi's jitter + per-tile statistics).
With `with_params=True` the batch also holds params.window ([y0, x0, h, w] of the crop in source
pixels), params.flip, params.gray, params.offsets ([9, 2] (oy, ox) per ORIGINAL cell c),
params.order (the permutation row P[p]), params.u and params.crop (the uint8 crop the tiles come
from, flipped, before grayscale).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

from sslkit import permutations as perm_sets
from sslkit.registry import register

from . import augment as A
from .family import TORCH_DTYPES, GraphInputs
from .kernels import RULE_LEN, register_op, view_roi
from .spec import IMAGENET_MEAN, IMAGENET_STD, N_VIEW_U, VIEW_U, SpecError, ViewRule, check_choice

GRID = 3
N_TILES = GRID * GRID
# The sample's uniforms after the window's N_VIEW_U: the permutation, (oy, ox) per cell, and Noroozi's
# jitter, scale then shift, per tile and channel.
JIG_U = {"perm": N_VIEW_U, "offsets": N_VIEW_U + 1, "scale": N_VIEW_U + 1 + 2 * N_TILES,
         "shift": N_VIEW_U + 1 + 5 * N_TILES}
EXTRA_U = 1 + 8 * N_TILES
_U_PERM, _U_OFFSETS = JIG_U["perm"], JIG_U["offsets"]


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
    # the same recipe for small images (28-96 px): a quarter of goyal's sizes
    "small": JigsawGeometry(resize=64, crop=63, tile=16, jitter=6, flip_p=0.5, gray_p=0.66, tile_norm=False),
    # a 64 px RandomCrop of each 75 px cell (torchvision: offsets [0, 75 - 64] = [0, 11])
    "noroozi": JigsawGeometry(resize=256, crop=225, tile=64, jitter=12, flip_p=0.0, gray_p=0.0, tile_norm=True,
                              jitter_scale=(0.8, 1.2), jitter_shift=(-5.0, 5.0)),
}


def load_permutations(permutations) -> np.ndarray:
    """An int N (generated: max_avg, seed 0) or a path to a .npy set -> 0-based int64 [|P|, 9]
    (`sslkit.permutations.resolve`, which the jigsaw method uses too)."""
    try:
        return perm_sets.resolve(permutations, n_tiles=N_TILES)
    except (ValueError, OSError) as e:
        raise SpecError(f"permutations: {e}") from None


@do_not_convert
def _tiles_run(start, end, in_anchors, out_anchors, shapes, perm, shape, u, prm, inverse):
    """prm: the window's rule row, then cell, tile and jitter; inverse: [|P|, 9] int32, P[p]^-1."""
    v = u[0]
    view_roi(shape[0], shape[1], v, prm, start, end)
    cell, t, jitter, n = int(prm[RULE_LEN]), int(prm[RULE_LEN + 1]), int(prm[RULE_LEN + 2]), inverse.shape[0]
    p = min(int(v[_U_PERM] * n), n - 1)
    perm[0] = p
    for c in range(9):  # column-major cells: c = 3 * column + row
        in_anchors[c, 0] = (c % 3) * cell + min(int(v[_U_OFFSETS + 2 * c] * jitter), jitter - 1)
        in_anchors[c, 1] = (c // 3) * cell + min(int(v[_U_OFFSETS + 2 * c + 1] * jitter), jitter - 1)
        out_anchors[c, 0], out_anchors[c, 1] = t * inverse[p, c], 0
        shapes[c, 0], shapes[c, 1] = t, t


@do_not_convert
def _tiles_setup(outs, ins):
    for i in range(len(outs[0])):
        outs[0][i][0], outs[1][i][0], outs[5][i][0] = 2, 2, 1
        for o in range(2, 5):
            outs[o][i][0], outs[o][i][1] = 9, 2


_tiles_op = register_op("tiles", _tiles_run, _tiles_setup,
                        [types.FLOAT, types.FLOAT, types.INT32, types.INT32, types.INT32, types.INT64],
                        [types.INT64, types.FLOAT, types.FLOAT, types.INT32], [1, 1, 2, 2, 2, 1], [1, 2, 1, 2])


@register("pipeline", "jigsaw")
class Jigsaw:
    name = "jigsaw"

    def __init__(self, permutations=2000, geometry: str = "goyal", dtype: str = "float32"):
        check_choice("geometry", geometry, tuple(GEOMETRIES))
        check_choice("dtype", dtype, tuple(TORCH_DTYPES))
        self.geometry = GEOMETRIES[geometry].validate()
        self.geometry_name, self.dtype = geometry, dtype
        self.perms = load_permutations(permutations)
        geo = self.geometry
        rule = ViewRule(square=geo.crop / geo.resize, flip_p=geo.flip_p).validate()
        self._prm = np.array(rule.row(0) + [geo.cell, geo.tile, geo.jitter], np.float32)
        self._inverse = np.argsort(self.perms, axis=1).astype(np.int32)       # P[p]^-1
        cells = [[(c % GRID) * geo.cell, (c // GRID) * geo.cell] for c in range(N_TILES)]
        self._cells = torch.tensor(cells, dtype=torch.int32)
        self.source = os.fspath(permutations) if isinstance(permutations, (str, os.PathLike)) else int(permutations)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.perms)

    def describe(self) -> dict:
        return {"pipeline": self.name, "geometry": self.geometry_name, "spec": asdict(self.geometry),
                "permutations": self.source, "num_permutations": self.num_classes, "dtype": self.dtype}

    def graph(self, g: GraphInputs) -> dict:
        t = self.geometry.tile
        img = A.decode(g.jpg, g.device, g.hw_decoder_load)
        u = A.uniforms(1, extra=EXTRA_U)
        start, end, in_anchors, out_anchors, shapes, perm = _tiles_op()(
            g.shape, u, types.Constant(self._prm, device="cpu"), types.Constant(self._inverse, device="cpu"))
        crop = A.resized_crop(img, start, end, self.geometry.crop, g.device)               # [crop, crop, 3]
        # Without `in_ids` each input of multi_paste supplies one region (DALI 2.4), so the crop is
        # passed once per tile.
        strip = fn.multi_paste(*([crop] * N_TILES), in_anchors=in_anchors, shapes=shapes, out_anchors=out_anchors,
                               output_size=[N_TILES * t, t], device=g.device)           # [9t, t, 3] uint8
        out = {"strip": strip, "perm": perm, "u": u}
        if g.with_params:
            out.update({"params.crop": crop, "params.roi.start": start, "params.roi.end": end,
                        "params.in_anchors": in_anchors})
        return out

    def postprocess(self, batch: dict) -> dict:
        geo, strip = self.geometry, batch.pop("strip")
        uniforms = batch.pop("u")
        u = uniforms[:, 0]
        hwc = strip.view(strip.shape[0], N_TILES, geo.tile, geo.tile, 3)
        tiles = A.channels_first(hwc)                                            # [B, 9, 3, t, t]
        gray = u[:, VIEW_U["gray"]] < geo.gray_p
        if geo.gray_p > 0:
            tiles = A.grayscale(tiles, hwc, gray)
        if geo.tile_norm:
            tiles = self._tile_norm(tiles, u)
        else:
            tiles = A.normalize(tiles, self.mean, self.std)
        batch["tiles"] = tiles.to(TORCH_DTYPES[self.dtype])
        batch["perm"] = batch["perm"].view(-1).long()
        if "params.roi.start" in batch:
            batch["params.window"], batch["params.flip"] = A.windows(batch.pop("params.roi.start"),
                                                                     batch.pop("params.roi.end"))
            batch["params.gray"] = gray
            batch["params.u"] = uniforms
            batch["params.offsets"] = batch.pop("params.in_anchors") - self._cells.to(tiles.device)
            batch["params.order"] = torch.from_numpy(self.perms).to(tiles.device)[batch["perm"]]   # (params only)
        return batch

    def _tile_norm(self, tiles: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Noroozi: per tile and channel x * U(scale) + U(shift), clamped, then (x - mean) / sqrt(var + 1)
        over the tile's pixels (the epsilon, in grey levels^2, keeps flat tiles finite)."""
        geo, shape = self.geometry, (-1, N_TILES, 3, 1, 1)
        (s0, s1), (h0, h1) = geo.jitter_scale, geo.jitter_shift
        scale = s0 + (s1 - s0) * u[:, JIG_U["scale"]:JIG_U["scale"] + 3 * N_TILES].reshape(shape)
        shift = h0 + (h1 - h0) * u[:, JIG_U["shift"]:JIG_U["shift"] + 3 * N_TILES].reshape(shape)
        x = (tiles * scale + shift).clamp_(0.0, 255.0)
        var, mean = torch.var_mean(x, dim=(-2, -1), keepdim=True, correction=0)
        return (x - mean) / torch.sqrt(var + 1.0)
