"""Typed errors of the builder; the CLI turns each into one line on stderr."""

from query.errors import AtlasError


class BuildError(AtlasError):
    """A build cannot go on: bad config, bad probe set, unknown backend or layer."""


class ConfigError(BuildError):
    """A config key or value is wrong."""


class LayerError(BuildError):
    """A requested layer does not exist in the target model."""


class BackendError(BuildError):
    """A backend could not be found, loaded or run."""
