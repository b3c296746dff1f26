"""User-facing errors: one paragraph naming the key or file and what to do; exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (unknown paper/stage, invalid params, missing inputs)."""

    exit_code = 2


class UnknownPaperError(UserError):
    pass


class UnknownStageError(UserError):
    pass


class ParamsError(UserError):
    pass


class MissingInputError(UserError):
    pass
