"""Typed exceptions raised by the library; the CLI turns them into one-line messages."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

Choice = TypeVar("Choice", bound=Enum)


class WanrtError(Exception):
    """Base class: every error a user can act on derives from it."""


class ConfigError(WanrtError):
    """A config or preset is malformed, unknown or inconsistent."""


class CheckpointError(WanrtError):
    """A checkpoint file or folder cannot be used; the message names the file and the fix."""


class InputError(WanrtError):
    """A user-supplied value (size, frame count, image, solver...) is invalid."""


def parse_choice(choices: type[Choice], value: Choice | str, what: str,
                 error: type[WanrtError] = InputError) -> Choice:
    """`value` as a member of the str Enum `choices`, or one line naming `what` (a flag
    such as `--engine`) and every valid choice."""
    try:
        return choices(value)
    except ValueError:
        raise error(f"{what} {value!r} is unknown; choose one of "
                    f"{', '.join(choice.value for choice in choices)}") from None
