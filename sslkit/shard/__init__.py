"""Validated, indexed WebDataset shards: build, verify, info, merge.

Sample layout (the contract every reader relies on): key = zero-padded sample index (no dots);
`jpg` (8-bit RGB JPEG), `index` (the same zero-padded decimal index), `cls` (zero-padded decimal
class id, labelled sets only), `json` (source path, original and stored size, label name).
"""

from .build import BuildError, BuildOptions, build
from .check import VerifyError, collect_info, verify
from .images import ImageOptions
from .manifest import FORMAT_VERSION, ManifestError, load, shard_paths
from .merge import merge
from .sources import SourceError, SourceOptions

__all__ = [
    "BuildError", "BuildOptions", "FORMAT_VERSION", "ImageOptions", "ManifestError", "SourceError",
    "SourceOptions", "VerifyError", "build", "collect_info", "load", "merge", "shard_paths", "verify",
]
