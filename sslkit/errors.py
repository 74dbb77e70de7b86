"""The one error base of sslkit.

Every error a user can act on (a bad option, a missing file, a corrupt checkpoint, a shard folder that
does not match its manifest) is an `SslkitError` whose message is ONE line naming the thing and what is
wrong. Command-line tools catch `SslkitError` alone, print `error: <message>` and exit non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SslkitError(Exception):
    """A problem with the user's input or environment, described in one line."""


class UnknownNameError(SslkitError, ValueError):
    """A name that is not registered (model, method, pipeline, ...); the message lists the choices."""


class ConfigError(SslkitError, ValueError):
    """A configuration that cannot run (one-line reason); `sslkit.config` hands it on."""
