"""Run configuration: frozen dataclasses, named presets, strict `--set key=value` overrides.

A run's config is `TrainConfig` plus the method's own options dataclass (`method_options`). Every
value can be overridden from the command line; an unknown key or a value of the wrong type is a
one-line error before any work starts. The resolved config is saved, as a plain dict, in every
checkpoint and in `<out>/config.json`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class MonitorConfig:
    # the online kNN monitor (sslkit.monitor): rank 0 evaluates the trunk while the other ranks wait
    data: str | None = None          # labelled shard folder to monitor (None: no monitor); without `train`, its even
                                     # sample indices are the neighbours and the odd ones the queries
    train: str | None = None         # labelled shard folder of the neighbours instead (all of `data` are then queries)
    every: int = 1                   # epochs between evaluations (the last epoch is always evaluated)
    k: int = 20                      # neighbours of the weighted vote (temperature 0.07, as sslkit.eval knn)
    size: int = 224                  # centre crop side of the monitor's images (e.g. 32 or 64 for small images)
    resize: int = 256                # shorter side before the crop (>= size)
    batch_size: int = 256            # images per feature-extraction batch


@dataclass(frozen=True)
class TrainConfig:
    # Every field's trailing comment is its meaning: docs/CONFIG.md is generated from them
    # (`python -m sslkit.config > docs/CONFIG.md`; tests/test_config.py checks it is in sync). A comment
    # line indented under a field's comment continues it; one at the class' indent starts a section.
    # run
    method: str = "deepclusterv2"    # the SSL method, by its registry name (`sslkit-train --list-presets`)
    preset: str | None = None        # the method's named recipe applied over these defaults (None: its default one)
    data: str = "shards/sample"      # shard folder (`sslkit-shard build`, or adopted shards with a manifest)
    arch: str = "resnet50"           # backbone from sslkit.models (resnet50, resnet_tiny, ...)
    epochs: int = 100                # passes over the data set
    batch_size: int = 64             # images per rank per micro-batch: per step unless accum_steps > 1
                                     # (--global-batch-size divides a global one)
    out: str = "runs/default"        # run folder: checkpoints/, config.json, log.jsonl, tb/ (the command line's
                                     # default: runs/<method>-<preset>)
    device: str = "auto"             # auto (cuda if torch sees a GPU) | cpu | cuda
    seed: int = 0                    # seeds torch (plus the rank) and the loader's shuffles and augmentations
    init_from: str | None = None     # run folder or checkpoint whose weights start a fresh run (fine-tuning)
    # optimisation (lr is per 256 images and scaled linearly with the global batch, accumulation included)
    optimizer: str = "lars"          # lars | sgd
    lr: float = 0.3                  # peak learning rate per 256 images (x global batch / 256)
    schedule: str = "cosine"         # cosine (to lr * final_lr_ratio) | multistep (x gamma at milestones)
    final_lr_ratio: float = 0.001    # cosine: the last step's lr as a fraction of the peak
    milestones: tuple[int, ...] = ()  # epochs, for schedule=multistep
    gamma: float = 0.1               # multistep: lr factor at each milestone
    warmup_epochs: int = 10          # epochs of linear warm-up to the peak lr (must be below epochs)
    warmup_start_lr: float | None = None  # absolute; default: lr (the per-256 value, as swav does)
    momentum: float = 0.9            # SGD/LARS momentum
    nesterov: bool = False           # Nesterov momentum
    weight_decay: float = 1e-6       # L2 weight decay
    exclude_norm_bias_wd: bool = False  # no weight decay (nor LARS adaptation) on norm layers and biases
    accum_steps: int = 1             # micro-batches per optimiser step (gradient accumulation): global batch =
                                     # ranks x batch_size x accum_steps; an epoch's last step takes what is left
    clip_grad: float = 0.0           # clip the gradients' total L2 norm to this before each step (0: off); the
                                     # pre-clip norm is logged as grad_norm either way
    # system
    precision: str = "auto"          # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (with a grad scaler) | fp32
    channels_last: bool = True       # channels-last memory format for the model and images (GPU only)
    sync_bn: bool = False            # synchronised batch norm across ranks (torch.nn.SyncBatchNorm)
    compile: bool = False            # torch.compile the model (slower start, often faster steps on GPU)
    loader_threads: int = 0          # DALI threads per rank (0: the rank's share of the cores, at most 4 on GPU)
    torch_threads: int = 0           # torch intra-op threads per rank (0: OMP_NUM_THREADS if set, else the
                                     # rank's share of the cores minus DALI's threads, at least 1)
    loader_prefetch: int = 2         # batches the DALI pipeline prepares ahead of the trainer
    hw_decoder_load: float | None = None  # share of JPEGs for the GPU's hardware decoder, 0..1 (None: 1.0 on
                                          # Hopper and newer, 0.65 before)
    use_mmap: bool = True            # memory-map the shards; false for shards on a network file system
    shuffle_buffer: int = 4096       # samples shuffled together in a rank's slice of each epoch (<= 1: stored order)
    dist_timeout_s: int = 600        # a collective waiting longer than this means a hung rank: fail loudly
    # bookkeeping
    log_every: int = 10              # steps between log records (the loss is read and the stop flag agreed then)
    ckpt_every: int = 10             # epochs between periodic checkpoints that are never pruned (0: none)
    keep_ckpts: int = 2              # newest checkpoints kept besides the periodic ones (>= 2: a fallback)
    tensorboard: bool = False        # also write the log records to <out>/tb (needs the [tensorboard] extra)
    monitor: MonitorConfig = MonitorConfig()  # the online kNN monitor, `--set monitor.data=DIR` (see below)
    method_options: Any = None       # the method's own frozen dataclass (see the tables below)


def _coerce(value: Any, annotation, where: str):
    """Type-check/convert a parsed override against a field's annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a tuple/list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(obj, overrides: dict[str, Any], where: str = ""):
    """Return `obj` (a frozen dataclass) with dotted overrides applied; strict on names and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    direct, nested = {}, {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown option {where}{head!r}; known: {', '.join(sorted(names))}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif isinstance(value, dict) and is_dataclass(getattr(obj, head)):  # a saved sub-config: its fields
            nested.setdefault(head, {}).update(value)
        else:
            direct[head] = value
    changes = {}
    for name, value in direct.items():
        if isinstance(value, str) and hints[name] is not str:
            if not _is_str_union(hints[name]):
                value = _parse_value(value)
            elif value.lower() in ("none", "null"):   # str | None: the one non-string spelling
                value = None
        changes[name] = _coerce(value, hints[name], f"{where}{name}")
    for name, sub in nested.items():
        current = changes.get(name, getattr(obj, name))
        if not is_dataclass(current):
            raise ConfigError(f"{where}{name} has no sub-options")
        changes[name] = apply_overrides(current, sub, f"{where}{name}.")
    return replace(obj, **changes)


def _is_str_union(annotation) -> bool:
    return str in typing.get_args(annotation) and all(a in (str, type(None)) for a in typing.get_args(annotation))


def parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. method_options.temperature=0.2")
        out[key.strip()] = value.strip()
    return out


def parse_size(text: str) -> int:
    """A byte or pixel count for the command line: 1000000, 1e9, 500M, 1G, 1.5GB."""
    import argparse
    t = text.strip().upper().rstrip("B")
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1G, 500M, 1e9)") from None


# -- device words: torch calls the accelerator "cuda" (TrainConfig.device), DALI and sslkit.threads "gpu"
_DALI_DEVICES = {"cuda": "gpu", "cpu": "cpu"}


def dali_device(device) -> str:
    """DALI's word ("gpu" | "cpu") for a torch device: a torch.device or its name ("cuda", "cuda:1", "cpu")."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind not in _DALI_DEVICES:
        raise ConfigError(f"device {str(device)!r}: expected cuda or cpu")
    return _DALI_DEVICES[kind]


def torch_device_type(dali: str) -> str:
    """torch's device type ("cuda" | "cpu") for DALI's word ("gpu" | "cpu")."""
    kinds = {v: k for k, v in _DALI_DEVICES.items()}
    if dali not in kinds:
        raise ConfigError(f"device {dali!r}: expected gpu or cpu")
    return kinds[dali]


def to_dict(cfg) -> dict:
    def conv(v):
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)


# -- a run's starting point: a method's preset, or a saved config ---------------------------------
def preset_config(method: str, preset: str | None) -> TrainConfig:
    """The method's defaults with its preset (named, else the method's default one) applied."""
    from .recipes import method_entry  # the methods' options and presets: no torch
    entry = method_entry(method)
    cfg = TrainConfig(method=method, method_options=entry.meta["options"]())
    preset = preset or entry.meta.get("default_preset")
    if preset is not None:
        presets = entry.meta["presets"]
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {method}; choose from {', '.join(presets)}")
        cfg = apply_overrides(replace(cfg, preset=preset), presets[preset].overrides)
    return cfg


def load_config(path: str) -> TrainConfig:
    """A saved config (config.json as a run writes it) as a TrainConfig, strictly: an unknown field or
    a value of the wrong type is a one-line error naming the file. Fields it lacks (a config saved
    by an older version) keep their defaults."""
    from .recipes import method_entry  # no torch
    try:
        with open(path) as f:
            saved = json.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("method"), str):
        raise ConfigError(f"--config {path}: expected a JSON object with a \"method\" (a run's config.json)")
    flat = {}
    for key, value in saved.items():   # nested options (method_options, monitor) as dotted keys
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    cfg = TrainConfig(method=saved["method"], method_options=method_entry(saved["method"]).meta["options"]())
    try:
        return apply_overrides(cfg, flat)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None


# -- the generated reference (docs/CONFIG.md) ------------------------------------------------------
def field_docs(cls) -> list[tuple[str, str, str, str, str]]:
    """(section, field, type, default, meaning) of a dataclass' fields, the meanings and sections read
    from the comments in its source (see TrainConfig); a field without a comment has meaning ""."""
    import inspect
    import re

    lines = inspect.getsource(cls).splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("class ")):]
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip())
    field_re = re.compile(r"(\w+): [^=#]+?(?: = [^#]+?)?\s*(?:#\s?(.*))?$")
    section, meaning, last = "", {}, None
    sections = {}
    for line in lines[1:]:
        stripped, col = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if col > indent and last is not None:      # a continued meaning
                meaning[last] = f"{meaning[last]} {text}".strip()
            elif col == indent:
                section, last = text, None
            continue
        m = field_re.match(stripped) if col == indent else None
        last = m.group(1) if m else None
        if m:
            meaning[last], sections[last] = (m.group(2) or "").strip(), section
    hints = {f.name: f for f in fields(cls)}
    rows = []
    for name, f in hints.items():
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((sections.get(name, ""), name, kind, json.dumps(to_dict(default)), meaning.get(name, "")))
    return rows


def config_reference() -> str:
    """docs/CONFIG.md: every TrainConfig field, then every method's options (sslkit.recipes)."""
    from .recipes import list_methods, method_entry

    def table(rows, prefix=""):
        out, section = [], None
        for sec, name, kind, default, meaning in rows:
            if sec != section and sec:
                out += ["", f"**{sec[0].upper() + sec[1:]}**", ""]
            if sec != section or not out:
                out += ["| field | type | default | meaning |", "|---|---|---|---|"]
            section = sec
            cell = meaning.replace("|", "\\|")
            out.append(f"| `{prefix}{name}` | `{kind.replace('|', chr(92) + '|')}` | `{default}` | {cell} |")
        return out

    text = ["# Configuration reference", "",
            "<!-- generated by `python -m sslkit.config > docs/CONFIG.md` from sslkit/config.py and the "
            "methods' option classes in sslkit/recipes/: edit those, then regenerate (tests/test_config.py "
            "checks) -->", "",
            "A run's config is `TrainConfig` plus its method's options (`method_options`). Precedence, weakest "
            "first: these defaults < the method's preset (`--preset`, or a saved `--config run/config.json` "
            "instead of both) < the flags (`--epochs`, `--lr`, ...) < `--set key=value` (any field below; "
            "`--set method_options.key=value` for the method's). `sslkit-train ... --print-config` prints the "
            "result as JSON without running anything; every run saves it as `<out>/config.json`.", "",
            "## TrainConfig", *table(field_docs(TrainConfig)), "",
            "## The online kNN monitor (`monitor.*`)", "",
            "Logged as `kind: monitor` records in log.jsonl (docs/LOGS.md). Every rank waits while rank 0 "
            "evaluates, so one evaluation must finish within `dist_timeout_s`.",
            *table(field_docs(MonitorConfig), "monitor.")]
    for method in list_methods():
        options = method_entry(method).meta["options"]
        text += ["", f"## `{method}` options (`method_options.*`, class `{options.__name__}`)", "",
                 *table(field_docs(options), "method_options.")]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")


__all__ = ["ConfigError", "MonitorConfig", "TrainConfig", "apply_overrides", "config_reference", "dali_device", "dumps",
           "field_docs", "load_config", "parse_set", "parse_size", "preset_config", "to_dict", "torch_device_type"]
