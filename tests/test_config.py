"""sslkit.config on its own: strict dotted overrides, type checks and conversions, round trips."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from sslkit.config import ConfigError, TrainConfig, apply_overrides, dumps, parse_set, preset_config, to_dict
from sslkit.errors import SslkitError


@dataclass(frozen=True)
class Opts:
    temperature: float = 0.1
    heads: tuple[int, ...] = (3000, 3000)
    pair: tuple[float, float] = (0.1, 1.0)
    name: str | None = None
    flag: bool = False


def cfg(**kw):
    return apply_overrides(TrainConfig(method_options=Opts()), kw)


def test_overrides_from_strings_are_parsed_and_type_checked():
    c = cfg(**parse_set(["epochs=5", "lr=1e-2", "method_options.heads=[10,20,30]",
                         "method_options.pair=(0.2,0.5)", "method_options.flag=true", "preset=none",
                         "method_options.name=abc", "warmup_start_lr=None"]))
    assert c.epochs == 5 and c.lr == 0.01 and c.preset is None and c.warmup_start_lr is None
    assert c.method_options == Opts(heads=(10, 20, 30), pair=(0.2, 0.5), flag=True, name="abc")
    assert cfg(lr=1).lr == 1.0 and isinstance(cfg(lr=1).lr, float)   # an int is a fine float
    assert cfg(data="2x160+4x96").data == "2x160+4x96"                # strings stay strings


@pytest.mark.parametrize("overrides,words", [
    ({"learning_rate": 1}, "unknown option 'learning_rate'"),
    ({"method_options.temp": 1}, "unknown option method_options.'temp'"),
    ({"epochs": "two"}, "epochs: expected int"),
    ({"epochs": True}, "epochs: expected int"),
    ({"method_options.pair": "[1]"}, "expected 2 values"),
    ({"method_options.heads": "3"}, "expected a tuple/list"),
    ({"lr.x": 1}, "lr has no sub-options"),
])
def test_bad_overrides_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        cfg(**overrides)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, SslkitError)


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["epochs"])


def test_config_is_frozen_and_round_trips_through_json():
    c = cfg(epochs=3, **{"method_options.heads": (1, 2)})
    with pytest.raises(Exception):
        c.epochs = 4  # frozen
    d = json.loads(dumps(c))
    assert d == to_dict(c) and d["method_options"]["heads"] == [1, 2] and d["epochs"] == 3
    # a saved config re-applied to the defaults gives the same config back (what resume compares)
    flat = {k: v for k, v in d.items() if k != "method_options"}
    flat.update({f"method_options.{k}": v for k, v in d["method_options"].items()})
    assert apply_overrides(TrainConfig(method_options=Opts()), flat) == c


# -- the generated reference and the trainer's settings ----------------------------------------------

def test_the_config_reference_is_generated_and_in_sync():
    """docs/CONFIG.md is exactly what `python -m sslkit.config` writes (regenerate it after changing a
    field), and every TrainConfig field has a meaning, a type and a default there."""
    import os

    from sslkit.config import config_reference, field_docs
    from conftest import REPO
    with open(os.path.join(REPO, "docs", "CONFIG.md")) as f:
        on_disk = f.read()
    assert on_disk == config_reference(), "docs/CONFIG.md is stale: python -m sslkit.config > docs/CONFIG.md"
    rows = field_docs(TrainConfig)
    assert [r[1] for r in rows] == [f for f in to_dict(TrainConfig())]
    missing = [name for _, name, _, _, meaning in rows if len(meaning) < 5]
    assert not missing, f"TrainConfig fields without a meaning comment: {missing}"
    by_name = {r[1]: r for r in rows}
    # a continued comment joins its field's meaning; sections come from the comment lines between fields
    assert by_name["torch_threads"][4].endswith("minus DALI's threads, at least 1)")
    assert by_name["hw_decoder_load"][2:4] == ("float | None", "null")
    assert by_name["lr"][0].startswith("optimisation") and by_name["use_mmap"][0] == "system"
    for name in ("precision", "compile", "channels_last", "sync_bn", "tensorboard", "hw_decoder_load", "use_mmap",
                 "loader_threads", "torch_threads", "loader_prefetch"):
        assert f"| `{name}` |" in on_disk
    assert "## `deepclusterv2` options" in on_disk and "`method_options.n_prototypes`" in on_disk


def test_every_loader_setting_the_readme_advises_is_a_config_field():
    """What pipelines' LoaderConfig takes per run (threads, prefetch, hardware decoder share, mmap,
    shuffle buffer) is settable with --set; the rest (rank, device, seed, batch) the trainer derives."""
    c = cfg(**parse_set(["hw_decoder_load=1.0", "use_mmap=false", "loader_threads=3", "loader_prefetch=4",
                         "torch_threads=2", "shuffle_buffer=0"]))
    assert (c.hw_decoder_load, c.use_mmap, c.loader_threads, c.loader_prefetch, c.torch_threads,
            c.shuffle_buffer) == (1.0, False, 3, 4, 2, 0)
    assert cfg(**parse_set(["hw_decoder_load=none"])).hw_decoder_load is None
    with pytest.raises(ConfigError, match="use_mmap: expected bool"):
        cfg(**parse_set(["use_mmap=maybe"]))


# -- the methods' options and presets (sslkit.recipes) and the registry they are declared in --------

def test_every_declared_method_has_its_class_and_every_preset_resolves():
    """One entry per method: options and presets from its sslkit.recipes module, the class from its
    sslkit.methods module, registered under the same name; every preset is a valid config."""
    import pkgutil

    import sslkit.methods
    import sslkit.recipes
    from sslkit.methods import Method, list_methods, method_entry
    from sslkit.train import check_config
    modules = {m.name for m in pkgutil.iter_modules(sslkit.methods.__path__)} - {"base"}
    assert set(list_methods()) == modules == {m.name for m in pkgutil.iter_modules(sslkit.recipes.__path__)}
    for name in list_methods():
        entry = method_entry(name)
        assert entry.meta["options"].__module__ == f"sslkit.recipes.{name}"
        assert issubclass(entry.factory, Method) and entry.factory.__module__ == f"sslkit.methods.{name}"
        for preset in [None, *entry.meta["presets"]]:
            cfg = preset_config(name, preset)
            check_config(cfg)
            assert isinstance(cfg.method_options, entry.meta["options"]) and cfg.preset == preset
    with pytest.raises(ConfigError, match="unknown method 'swa'; choose from colorization, deepclusterv2"):
        preset_config("swa", None)
    with pytest.raises(ConfigError, match="unknown preset 'huge' for swav; choose from 800ep"):
        preset_config("swav", "huge")


def test_a_method_class_needs_a_declaration_and_the_facts_live_there(monkeypatch):
    from sslkit import registry
    from sslkit.methods import method_entry
    from sslkit.recipes import Preset, declare_method
    monkeypatch.setitem(registry._ENTRIES, "method", dict(registry._ENTRIES["method"]))
    method_entry("swav").factory   # the classes are registered

    class Toy:
        pass
    with pytest.raises(ValueError, match="'toy' is not declared: declare it, with its facts, in sslkit.recipes"):
        registry.register("method", "toy")(Toy)
    declare_method("toy", Opts, {"tiny": Preset("a toy", {"epochs": 1})})
    with pytest.raises(ValueError, match="presets belong in its declaration"):
        registry.register("method", "toy", presets={})(Toy)
    with pytest.raises(LookupError, match="declared in sslkit.recipes but has no class: import sslkit.methods"):
        method_entry("toy").factory
    assert preset_config("toy", "tiny").epochs == 1    # usable for configs before it has a class
    registry.register("method", "toy")(Toy)
    assert method_entry("toy").factory is Toy
    with pytest.raises(ValueError, match="'swav' is already registered \\(by sslkit.methods.swav.SwAV\\)"):
        registry.register("method", "swav")(Toy)
    with pytest.raises(ValueError, match="already declared"):
        declare_method("toy", Opts, {})
    with pytest.raises(TypeError, match="frozen dataclass"):
        declare_method("toy2", dict, {})
    with pytest.raises(ValueError, match="model entries are registered with their factory"):
        registry.declare("model", "toy")
