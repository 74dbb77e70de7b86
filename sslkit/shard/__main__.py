"""python -m sslkit.shard {build,index,verify,info,merge}: see `--help` of each."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..config import parse_size
from ..errors import SslkitError
from ..runlock import os_reason
from .manifest import IMAGE_EXTS, LABEL_SOURCES


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    return i, n


def part_from_env(env) -> tuple[int, int]:
    """A Slurm array task or a torchrun rank picks its slice; a plain run is the whole (0/1)."""
    for i, n in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if env.get(i) and env.get(n) and int(env[n]) > 1:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if i.startswith("SLURM") else 0
            part = int(env[i]) - first, int(env[n])
            print(f"--part {part[0]}/{part[1]} from {i}/{n}", file=sys.stderr)
            return part
    return 0, 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslkit.shard",
                                description="Build, check and inspect WebDataset shards for sslkit.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_build_args, _index_args, _verify_args, _info_args, _merge_args):
        add(sub)
    return p


def _build_args(sub):
    b = sub.add_parser("build", help="turn image folders, file lists, idx files or the sample corpus into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Decode and validate every image once, convert it to an RGB JPEG and write "
                                   "tar shards with DALI index files and a manifest. Re-running the same command "
                                   "after a kill finishes the build; complete shards are kept.")
    b.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder (recursive), a .tsv/.csv/.txt file list, an *-images-idx3-ubyte[.gz] file "
                        "(labels found beside it), or sample[:N] (the embedded corpus, N=2000 by default)")
    b.add_argument("--out", required=True, help="output folder (e.g. shards/mydata)")
    b.add_argument("--prefix", default="shard", help="shard file name prefix: PREFIX-000000.tar")
    b.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    b.add_argument("--max-size", type=parse_size, default=1_000_000_000, help="bytes per shard at most (e.g. 1G)")
    b.add_argument("--shuffle", action="store_true",
                   help="globally shuffle before writing (recommended: DALI only shuffles within a buffer)")
    b.add_argument("--seed", type=int, default=0, help="shuffle seed; also seeds the sample corpus")
    b.add_argument("--resize-max", type=int, default=None, metavar="PIXELS",
                   help="downscale images whose longer side exceeds this (aspect kept); e.g. 500 for ImageNet-like")
    b.add_argument("--quality", type=int, default=90, help="JPEG quality when an image must be re-encoded")
    b.add_argument("--force-reencode", action="store_true",
                   help="re-encode every image at --quality (default: RGB JPEGs that need no change pass through)")
    b.add_argument("--min-size", type=int, default=16, help="reject images whose shorter side is below this")
    b.add_argument("--max-pixels", type=parse_size, default=100_000_000,
                   help="reject images above this many pixels (decompression bombs), checked before decoding")
    b.add_argument("--labels", choices=["auto", "dirs", "none"], default="auto",
                   help="dirs: first-level subfolders are classes; auto: label columns, idx labels and the "
                        "sample corpus' photo names are used when present; none: unlabelled")
    b.add_argument("--path-column", default="path",
                   help="file lists: column with image paths, a header name or a 0-based number (no header)")
    b.add_argument("--label-column", default=None, help="file lists: column with class names")
    b.add_argument("--root", default=None, help="file lists: base of relative paths (default: the list's folder)")
    b.add_argument("--skip", type=int, default=0, metavar="N",
                   help="leave out the first N items of the sources, in source order (before --shuffle); with "
                        "--limit, disjoint splits of one source (e.g. --limit 1000, then --skip 1000 --limit 10000)")
    b.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N items of the sources (after --skip), in source order (before --shuffle): "
                        "a quick, deterministic subset")
    b.add_argument("--part", type=_part, default=(0, 1), metavar="I/N",
                   help="build only the I-th (0-based) of N disjoint slices; combine with `merge`")
    b.add_argument("--overwrite", action="store_true",
                   help="build into a folder that holds other files or another dataset: files named like this "
                        "build's shards, manifest and rejected.tsv are replaced, nothing else is touched")
    b.add_argument("--workers", type=int, default=0, help="decode/encode processes (0: one per core)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")



def _index_args(sub):
    x = sub.add_parser("index", help="adopt WebDataset tars written by other tools in place (no copy, no re-encode)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Read each tar once (headers and sha256, no decode) and write a manifest, DALI "
                                   "index files and per-sample tables to --out; nothing inside or beside the tars "
                                   "changes. Works on img2dataset output, webdataset.ShardWriter output and "
                                   "ImageNet-22K's per-synset tars. --out may be the tars' own folder. Re-running "
                                   "the same command after a kill continues where it stopped.")
    x.add_argument("sources", nargs="+", metavar="SOURCE", help="tar files, or folders searched for *.tar (sorted)")
    x.add_argument("--out", required=True, help="where the manifest and index files go (the tars' folder: in place)")
    x.add_argument("--image-ext", default=",".join(IMAGE_EXTS),
                   help="image members to use, in order of preference when a sample has several (any case)")
    x.add_argument("--label", choices=LABEL_SOURCES, default="auto",
                   help="cls: the integer `cls` member; json: --label-field of the `json` member; shard: the tar's "
                        "name (ImageNet-22K's n01440764.tar); auto: cls when the first tar has it, else none")
    x.add_argument("--label-field", default=None, metavar="NAME", help="with --label json: the field (a.b nests)")
    x.add_argument("--class-names", default=None, metavar="FILE",
                   help="with integer labels: one class name per line, line i naming class i (default: 0..C-1)")
    x.add_argument("--full", action="store_true", help="also decode every image; undecodable ones are rejected")
    x.add_argument("--part", type=_part, default=None, metavar="I/N",
                   help="index only the I-th (0-based) of N slices of the tar list, then `merge`; default: from "
                        "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or RANK/WORLD_SIZE when set, else 0/1")
    x.add_argument("--workers", type=int, default=0, help="tars read in parallel (0: one per core)")
    x.add_argument("--no-progress", action="store_true", help="no progress display")



def _verify_args(sub):
    v = sub.add_parser("verify", help="check counts, checksums and index files against the manifest")
    v.add_argument("dir")
    v.add_argument("--full", action="store_true", help="also decode every image and parse every label/metadata")
    v.add_argument("--workers", type=int, default=1, help="shards checked in parallel")
    v.add_argument("--no-progress", action="store_true", help="no progress display")



def _info_args(sub):
    i = sub.add_parser("info", help="counts, classes and the image-size distribution of a shard folder")
    i.add_argument("dir")
    i.add_argument("--limit", type=int, default=10_000, help="samples read for the size statistics")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")



def _merge_args(sub):
    m = sub.add_parser("merge", help="write one dataset (global, dense sample indices) from parts/builds")
    m.add_argument("dirs", nargs="+", help="shard folders, e.g. the outputs of --part 0/4 ... 3/4")
    m.add_argument("--out", required=True, help="output folder: new, empty, or holding only the inputs (adopted "
                                                "parts: any folder without sslkit's files, e.g. the tars' own)")
    m.add_argument("--prefix", default=None, help="shard name prefix (default: the parts' prefix)")
    m.add_argument("--allow-duplicates", action="store_true",
                   help="merge even when inputs share samples (the same tar, or a source file in two builds)")
    m.add_argument("--no-progress", action="store_true")


def main(argv=None) -> int:
    """The command line. Exit status as every sslkit command: 0 when done, 2 for a bad setting or input
    (one `error: ...` line, a file that cannot be read or written included), 1 for an internal failure
    (with its traceback)."""
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `shard info DIR | head`: the reader left; say nothing more (and keep Python from complaining
        # about the closed stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = e.filename or ""
        print(f"error: {where + ': ' if where else ''}{os_reason(e)}", file=sys.stderr)
        return 2


def _run(args) -> int:
    """The command, its modules imported only now (numpy, PIL: --help stays fast)."""
    if args.cmd == "build":
        from .build import BuildOptions, build
        from .images import ImageOptions
        from .sources import SourceOptions
        build(BuildOptions(
            sources=tuple(args.sources), out=args.out, prefix=args.prefix, max_count=args.max_count,
            max_size=args.max_size, shuffle=args.shuffle, seed=args.seed, part=args.part, skip=args.skip,
            limit=args.limit, source=SourceOptions(labels=args.labels, path_column=args.path_column,
                                                   label_column=args.label_column, root=args.root, seed=args.seed),
            image=ImageOptions(resize_max=args.resize_max, quality=args.quality, min_size=args.min_size,
                               max_pixels=args.max_pixels, force_reencode=args.force_reencode),
            workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite))
    elif args.cmd == "index":
        from .adopt import IndexOptions, index
        if args.label_field and args.label == "auto":
            args.label = "json"
        index(IndexOptions(sources=tuple(args.sources), out=args.out,
                           image_ext=tuple(e.strip().lower() for e in args.image_ext.split(",") if e.strip()),
                           label=args.label, label_field=args.label_field, class_names=args.class_names,
                           full=args.full, part=args.part or part_from_env(os.environ), workers=args.workers,
                           progress=not args.no_progress))
    elif args.cmd == "verify":
        from .check import verify
        s = verify(args.dir, full=args.full, workers=args.workers, progress=False if args.no_progress else None)
        extra = f", {s['decoded']} images decoded" if args.full else ""
        print(f"{args.dir}: OK ({s['total']} samples in {s['shards']} shards{extra})")
    elif args.cmd == "info":
        from .check import collect_info, format_info
        info = collect_info(args.dir, limit=args.limit)
        if args.json:
            info = {k: v for k, v in info.items() if k != "manifest"} | {
                "total": info["manifest"]["total"], "classes": info["manifest"]["classes"]}
            print(json.dumps(info, indent=1))
        else:
            print(format_info(args.dir, info))
    elif args.cmd == "merge":
        from .merge import merge
        merge(args.dirs, args.out, prefix=args.prefix, progress=not args.no_progress,
              allow_duplicates=args.allow_duplicates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
