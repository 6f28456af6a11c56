"""Errors raised by the daemon package."""


class OpacitydError(Exception):
    """Root of the daemon's errors."""


class ConfigError(OpacitydError):
    """The configuration is invalid; the message names the key, value and what is accepted."""


class SpoolError(OpacitydError):
    """An instance could not be written durably to the spool."""


class SpoolFullError(SpoolError):
    """The spool's file system is out of space."""
