"""Build the realistic benchmark corpus: ImageNet-like JPEGs cut from large real photographs.

The photographs come from Debian wallpaper/game packages (the packages bench/fetch_debian_data.sh downloads),
fetched with `apt-get download` (no installation) into .cache/data. Each output image is a random
crop (log-uniform area 5..100%, aspect 3:5..5:3), resized so the longer side is 500 px and saved
at JPEG quality 90 -- the same recipe as the embedded `sample` corpus, on ~40 large photos.

    python bench/make_corpus.py --out .cache/bench/photos --count 5000
    python -m sslkit.shard build .cache/bench/photos --out shards/bench --shuffle

`--originals DIR` also links the untouched photographs (2.6-16 MP) into DIR, for measuring the
shard builder's resize path.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sslkit.shard.sample_corpus import imagenet_like_crop  # noqa: E402

PACKAGES = ["plasma-workspace-wallpapers", "mate-backgrounds", "lomiri-wallpapers-16.04",
            "lomiri-wallpapers-20.04", "palapeli-data"]
# Photographs only (the packages also hold rendered art).
PHOTOS = (
    [f"usr/share/wallpapers/{n}/contents/images/2560x1600.jpg" for n in
     "BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path "
     "summer_1am".split()]
    + ["usr/share/wallpapers/Volna/contents/images/5120x2880.jpg"]
    + [f"usr/share/backgrounds/mate/nature/{n}.jpg" for n in
       "Aqua Blinds Dune FreshFlower Garden GreenMeadow LadyBird RainDrops Storm TwoWings Wood YellowFlower".split()]
    + [f"usr/share/backgrounds/{n}.jpg" for n in
       "Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace Picture_1A_by_freespace "
       "Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi analogpattern_by_Peter_Nerlich free_by_Peter_Nerlich "
       "friends_by_Aitzol_Berasategi greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi "
       "picosdeeuropa_by_Aitzol_Berasategi seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi "
       "Kleiber_by_Lukas_Baubkus".split()]
    + [f"usr/share/palapeli/collection/{n}.jpg" for n in
       "castle-maintenon cincinnati-bridge citrus-fruits european-honey-bee panther-chameleon-female".split()]
)
MAX_SIDE = 2560  # photos are decoded at most this large: crops are downscaled to 500 px anyway


def photo_paths(data: str) -> list[str]:
    root = os.path.join(data, "root")
    paths = [os.path.join(root, p) for p in PHOTOS]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} photos missing, e.g. {missing[0]}")
    return paths


def _load(path: str) -> np.ndarray:
    with Image.open(path) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG DCT scaling: fast decode of 16 MP photos
        im = im.convert("RGB")
        if max(im.size) > MAX_SIDE:
            s = MAX_SIDE / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
        return np.asarray(im)


def _render(args):
    photo_no, path, jobs, out = args
    img = _load(path)
    for i, seed in jobs:
        with open(os.path.join(out, f"img_{i:06d}.jpg"), "wb") as f:
            f.write(imagenet_like_crop(img, np.random.default_rng([seed, i])))
    return len(jobs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the generated JPEGs")
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=".cache/data", help="where the Debian packages are unpacked")
    p.add_argument("--originals", default=None, help="also symlink the original photos into this folder")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    fetch = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fetch_debian_data.sh")
    subprocess.run([fetch, args.data, *PACKAGES], check=True)
    paths = photo_paths(args.data)
    os.makedirs(args.out, exist_ok=True)
    per_photo = [[] for _ in paths]
    for i in range(args.count):
        per_photo[i % len(paths)].append((i, args.seed))
    with mp.Pool(args.workers) as pool:
        n = sum(pool.imap_unordered(_render, [(k, p, j, args.out) for k, (p, j) in enumerate(zip(paths, per_photo))]))
    if args.originals:
        os.makedirs(args.originals, exist_ok=True)
        for k, path in enumerate(paths):
            link = os.path.join(args.originals, f"photo_{k:02d}.jpg")
            if not os.path.exists(link):
                os.symlink(os.path.abspath(path), link)
    sizes = [os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)]
    print(f"{args.out}: {n} ImageNet-like JPEGs from {len(paths)} photographs, "
          f"{np.mean(sizes) / 1e3:.1f} KB on average")


if __name__ == "__main__":
    main()
