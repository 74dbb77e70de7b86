"""Validated, indexed WebDataset shards: build, verify, info, merge.

Sample layout (the contract every reader relies on): key = zero-padded sample index (no dots);
`jpg` (8-bit RGB JPEG), `index` (the same zero-padded decimal index), `cls` (zero-padded decimal
class id, labelled sets only), `json` (source path, original and stored size, label name).

The names below are imported on first use: `shard index` and `--help` do not pay for PIL and the
image code that `build` and `verify` need.
"""

import sys
import types

from ..lazy import lazy_getattr

_EXPORTS = {
    "BuildError": "build", "BuildOptions": "build", "build": "build",
    "VerifyError": "check", "collect_info": "check", "verify": "check",
    "ImageOptions": "images",
    "FORMAT_VERSION": "manifest", "ManifestError": "manifest", "load": "manifest", "shard_paths": "manifest",
    "merge": "merge",
    "SourceError": "sources", "SourceOptions": "sources",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`build` and `merge` name both a submodule and the function it defines. Importing the submodule
    makes Python set the package's attribute of that name to the module, which would then hide the
    function from `from sslkit.shard import build`; the package keeps those names for the functions
    (as an eager `from .build import build` did), and the submodules stay reachable in sys.modules."""

    def __setattr__(self, name: str, value):
        if name in ("build", "merge") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
