"""The one exception type the CLI turns into a single clear line and exit code 2.

Raise `EdgekvError` (or a subclass) for anything a user can fix: bad input files, bad
option values, budgets too small, a full disk. Its message names the problem and the
fix. Anything else is a bug and keeps its traceback.
"""


class EdgekvError(Exception):
    """A problem the user can act on; `str(error)` is the whole message."""


class BudgetError(EdgekvError):
    """A byte budget is too small to run, or a tier is full."""


class DiskFullError(EdgekvError):
    """The disk ran out of space while edgekv was writing; nothing half-written was kept."""
