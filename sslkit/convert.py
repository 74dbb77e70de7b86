"""Trunk weights in and out: VISSL checkpoints -> our models, our trunks -> torchvision-layout files.

    python -m sslkit.convert vissl model_final_checkpoint_phase199.torch --arch resnet50 --out rn50.pth
    python -m sslkit.convert export runs/dcv2 --out dcv2-trunk.pth --out dcv2-trunk.safetensors

VISSL keeps the trunk at `classy_state_dict -> base_model -> model -> trunk` (each level is optional
here: a dict that is already the trunk, or has `trunk.*` keys, works too). Its ResNe(X)t trunk wraps
torchvision's modules in `_feature_blocks` (`_feature_blocks.conv1.weight`, `_feature_blocks.layer1.
0.bn1.running_mean`, ...), so the prefix is dropped; its AlexNet trunks are `_feature_blocks.N...`
exactly as ours, so their keys are kept. Every key must be used and every weight of the model filled:
anything else is a KeyMismatchError that lists the keys.

Exports are the trunk's state_dict, which has torchvision's key names (and timm's, for ResNets):
`.pth` via torch.save (load with `torchvision.models.resnet50().load_state_dict(sd, strict=False)`:
only `fc.*` is missing), `.safetensors` with metadata `arch`, `kwargs` (JSON) and `input`, so that
`load_trunk` / `python -m sslkit.eval --ckpt FILE` need no --arch for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

from .errors import SslkitError
from .trunk import (INPUTS, SAFETENSORS_EXT, TrunkSpec, infer_kwargs, build_trunk, load_trunk,
                    load_weights, weights_identity)

VISSL_NESTING = ("classy_state_dict", "base_model", "model", "trunk")
VISSL_PREFIX = "_feature_blocks."


class ConvertError(SslkitError):
    """A file that cannot be converted as asked (one line)."""


def vissl_trunk_state(obj: dict, what: str = "checkpoint") -> dict:
    """The trunk's tensors of a VISSL checkpoint, keys as VISSL names them (`_feature_blocks...`)."""
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


def keeps_feature_blocks(model: nn.Module) -> bool:
    """True for trunks whose own keys are VISSL's (`_feature_blocks.N...`: the AlexNets)."""
    return hasattr(model, "_feature_blocks")


def vissl_to_ours(state: dict, model: nn.Module) -> dict:
    """Rename VISSL trunk keys to `model`'s (torchvision) names."""
    if keeps_feature_blocks(model):
        return dict(state)
    # non-trunk-prefixed keys are kept as they are, so that they show up as unexpected in the check
    return {(k[len(VISSL_PREFIX):] if k.startswith(VISSL_PREFIX) else k): v for k, v in state.items()}


def ours_to_vissl(state: dict, model: nn.Module) -> dict:
    """Inverse of `vissl_to_ours`, nested as a VISSL checkpoint (for writing VISSL-layout files)."""
    trunk = dict(state) if keeps_feature_blocks(model) else {VISSL_PREFIX + k: v for k, v in state.items()}
    return {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}


def import_vissl(path: str, arch: str, kwargs: dict | None = None, input: str | None = None,
                 trust_pickle: bool = False) -> tuple[nn.Module, TrunkSpec]:
    """Read a VISSL checkpoint into our `arch` trunk (strict: every key used, every weight filled)."""
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


def export(model: nn.Module, spec: TrunkSpec, path: str) -> str:
    """Write the trunk's torchvision-layout state dict to `path` (.pth/.pt or .safetensors)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith(SAFETENSORS_EXT):
        from safetensors.torch import save_file
        meta = {"arch": spec.arch, "kwargs": json.dumps(spec.kwargs, sort_keys=True), "input": spec.input,
                "source": spec.source, "format": "torchvision", "producer": "sslkit.convert"}
        save_file(state, tmp, metadata=meta)
    elif path.endswith((".pth", ".pt")):
        torch.save(state, tmp)
    else:
        raise ConvertError(f"{path}: unknown export format; use .pth, .pt or .safetensors")
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
    s.add_argument("--out", action="append", required=True,
                   help="output file(s), .pth or .safetensors by extension; repeat for several")
    s = sub.add_parser("export", help="write a run's or checkpoint's trunk in torchvision layout")
    s.add_argument("src", help="run folder, checkpoint folder, global.pt, or a .pth/.safetensors to re-export")
    s.add_argument("--arch", help="only for a .pth source (checkpoints name their architecture)")
    s.add_argument("--out", action="append", required=True,
                   help="output file(s), .pth or .safetensors by extension; repeat for several")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "vissl":
            model, spec = import_vissl(args.src, args.arch, _kwargs(args.arch_kwargs), args.input, args.trust_pickle)
        else:
            model, spec = load_trunk(args.src, arch=args.arch)
        n = sum(t.numel() for t in model.state_dict().values())
        for out in args.out:
            export(model, spec, out)
            kw = f" {json.dumps(spec.kwargs)}" if spec.kwargs else ""
            print(f"wrote {out}: {spec.arch}{kw}, input {spec.input}, "
                  f"{len(model.state_dict())} tensors, {n:,} values (identity {spec.identity})")
    except SslkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
