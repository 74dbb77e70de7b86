"""Shard folders written the way other tools write them, from real photographs, for `shard index` tests.

- `write_shardwriter`: webdataset's own `ShardWriter`, `__key__` + jpg/png/webp + integer `cls`;
- `write_shardwriter_json`: the same writer, `jpeg` + a JSON member holding the label name;
- `write_img2dataset`: img2dataset's layout, `00000.tar` of `000000000.jpg/.txt/.json`, with a
  `.parquet` and a `_stats.json` beside each tar (their contents are never read by sslkit; the parquet
  file is a stand-in with Parquet's magic bytes, since pyarrow is not a dependency);
- `write_imagenet22k`: one plain tar per synset, `n01440764.tar` of `n01440764_10026.JPEG`;
- `write_broken`: a tar cut inside a member, a sample with no image and a duplicated key.
Each returns the truth the tests check against: per sample (tar, key) -> label, in stored order.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

CLASSES = ("astronaut", "cat", "coffee", "rocket")


def crops(photos: dict, n: int, seed: int, size: int = 72):
    """`n` (label id, RGB crop) pairs of real photos, cycling over CLASSES."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(CLASSES)
        img = photos[CLASSES[c]]
        h, w = img.shape[:2]
        s = int(min(h, w) * rng.uniform(0.4, 0.9))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = Image.fromarray(img[y:y + s, x:x + s]).resize((size, size))
        yield c, crop


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt.lower()], quality=90)
    return buf.getvalue()


def write_shardwriter(root: str, photos: dict, per_tar: int = 12) -> list[tuple[str, str, int]]:
    """Three tars by webdataset.ShardWriter: jpg+cls, png+cls, webp+cls. Returns [(tar, key, label)]."""
    import webdataset as wds
    os.makedirs(root, exist_ok=True)
    truth = []
    fmts = ("jpg", "png", "webp")
    with wds.ShardWriter(os.path.join(root, "shard-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for i, (c, img) in enumerate(crops(photos, per_tar * len(fmts), seed=1)):
            fmt = fmts[i // per_tar]
            key = f"sample{i:05d}"
            sink.write({"__key__": key, fmt: encode(img, fmt), "cls": c})
            truth.append((os.path.join(root, f"shard-{i // per_tar:06d}.tar"), key, c))
    return truth


def write_shardwriter_json(root: str, photos: dict, n: int = 16, seed: int = 2) -> list[tuple[str, str, str]]:
    """One tar by webdataset.ShardWriter: jpeg + json {"label": name, ...}."""
    import webdataset as wds
    os.makedirs(root, exist_ok=True)
    truth = []
    with wds.ShardWriter(os.path.join(root, "part-%06d.tar"), maxcount=n, verbose=0) as sink:
        for i, (c, img) in enumerate(crops(photos, n, seed=seed)):
            key = f"img{i:04d}"
            sink.write({"__key__": key, "jpeg": encode(img, "jpeg"),
                        "json": {"label": CLASSES[c], "meta": {"i": i}}})
            truth.append((os.path.join(root, "part-000000.tar"), key, CLASSES[c]))
    return truth


def write_img2dataset(root: str, photos: dict, shards: int = 2, per_tar: int = 10) -> list[tuple[str, str, str]]:
    """img2dataset's output layout: 00000.tar (000000000.jpg/.txt/.json), 00000.parquet, 00000_stats.json."""
    os.makedirs(root, exist_ok=True)
    truth = []
    it = crops(photos, shards * per_tar, seed=3)
    for s in range(shards):
        tar_path = os.path.join(root, f"{s:05d}.tar")
        with tarfile.open(tar_path, "w") as tar:
            for j in range(per_tar):
                c, img = next(it)
                key = f"{s:05d}{j:04d}"
                caption = f"a photo of a {CLASSES[c]}, number {j}"
                meta = {"url": f"https://example.org/{key}.jpg", "key": key, "status": "success",
                        "caption": caption, "width": img.width, "height": img.height}
                for ext, data in (("jpg", encode(img, "jpg")), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                truth.append((tar_path, key, caption))
        with open(os.path.join(root, f"{s:05d}.parquet"), "wb") as f:
            f.write(b"PAR1" + bytes(64) + b"PAR1")
        with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_tar, "successes": per_tar}, f)
    return truth


def write_imagenet22k(root: str, photos: dict, per_synset: int = 8) -> list[tuple[str, str, str]]:
    """Per-synset plain tars as ImageNet-22K is downloaded: n<wnid>.tar of n<wnid>_<k>.JPEG."""
    os.makedirs(root, exist_ok=True)
    synsets = {"n01440764": "astronaut", "n02123045": "cat", "n07920052": "coffee", "n04099969": "rocket"}
    truth = []
    for wnid, photo in sorted(synsets.items()):   # the order `shard index` reads a folder in
        tar_path = os.path.join(root, f"{wnid}.tar")
        with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
            for k, (_, img) in enumerate(crops({CLASSES[0]: photos[photo]} | {c: photos[photo] for c in CLASSES},
                                               per_synset, seed=int(wnid[1:]) % 1000)):
                data = encode(img, "jpeg")
                info = tarfile.TarInfo(f"{wnid}_{10000 + k}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                truth.append((tar_path, f"{wnid}_{10000 + k}", wnid))
    return truth


def write_broken(root: str, photos: dict) -> dict:
    """good.tar (6 samples), cut.tar (cut inside its 4th image), odd.tar (a text-only sample and a key
    that comes back later). Returns what indexing must find."""
    os.makedirs(root, exist_ok=True)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    pics = [encode(img, "jpg") for _, img in crops(photos, 12, seed=4)]
    with tarfile.open(os.path.join(root, "good.tar"), "w") as tar:
        for k in range(6):
            add(tar, f"g{k}.jpg", pics[k])
            add(tar, f"g{k}.cls", str(k % 2).encode())
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for k in range(4):
            add(tar, f"c{k}.jpg", pics[6 + k])
            add(tar, f"c{k}.cls", b"1")
    data = full.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        cut_at = next(m for m in t if m.name == "c3.jpg").offset_data + 100
    with open(os.path.join(root, "cut.tar"), "wb") as f:
        f.write(data[:cut_at])
    with tarfile.open(os.path.join(root, "odd.tar"), "w") as tar:
        add(tar, "o0.jpg", pics[10])
        add(tar, "o0.cls", b"0")
        add(tar, "o1.txt", b"a caption and no image")
        add(tar, "o1.cls", b"1")
        add(tar, "o2.jpg", pics[11])
        add(tar, "o2.cls", b"1")
        add(tar, "o0.jpg", pics[0])
        add(tar, "o0.cls", b"0")
    return {"good": 6 + 3 + 2, "rejected": {"cut.tar:c3": "ends inside", "odd.tar:o1": "no image member",
                                             "odd.tar:o0": "duplicated key"}}
