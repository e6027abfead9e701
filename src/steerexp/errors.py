"""Errors a user can fix: one line that names the setting and the fix, no traceback.

The CLI prints a ConfigError as `steerexp: error: <message>` and exits with code 2 (a single run),
or lets a sweep record it as the job's failure; `HYDRA_FULL_ERROR=1` or `verbose=true` shows the
traceback as well. Nothing here imports anything heavy: the CLI raises these before torch loads.

The message is always one short line, whatever values it quotes: control characters (a newline in
a prompt) are written as escapes (`\\n`), and a long part is cut in its middle with an ellipsis
(the key at KEY_CHARS, the fix at FIX_CHARS, the whole line at MAX_CHARS), so a value of 10,000
tokens cannot make a 99 KB "one-line" error.
"""
from __future__ import annotations

import re

MAX_CHARS = 600   # the whole message (key: problem; fix)
KEY_CHARS = 120
FIX_CHARS = 240
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with its control characters (newlines, tabs, escapes) written as Python escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def shorten(text: str, limit: int) -> str:
    """`text` cut in its middle to at most `limit` characters (its start and end kept, ' … ' between)."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 3, 2)
    head = (keep * 2) // 3
    return f"{text[:head]} … {text[len(text) - (keep - head):]}"


class ConfigError(ValueError):
    """A setting is wrong. The message names the key (`technique.lr`) and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        k = shorten(one_line(key), KEY_CHARS)
        f = shorten(one_line(fix), FIX_CHARS) if fix else ""
        room = MAX_CHARS - len(k) - 2 - (len(f) + 2 if f else 0)
        p = shorten(one_line(problem), max(room, 120))
        super().__init__(f"{k}: {p}" + (f"; {f}" if f else ""))
