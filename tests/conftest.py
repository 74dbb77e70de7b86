"""Shared fixtures: real photographs from pip packages, broken files, and small shard folders."""

from __future__ import annotations

import io
import logging
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.shard import BuildOptions, ImageOptions, SourceOptions, build
from sslkit.shard.sample_corpus import PHOTOS, photo_path
from sslkit.shard.sources import fashion_mnist_dir as find_fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(autouse=True)
def isolated_sslkit_logger():
    """`sslkit.log.get_logger` sets up the process's "sslkit" logger (as logging.basicConfig would) when a
    test runs the trainer in-process; restore it after each test, so the next test's CLI output does not
    depend on which tests ran before it in the same process."""
    log = logging.getLogger("sslkit")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved

def real_photos() -> dict[str, np.ndarray]:
    """The colour and gray photographs that scikit-image / scikit-learn ship, as RGB uint8 arrays."""
    out = {}
    for p in PHOTOS:
        with Image.open(photo_path(p)) as im:
            out[p.name] = np.asarray(im.convert("RGB"))
    return out


def jpeg_bytes(img, quality=90, **kw) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def exif_rotated_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(im, exif=exif.tobytes())


@pytest.fixture(scope="session")
def photos():
    return real_photos()


def write_photo_folder(root: str, photos: dict[str, np.ndarray], crops_per_photo: int = 3) -> dict:
    """An ImageNet-style tree `root/<class>/*.{jpg,png}` of real photo crops, plus the odd and
    broken files a real collection has. Returns the expected outcome of building it."""
    rng = np.random.default_rng(0)
    classes = {"animals": ["cat", "astronaut", "coffee"], "things": ["rocket", "motorcycle", "flower"],
               "scenes": ["temple", "galaxies", "retina", "tissue"]}
    good = 0
    for cls, names in classes.items():
        d = os.path.join(root, cls)
        os.makedirs(d, exist_ok=True)
        for name in names:
            img = photos[name]
            h, w = img.shape[:2]
            for k in range(crops_per_photo):
                ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = img[y:y + ch, x:x + cw]
                ext = ".JPEG" if k % 2 == 0 else ".png"
                with open(os.path.join(d, f"{name}_{k}{ext}"), "wb") as f:
                    f.write(jpeg_bytes(crop) if ext == ".JPEG" else png_bytes(Image.fromarray(crop)))
                good += 1
    odd = os.path.join(root, "things")
    cat = photos["cat"]
    # Odd but valid inputs: all must come out as 8-bit RGB JPEGs.
    Image.fromarray(cat).convert("CMYK").save(os.path.join(odd, "cmyk.jpg"), quality=90)
    Image.fromarray(cat).convert("L").save(os.path.join(odd, "gray.jpg"), quality=90)
    gray16 = (np.asarray(Image.fromarray(cat).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(os.path.join(odd, "gray16.png"))
    rgba = Image.fromarray(cat).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(cat.shape[1]) % 256).astype(np.uint8)[None].repeat(cat.shape[0], 0)))
    rgba.save(os.path.join(odd, "rgba.png"))
    Image.fromarray(cat).convert("P", palette=Image.Palette.ADAPTIVE).save(os.path.join(odd, "palette.png"))
    with open(os.path.join(odd, "rotated.jpg"), "wb") as f:
        f.write(exif_rotated_jpeg(cat, 6))
    good += 6
    # Broken inputs: each must be rejected with a reason, never crash the build.
    full = jpeg_bytes(photos["coffee"])
    with open(os.path.join(odd, "truncated.jpg"), "wb") as f:
        f.write(full[: len(full) // 2])
    with open(os.path.join(odd, "notes.jpg"), "w") as f:
        f.write("this is a text file with a .jpg name\n")
    open(os.path.join(odd, "empty.jpg"), "wb").close()
    with open(os.path.join(odd, "tiny.png"), "wb") as f:
        f.write(png_bytes(Image.fromarray(cat[:8, :8])))
    with open(os.path.join(odd, "README.txt"), "w") as f:  # not an image extension: ignored, counted
        f.write("readme")
    rejected = {"truncated.jpg": "truncated", "notes.jpg": "not an image", "empty.jpg": "empty",
                "tiny.png": "too small"}
    return {"good": good, "rejected": rejected, "ignored": 1, "classes": sorted(classes)}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory, photos):
    root = str(tmp_path_factory.mktemp("photos"))
    expected = write_photo_folder(root, photos)
    return root, expected


def write_idx(path: str, arr: np.ndarray):
    """Write an MNIST-format idx file (uint8)."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape))
        f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def fashion_mnist_dir() -> str:
    """Where `make test` put the Debian dataset-fashion-mnist files (or the system install)."""
    d = find_fashion_mnist()
    if d is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found: run `make test` (it fetches the Debian package dataset-fashion-mnist into "
            ".cache/data) or set SSLKIT_FASHION_MNIST to the folder holding t10k-images-idx3-ubyte.gz")
    return d


def build_small(out: str, sources=("sample:96",), **kw) -> dict:
    """A small shard folder for pipeline tests (several shards, labelled, shuffled)."""
    image = kw.pop("image", ImageOptions())
    source = kw.pop("source", SourceOptions())
    opts = dict(max_count=32, shuffle=True, seed=0, workers=1, progress=False)
    opts.update(kw)
    return build(BuildOptions(sources=tuple(sources), out=out, image=image, source=source, **opts))


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """96 embedded-corpus samples in 3 shards of 32: the default data of pipeline tests."""
    out = str(tmp_path_factory.mktemp("sample_shards") / "s")
    build_small(out)
    return out


def sgd_losses(module, batches: list, steps: int = 20, lr: float = 0.05) -> list[float]:
    """The loss of each of `steps` SGD steps (momentum 0.9) of `module`, cycling over `batches`."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        out = module(batches[step % len(batches)])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def assert_step_moves(module, batch, weight):
    """One SGD step on `batch` gives a finite loss and changes `weight` (a parameter of `module`)."""
    before = weight.detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    loss = module(batch)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, weight)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is as fast and never oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def descendants(pid: int) -> list[int]:
    """Every descendant process of `pid` (from /proc): the ranks under a torchrun, or under `script`."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def environ(pid: int) -> dict[str, str]:
    """The environment of process `pid` ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in items if "=" in item)
