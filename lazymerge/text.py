"""Text from strangers, made safe to show: tensor names, file names and error messages.

A tensor name or a recipe value can hold terminal escape sequences (`\\x1b[2J` clears the screen,
OSC 8 makes links, `\\x9b` is a one-byte CSI) or a million characters. What reaches a terminal is
first passed through `printable` (control and invisible format characters shown as escapes) and,
for an error line, `one_line` (also capped in length).
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_MESSAGE", "one_line", "printable"]

# An error line: long enough for two paths and a tensor name, short of flooding a terminal.
MAX_MESSAGE = 1000

# Control (Cc), format (Cf: bidi overrides, zero-width), surrogate, private and unassigned
# characters, and line/paragraph separators: anything that moves the cursor or hides text.
_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every control or invisible character written as `\\x1b`, `\\u202e`...

    Printable text (accents, CJK, emoji) is kept as is; a plain ASCII name is returned unchanged.

    Example:
        >>> printable("model.\\x1b[31mevil")
        'model.\\\\x1b[31mevil'
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN else c for c in text)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one printable line of at most `limit` characters, cut with "…" when longer."""
    text = str(text)
    if len(text) > 4 * limit:  # escaping can grow the text 10x: cut first, then escape
        text = text[: 4 * limit]
    line = printable(text)
    return line if len(line) <= limit else line[: limit - 1] + "…"
