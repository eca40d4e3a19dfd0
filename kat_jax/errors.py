"""Error types shared across layers (below config, model and sharding, so none imports another)."""


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""
