"""Typed exceptions raised by the library; the CLI turns them into one-line messages."""


class WanrtError(Exception):
    """Base class: every error a user can act on derives from it."""


class ConfigError(WanrtError):
    """A config or preset is malformed, unknown or inconsistent."""


class CheckpointError(WanrtError):
    """A checkpoint file or folder cannot be used; the message names the file and the fix."""


class InputError(WanrtError):
    """A user-supplied value (size, frame count, image, solver...) is invalid."""
