"""The one trunk loader: `load_trunk(path) -> (model, TrunkSpec)` for evaluation, export and the
teacher; `build_trunk` for the methods' fresh trunks; `init_from` for a fine-tuning run's start.

`path` can be
- a run folder (`--out` of train.py): its newest complete checkpoint that verifies against its
  checksums (`sslkit.ckpt.global_file`: a corrupt newer one is skipped with one warning);
- a checkpoint folder (`<out>/checkpoints/step-XXXXXXXX`) or its `global.pt`;
- a torchvision-layout state dict, `.pth`/`.pt` or `.safetensors` (what `python -m sslkit.convert`
  writes); `.pth` files carry no architecture, so pass `arch=` (safetensors carry it as metadata);
  a full torchvision/timm ResNet checkpoint loads too: its classifier `fc.*` is dropped;
- "random": the architecture `arch` at its (seeded) initialisation, the baseline of every evaluation.

Only rank 0's `global.pt` is read: the trunk's weights are the `backbone.*` entries of its `model`
(torchvision key names after the prefix), and the world size and per-rank files play no part.
`global.pt["trunk"] = {"arch", "kwargs", "input"}` says how to rebuild it; older checkpoints without
it mean `{"arch": config["arch"], "kwargs": {}, "input": "rgb"}`. `input == "L"` marks trunks that
see the L channel of Lab (colorization), fed as L - 50.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from . import ckpt, models
from .errors import SslkitError

INPUTS = ("rgb", "L")
BACKBONE_PREFIX = "backbone."
SAFETENSORS_EXT = ".safetensors"
CLASSIFIER_KEYS = {"fc.weight", "fc.bias"}   # torchvision's / timm's ResNet classifier


class TrunkError(SslkitError):
    """A trunk that cannot be found, built or loaded (one line)."""


class KeyMismatchError(TrunkError):
    """Weights whose keys or shapes do not match the model; the message lists them."""


@dataclass(frozen=True)
class TrunkSpec:
    """What a trunk is and where its weights came from."""
    arch: str
    kwargs: dict
    input: str                  # "rgb" or "L" (L - 50 of Lab, computed from the RGB crop)
    source: str                 # the file the weights came from, or "random"
    identity: str = ""          # hash of arch, kwargs, input and every weight: the feature-cache key
    step: int | None = None     # training step of a checkpoint
    method: str | None = None   # pretraining method of a checkpoint
    seed: int | None = None     # the seed of a random initialisation

    def to_dict(self) -> dict:
        return asdict(self)

    def trunk_entry(self) -> dict:
        """The `trunk` entry of the checkpoint contract."""
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "input": self.input}


def build_trunk(arch: str, kwargs: dict | None = None) -> nn.Module:
    """`sslkit.models.create(arch, num_classes=0, **kwargs)`, with one-line errors."""
    kwargs = dict(kwargs or {})
    if "num_classes" in kwargs:
        raise TrunkError(f"trunk kwargs must not set num_classes (a trunk has no classifier): {kwargs}")
    try:
        return models.create(arch, num_classes=0, **kwargs)
    except (ValueError, TypeError) as e:
        raise TrunkError(f"cannot build {arch!r} with {kwargs}: {e}") from None


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: dict, what: str) -> None:
    """Raise KeyMismatchError listing missing, unexpected and wrongly shaped keys. A missing BatchNorm
    `num_batches_tracked` is not an error: it is a step counter that converted checkpoints often lack
    and torch itself fills in."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {len(shapes)} (file vs model): {_names(shapes, 4)}")
    if problems:
        raise KeyMismatchError(f"{what} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_weights(model: nn.Module, state: dict, what: str) -> nn.Module:
    """Strict load after `check_state_dict` (missing num_batches_tracked counters start at 0)."""
    check_state_dict(model, state, what)
    own = model.state_dict()
    full = {k: state.get(k, own[k]) for k in own}
    model.load_state_dict(full, strict=True)
    return model


def weights_identity(arch: str, kwargs: dict, input: str, state: dict) -> str:
    """sha256 over the trunk's definition and every tensor (name, dtype, shape, bytes): two files with
    the same weights share features; any changed weight gives a new identity."""
    h = hashlib.sha256(json.dumps({"arch": arch, "kwargs": kwargs, "input": input}, sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _infer_input(model: nn.Module, input: str | None) -> str:
    if input is None:
        # one input channel is the L of Lab: the colorization trunks are the only 1-channel ones
        input = "L" if getattr(model, "in_channels", 3) == 1 else "rgb"
    if input not in INPUTS:
        raise TrunkError(f"input={input!r}: choose from {', '.join(INPUTS)}")
    return input


def _finish(model: nn.Module, spec: TrunkSpec, device) -> tuple[nn.Module, TrunkSpec]:
    spec = replace(spec, identity=weights_identity(spec.arch, spec.kwargs, spec.input, model.state_dict()))
    return model.to(device).eval(), spec


def random_trunk(arch: str, kwargs: dict | None = None, input: str | None = None, seed: int = 0,
                 device="cpu") -> tuple[nn.Module, TrunkSpec]:
    """The architecture at its initialisation under `torch.manual_seed(seed)` (the trainer seeds the
    same way before building the method, so seed 0 is usually the run's own starting point)."""
    if not arch:
        raise TrunkError("a random trunk needs an architecture (--arch)")
    kwargs = dict(kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_trunk(arch, kwargs)
    return _finish(model, TrunkSpec(arch, kwargs, _infer_input(model, input), "random", seed=seed), device)


def resolve_checkpoint(path: str) -> str:
    """A run folder, a checkpoint folder or a file -> the file to read (a TrunkError otherwise). A
    checkpoint's file is checked against its checksums; in a run folder a newer checkpoint that fails
    them is skipped with one warning (`sslkit.ckpt.global_file`)."""
    if not os.path.isdir(path) and not os.path.exists(path):
        raise TrunkError(f"{path}: no such file or folder")
    try:
        return ckpt.global_file(path) if os.path.isdir(path) else ckpt.verified_global(path)
    except ckpt.CheckpointError as e:
        raise TrunkError(str(e)) from None


def trunk_entry(g: dict, what: str) -> dict:
    """The checkpoint's `trunk` entry, or the fallback built from its config."""
    entry = g.get("trunk")
    if entry is None:
        arch = (g.get("config") or {}).get("arch")
        if not arch:
            raise TrunkError(f"{what}: no `trunk` entry and no config.arch: cannot tell the architecture")
        entry = {"arch": arch, "kwargs": {}, "input": "rgb"}
    return {"arch": entry["arch"], "kwargs": dict(entry.get("kwargs") or {}), "input": entry.get("input", "rgb")}


def backbone_state(model_state: dict, what: str) -> dict:
    """The `backbone.*` entries of a method's state_dict, prefix stripped."""
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}
    if not state:
        raise TrunkError(f"{what}: the model holds no `{BACKBONE_PREFIX}*` weights")
    return state


def _load_checkpoint(g: dict, what: str, device) -> tuple[nn.Module, TrunkSpec]:
    entry = trunk_entry(g, what)
    model = build_trunk(entry["arch"], entry["kwargs"])
    load_weights(model, backbone_state(g["model"], what), what)
    spec = TrunkSpec(entry["arch"], entry["kwargs"], _infer_input(model, entry["input"]), os.path.abspath(what),
                     step=g.get("step"), method=(g.get("config") or {}).get("method"))
    return _finish(model, spec, device)


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(path), meta


def infer_kwargs(arch: str, kwargs: dict, state: dict) -> dict:
    """Fill in `in_channels` from the stem's weight when the caller did not give it (a 1-channel
    colorization trunk then loads with --arch alone). Strides cannot be read off weights."""
    if "in_channels" in kwargs:
        return kwargs
    stem = state.get("conv1.weight", state.get("_feature_blocks.0.0.weight"))
    if stem is not None and stem.ndim == 4:
        default = getattr(build_trunk(arch, kwargs), "in_channels", 3)
        if stem.shape[1] != default:
            return {**kwargs, "in_channels": int(stem.shape[1])}
    return kwargs


def load_state_file(path: str, arch: str | None, kwargs: dict | None, input: str | None,
                    device="cpu", state: dict | None = None) -> tuple[nn.Module, TrunkSpec]:
    """A torchvision-layout state dict (.pth/.pt or .safetensors, or `state` already read from
    `path`) -> our trunk."""
    meta = {}
    if state is None and path.endswith(SAFETENSORS_EXT):
        state, meta = read_safetensors(path)
    elif state is None:
        state = _torch_load(path)
    try:
        state = ckpt.unwrap_state_dict(state, path)   # {"state_dict": ...}, {"model": ...}, `module.` keys
    except ckpt.CheckpointError:
        raise TrunkError(f"{path}: not a state dict of tensors (a train.py checkpoint is a global.pt)") from None
    arch = arch or meta.get("arch")
    if not arch:
        raise TrunkError(f"{path}: a torchvision-layout file does not say its architecture; pass --arch")
    kwargs = dict(kwargs) if kwargs is not None else json.loads(meta.get("kwargs", "{}"))
    kwargs = infer_kwargs(arch, kwargs, state)
    model = build_trunk(arch, kwargs)
    if CLASSIFIER_KEYS & set(state) and not CLASSIFIER_KEYS & set(model.state_dict()):
        # a full torchvision/timm classifier checkpoint: the trunk is all but its `fc`
        state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
    model = load_weights(model, state, path)
    spec = TrunkSpec(arch, kwargs, _infer_input(model, input or meta.get("input")), os.path.abspath(path))
    return _finish(model, spec, device)


def load_trunk(path: str, device="cpu", arch: str | None = None, kwargs: dict | None = None,
               input: str | None = None, seed: int = 0) -> tuple[nn.Module, TrunkSpec]:
    """Trunk in eval mode on `device` and its TrunkSpec, from any of the sources in the module doc.
    `arch`/`kwargs`/`input` are needed for "random" and plain `.pth` files only."""
    if path == "random":
        return random_trunk(arch, kwargs, input, seed, device)
    file = resolve_checkpoint(path)
    if file.endswith(SAFETENSORS_EXT):
        return load_state_file(file, arch, kwargs, input, device)
    obj = _torch_load(file)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        model, spec = _load_checkpoint(obj, file, device)
        if arch and arch != spec.arch:
            raise TrunkError(f"{file} holds a {spec.arch} trunk, not {arch} (drop --arch for checkpoints)")
        return model, spec
    return load_state_file(file, arch, kwargs, input, device, state=obj)


def _torch_load(file: str):
    """torch.load restricted to tensors and plain containers; only our own `global.pt` (which holds
    the config and optimiser state) may fall back to full unpickling, as sslkit.ckpt.load does."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a one-line user error
        first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    if os.path.basename(file) == "global.pt":
        try:
            return torch.load(file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    raise TrunkError(f"{file}: cannot be read as a state dict or checkpoint ({first[:200]})")


def init_from(method: nn.Module, source: str, log=None):
    """Start a fresh run from another run's weights: every tensor of its model whose name and shape
    match `method`'s (the trunk at least; e.g. a student's trunk and classifier for fine-tuning).
    `source` is a run or checkpoint folder, a `global.pt` (verified as `resolve_checkpoint` does), or a
    trunk's state dict in torchvision layout (bare or in the usual wrappers, `ckpt.unwrap_state_dict`)."""
    file = resolve_checkpoint(source) if os.path.isdir(source) or os.path.basename(source) == "global.pt" else source
    obj = _torch_load(file)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        theirs = obj["model"]
    else:
        try:
            theirs = {BACKBONE_PREFIX + k: v for k, v in ckpt.unwrap_state_dict(obj, file).items()}
        except ckpt.CheckpointError as e:
            raise TrunkError(f"init_from={e}") from None
    mine = method.state_dict()
    taken = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    if not any(k.startswith(BACKBONE_PREFIX) for k in taken):
        raise TrunkError(f"init_from={file}: no trunk weights of this architecture (backbone.*) in its model")
    method.load_state_dict(taken, strict=False)
    if log is not None:
        left = sorted({k.split(".")[0] for k in mine} - {k.split(".")[0] for k in taken})
        log.info("initialised %d of %d tensors from %s%s", len(taken), len(mine), file,
                 f" (kept fresh: {', '.join(left)})" if left else "")
