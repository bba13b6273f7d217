"""Exceptions raised by vtoken. Every message names the problem and what to do about it."""


class VTokenError(Exception):
    """Base class of vtoken's errors."""


class UnsupportedModelError(VTokenError, TypeError):
    """The model's family is not in vtoken's family table, or a plugin cannot run on it."""


class AlreadyAttachedError(VTokenError, RuntimeError):
    """Plugins are already attached to this model."""


class ConfigError(VTokenError, ValueError):
    """A plugin config field has an invalid value, or a config file is malformed."""


class PluginNotFoundError(VTokenError, KeyError):
    """No built-in or installed plugin has the requested name."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class UnsupportedInputError(VTokenError, ValueError):
    """A forward or generate call got inputs an attached plugin cannot handle exactly."""
