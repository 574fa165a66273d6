"""Errors caused by the user's input. The entry point prints their message (which names the fix)
without a traceback; anything else is a bug and keeps its traceback."""


class HbgsError(Exception):
    pass
