"""Trunk weights in and out: VISSL checkpoints -> our models, our trunks -> torchvision/timm-layout files.

    python -m sslkit.convert vissl model_final_checkpoint_phase199.torch --arch resnet50 --out rn50.pth
    python -m sslkit.convert export runs/dcv2 --out dcv2-trunk.pth --out dcv2-trunk.safetensors
    python -m sslkit.convert export runs/student --with-classifier --out student.pth

VISSL keeps the trunk at `classy_state_dict -> base_model -> model -> trunk` (each level is optional
here: a dict that is already the trunk, or has `trunk.*` keys, works too). Its ResNe(X)t trunk wraps
torchvision's modules in `_feature_blocks` (`_feature_blocks.conv1.weight`, `_feature_blocks.layer1.
0.bn1.running_mean`, ...), so the prefix is dropped; its AlexNet trunks are `_feature_blocks.N...`
exactly as ours, so their keys are kept. Every key must be used and every weight of the model filled:
anything else is a KeyMismatchError that lists the keys.

Exports are the trunk's state_dict: `.pth` via torch.save, `.safetensors` with metadata `arch`,
`kwargs` (JSON) and `input`, so that `load_trunk` / `python -m sslkit.eval --ckpt FILE` need no --arch
for it. Files are written like any other file (mode 0644 under the usual umask 022), and an existing
output is refused unless --overwrite. What each trunk loads into:

- RGB ResNet/ResNeXt trunks: torchvision's and timm's key names. The trunk alone loads with
  `torchvision.models.resnet50().load_state_dict(sd, strict=False)` (only `fc.*` is missing) or
  `timm.create_model("resnet50", num_classes=0).load_state_dict(sd)`.
  `--with-classifier` (a `supervised` run: teacher, pseudo-label student, fine-tuned student) adds its
  classifier as `fc.weight`/`fc.bias`, so the file loads strictly into
  `torchvision.models.resnet50(num_classes=C)` or `timm.create_model("resnet50", num_classes=C)`; the
  class names (from the training data's manifest) go into the safetensors metadata as `classes`.
  torchvision has no resnext101_32x4d/32x16d constructor: build `torchvision.models.resnet.ResNet(
  Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4 or 16)`; timm has both names.
  `resnet_tiny` (our CPU smoke-test net) has no torchvision/timm counterpart: sslkit.models only.
- Colorization trunks (1-channel stem, input L - 50 of Lab): torchvision key names with a
  [64, 1, 7, 7] `conv1.weight`, so they load into `timm.create_model(arch, in_chans=1, num_classes=0)`
  (or torchvision's with `conv1` replaced by a 1-channel conv); `last_stride=1` trunks also need
  layer4's first block at stride 1 (a stride change, not dilation), and every input must be L - 50,
  not RGB. `sslkit.trunk.load_trunk` does both. They have no classifier: --with-classifier refuses.
- AlexNet trunks (`alexnet_jigsaw`, `alexnet_colorization`): VISSL's layout, `_feature_blocks.N...`
  keys (Goyal'19's BN AlexNets; torchvision's AlexNet is another network: no BN, other widths, so
  there is no torchvision/timm target). They load into `sslkit.models.create(arch)` and, nested under
  a VISSL checkpoint's `trunk`, into VISSL. --with-classifier refuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# torch and the model zoo are imported inside the functions that use them, so that `--help` (which
# runs this file) answers in well under a second.
from .errors import SslkitError

INPUTS = ("rgb", "L")              # = sslkit.trunk.INPUTS (which imports torch)
SAFETENSORS_EXT = ".safetensors"   # = sslkit.trunk.SAFETENSORS_EXT
VISSL_NESTING = ("classy_state_dict", "base_model", "model", "trunk")
VISSL_PREFIX = "_feature_blocks."
CLASSIFIER = "classifier."        # the `supervised` method's Linear in a checkpoint's model
FC_KEYS = ("fc.weight", "fc.bias")  # torchvision's / timm's ResNet classifier


class ConvertError(SslkitError):
    """A file that cannot be converted as asked (one line)."""


def vissl_trunk_state(obj: dict, what: str = "checkpoint") -> dict:
    """The trunk's tensors of a VISSL checkpoint, keys as VISSL names them (`_feature_blocks...`)."""
    import torch
    d = obj
    for level in VISSL_NESTING:
        if isinstance(d, dict) and level in d and isinstance(d[level], dict):
            d = d[level]
    if not isinstance(d, dict):
        raise ConvertError(f"{what}: not a VISSL checkpoint (no dict of weights under {' -> '.join(VISSL_NESTING)})")
    if not any(k.startswith(VISSL_PREFIX) for k in d) and any(k.startswith("trunk." + VISSL_PREFIX) for k in d):
        d = {k[len("trunk."):]: v for k, v in d.items() if k.startswith("trunk.")}
    tensors = {k: v for k, v in d.items() if torch.is_tensor(v)}
    if not any(k.startswith(VISSL_PREFIX) for k in tensors):
        raise ConvertError(f"{what}: no `{VISSL_PREFIX}*` trunk weights found (keys start with "
                           f"{', '.join(sorted({k.split('.')[0] for k in d})[:6])})")
    return tensors


def keeps_feature_blocks(model) -> bool:
    """True for trunks whose own keys are VISSL's (`_feature_blocks.N...`: the AlexNets)."""
    return hasattr(model, "_feature_blocks")


def vissl_to_ours(state: dict, model) -> dict:
    """Rename VISSL trunk keys to `model`'s (torchvision) names."""
    if keeps_feature_blocks(model):
        return dict(state)
    # non-trunk-prefixed keys are kept as they are, so that they show up as unexpected in the check
    return {(k[len(VISSL_PREFIX):] if k.startswith(VISSL_PREFIX) else k): v for k, v in state.items()}


def ours_to_vissl(state: dict, model) -> dict:
    """Inverse of `vissl_to_ours`, nested as a VISSL checkpoint (for writing VISSL-layout files)."""
    trunk = dict(state) if keeps_feature_blocks(model) else {VISSL_PREFIX + k: v for k, v in state.items()}
    return {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}


def import_vissl(path: str, arch: str, kwargs: dict | None = None, input: str | None = None,
                 trust_pickle: bool = False):
    """Read a VISSL checkpoint into our `arch` trunk (strict: every key used, every weight filled).
    Returns (model in eval mode, TrunkSpec)."""
    import torch

    from .trunk import TrunkSpec, build_trunk, infer_kwargs, load_weights, weights_identity
    if not os.path.exists(path):
        raise ConvertError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - unreadable input is a one-line user error
        hint = "" if trust_pickle else " (if you trust the file, --trust-pickle unpickles arbitrary objects)"
        raise ConvertError(f"{path}: torch.load failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                           f"{hint}") from None
    vissl = vissl_trunk_state(obj, path)
    probe = build_trunk(arch, kwargs)
    ours = vissl_to_ours(vissl, probe)
    kwargs = infer_kwargs(arch, dict(kwargs or {}), ours)
    model = load_weights(build_trunk(arch, kwargs), ours, path)
    if input is None:
        input = "L" if getattr(model, "in_channels", 3) == 1 else "rgb"
    spec = TrunkSpec(arch, kwargs, input, os.path.abspath(path),
                     identity=weights_identity(arch, kwargs, input, model.state_dict()))
    return model.eval(), spec


# -- what an export is: layout and the frameworks it loads into ----------------------------------------
def layout(model, spec) -> str:
    """`torchvision` (RGB ResNe(X)ts, with or without `fc`), `torchvision-1ch` (colorization ResNets:
    1-channel stem, input L - 50) or `vissl-alexnet` (`_feature_blocks.N` keys)."""
    if keeps_feature_blocks(model):
        return "vissl-alexnet"
    return "torchvision-1ch" if spec.input == "L" or getattr(model, "in_channels", 3) == 1 else "torchvision"


def target_note(model, spec, num_classes: int | None = None) -> str:
    """One line: what the exported file loads into (see the module docstring)."""
    kind = layout(model, spec)
    if kind == "vissl-alexnet":
        return (f"VISSL layout (_feature_blocks.N keys): loads into sslkit.models.create({spec.arch!r}) or a VISSL "
                "AlexNet trunk; torchvision/timm have no such network")
    if spec.arch == "resnet_tiny":
        return "sslkit.models.create('resnet_tiny', ...) only (a CPU smoke-test net: no torchvision/timm counterpart)"
    if kind == "torchvision-1ch":
        return (f"timm.create_model({spec.arch!r}, in_chans=1, num_classes=0) (stride and L - 50 input: see "
                "`python -m sslkit.convert --help`); sslkit.trunk.load_trunk rebuilds it exactly")
    if num_classes:
        return (f"strict load into torchvision.models.{spec.arch}(num_classes={num_classes}) or "
                f"timm.create_model({spec.arch!r}, num_classes={num_classes})")
    return (f"torchvision.models.{spec.arch}() with strict=False (fc missing) or "
            f"timm.create_model({spec.arch!r}, num_classes=0)")


# -- a supervised run's classifier ---------------------------------------------------------------------
def _read_mapped(file: str):
    """The checkpoint or state dict in `file`, tensors memory-mapped where the file allows it (cheap to
    read a second time: only the tensors used are paged in; files in torch's legacy format are read
    whole). Pickled objects only from our own `global.pt`."""
    import torch
    first = ""
    for weights_only in (True, False) if os.path.basename(file) == "global.pt" else (True,):
        for mmap in (True, False):
            try:
                return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=mmap)
            except Exception as e:  # noqa: BLE001 - unreadable input is a one-line user error
                if not mmap:   # the reason without the mmap attempt's own complaint
                    first = first or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    raise ConvertError(f"{file}: cannot be read as a state dict or checkpoint ({first})")


def _checkpoint_classifier(file: str) -> tuple[dict, list[str] | None]:
    """({"fc.weight", "fc.bias"}, class names) from a train.py checkpoint's `classifier.*` weights."""
    g = _read_mapped(file)
    model = g.get("model") or {}
    fc = {"fc." + k[len(CLASSIFIER):]: v for k, v in model.items() if k.startswith(CLASSIFIER)}
    if set(fc) != set(FC_KEYS):
        method = (g.get("config") or {}).get("method")
        raise ConvertError(f"{file}: a {method!r} checkpoint holds no classifier (classifier.weight/bias); "
                           "--with-classifier exports `supervised` runs (teacher, pseudo-label student, fine-tuned)")
    from .pseudolabel.teacher import class_names
    names, source = class_names(g, int(fc["fc.weight"].shape[0]), file)
    return fc, (names if source.endswith(".json") else None)


def _file_classifier(file: str) -> tuple[dict, dict, dict]:
    """(trunk state, fc state, safetensors metadata) of a classifier file (.pth/.safetensors with fc.*)."""
    import torch

    from .trunk import read_safetensors
    state, meta = read_safetensors(file) if file.endswith(SAFETENSORS_EXT) else (_read_mapped(file), {})
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConvertError(f"{file}: not a state dict of tensors")
    fc = {k: state[k] for k in FC_KEYS if k in state}
    if len(fc) != len(FC_KEYS):
        raise ConvertError(f"{file}: no fc.weight/fc.bias: a trunk without classifier (drop --with-classifier)")
    return {k: v for k, v in state.items() if k not in FC_KEYS}, fc, meta


def load_classifier(src: str, arch: str | None = None):
    """(full model with `fc`, TrunkSpec, class names or None) of a `supervised` run or checkpoint, or of
    a classifier file (re-export). Refuses trunks that have no torchvision/timm classifier."""
    import json as _json

    from . import models
    from .trunk import load_state_file, load_trunk, resolve_checkpoint
    file = resolve_checkpoint(src)
    checkpoint = os.path.basename(file) == "global.pt"
    if checkpoint:
        trunk, spec = load_trunk(file)
    else:
        state, fc, meta = _file_classifier(file)
        classes = _json.loads(meta["classes"]) if "classes" in meta else None
        kwargs = _json.loads(meta["kwargs"]) if "kwargs" in meta else None
        trunk, spec = load_state_file(file, arch or meta.get("arch"), kwargs, meta.get("input"), state=state)
    kind = layout(trunk, spec)
    if kind != "torchvision":
        what = ("an AlexNet trunk (VISSL `_feature_blocks.N` keys)" if kind == "vissl-alexnet" else
                "a 1-channel colorization trunk (input L)")
        raise ConvertError(f"{src}: {what} has no torchvision/timm classifier; export the trunk without "
                           "--with-classifier")
    if checkpoint:
        fc, classes = _checkpoint_classifier(file)
    w, b = fc["fc.weight"], fc["fc.bias"]
    if w.ndim != 2 or w.shape[1] != trunk.num_features or tuple(b.shape) != (w.shape[0],):
        raise ConvertError(f"{src}: classifier {tuple(w.shape)} + bias {tuple(b.shape)} does not fit {spec.arch}'s "
                           f"{trunk.num_features} features")
    full = models.create(spec.arch, num_classes=int(w.shape[0]), **spec.kwargs)
    full.load_state_dict({**trunk.state_dict(), "fc.weight": w, "fc.bias": b}, strict=True)
    if classes is not None and len(classes) != w.shape[0]:
        classes = None
    return full.eval(), spec, classes


# -- writing ---------------------------------------------------------------------------------------
def _file_mode() -> int:
    """What open() gives a new file: 0666 less the process' umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def export(model, spec, path: str, classes: list[str] | None = None) -> str:
    """Write `model`'s state dict (a trunk, or a classifier with `fc`) to `path` (.pth/.pt or
    .safetensors, atomically, mode 0666 & ~umask). Safetensors metadata: arch, kwargs, input, source,
    format (see `layout`), producer, and num_classes + classes for classifiers."""
    import torch
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(SAFETENSORS_EXT):
        from safetensors.torch import save_file
        meta = {"arch": spec.arch, "kwargs": json.dumps(spec.kwargs, sort_keys=True), "input": spec.input,
                "source": spec.source, "format": layout(model, spec), "producer": "sslkit.convert"}
        if "fc.weight" in state:
            meta["num_classes"] = str(state["fc.weight"].shape[0])
            if classes:
                meta["classes"] = json.dumps(list(classes))
        save_file(state, tmp, metadata=meta)
    elif path.endswith((".pth", ".pt")):
        torch.save(state, tmp)
    else:
        raise ConvertError(f"{path}: unknown export format; use .pth, .pt or .safetensors")
    os.chmod(tmp, _file_mode())   # safetensors creates its files 0600
    os.replace(tmp, path)
    return path


def _kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"--arch-kwargs {text!r}: not JSON ({e})") from None
    if not isinstance(val, dict):
        raise ConvertError(f"--arch-kwargs {text!r}: expected a JSON object")
    return val


def check_outputs(outs: list[str], overwrite: bool) -> None:
    """Before any work: known extensions, and no existing file replaced unless asked."""
    for out in outs:
        if not out.endswith((".pth", ".pt", SAFETENSORS_EXT)):
            raise ConvertError(f"{out}: unknown export format; use .pth, .pt or .safetensors")
        if os.path.exists(out) and not overwrite:
            raise ConvertError(f"{out}: exists; pass --overwrite to replace it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslkit.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("vissl", help="import a VISSL checkpoint's trunk and write it in torchvision layout")
    s.add_argument("src", help="VISSL checkpoint (.torch/.pth)")
    s.add_argument("--arch", required=True, help="our architecture for it (resnet50, alexnet_jigsaw, ...)")
    s.add_argument("--arch-kwargs", help='constructor kwargs as JSON, e.g. \'{"last_stride": 1}\' for the '
                                         'colorization RN50 (in_channels is read off the weights)')
    s.add_argument("--input", choices=INPUTS, help="rgb or L (default: L for 1-channel trunks)")
    s.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in the file (default: tensors and plain containers)")
    _outputs(s)
    s = sub.add_parser("export", help="write a run's or checkpoint's trunk (or classifier) in torchvision/timm layout")
    s.add_argument("src", help="run folder, checkpoint folder, global.pt, or a .pth/.safetensors to re-export")
    s.add_argument("--arch", help="only for a .pth source (checkpoints name their architecture)")
    s.add_argument("--with-classifier", action="store_true",
                   help="a `supervised` run (teacher, pseudo-label student): the trunk plus its classifier as "
                        "fc.weight/fc.bias, a whole torchvision/timm classifier")
    _outputs(s)
    return p


def _outputs(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", action="append", required=True,
                   help="output file(s), .pth or .safetensors by extension; repeat for several")
    s.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args.out, args.overwrite)
        classes = None
        if args.cmd == "vissl":
            model, spec = import_vissl(args.src, args.arch, _kwargs(args.arch_kwargs), args.input, args.trust_pickle)
        elif args.with_classifier:
            model, spec, classes = load_classifier(args.src, arch=args.arch)
        else:
            from .trunk import load_trunk
            model, spec = load_trunk(args.src, arch=args.arch)
        n = sum(t.numel() for t in model.state_dict().values())
        num_classes = getattr(model, "num_classes", 0) or None
        for out in args.out:
            export(model, spec, out, classes)
            kw = f" {json.dumps(spec.kwargs)}" if spec.kwargs else ""
            head = f" + fc ({num_classes} classes)" if num_classes else ""
            print(f"wrote {out}: {spec.arch}{kw}{head}, input {spec.input}, "
                  f"{len(model.state_dict())} tensors, {n:,} values (identity {spec.identity})")
        print(f"loads into: {target_note(model, spec, num_classes)}")
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
