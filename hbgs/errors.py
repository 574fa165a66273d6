"""Errors caused by the user's input. The entry point prints their message (which names the fix)
without a traceback; anything else is a bug and keeps its traceback."""

from collections.abc import Sequence


class HbgsError(Exception):
    pass


def check_choice(what: str, value, valid: Sequence[str]) -> None:
    """HbgsError naming the valid options when ``value`` is not one of them."""
    if value not in valid:
        raise HbgsError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
