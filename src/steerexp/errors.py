"""Errors a user can fix: one line that names the setting and the fix, no traceback.

The CLI prints a ConfigError as `steerexp: error: <message>` and exits with code 2 (a single run),
or lets a sweep record it as the job's failure; `HYDRA_FULL_ERROR=1` or `verbose=true` shows the
traceback as well. Nothing here imports anything heavy: the CLI raises these before torch loads.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting is wrong. The message names the key (`technique.lr`) and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}" + (f"; {fix}" if fix else ""))
