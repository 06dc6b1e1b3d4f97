"""Errors a user can fix. The CLI prints them as one paragraph and exits with code 2."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input: what was wrong, where, and what to do. Printed without a traceback, exit code 2."""

    exit_code = 2


class RunFailed(Exception):
    """A run started correctly but could not finish (e.g. the loss became NaN). Exit code 1."""

    exit_code = 1


def did_you_mean(word: str, choices) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
