"""The rich Console everything is printed through: a terminal's width in a terminal, no width at all
in a file, a pipe or a batch log.

rich lays text out for 80 columns (or COLUMNS, or the width of whichever std stream is a
terminal) even when the output goes to a file, so `--dry-run > plan.txt` folded tensor names over
several lines and `grep` could not find them, and a commit URL came out in two pieces. Nobody
reads a file at a width: there, a line is as long as what it says. A notebook keeps rich's own
width (its widget has one).
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

__all__ = ["UNLIMITED_WIDTH", "LogConsole", "watched"]

# Wide enough for any tensor name, path or table row; rich pads nothing to the console's width.
UNLIMITED_WIDTH = 1_000_000


class LogConsole(Console):
    """A Console whose width is unlimited when it writes to something other than a terminal or a
    notebook. Decided at each print, since the stream (`sys.stdout`) may be swapped in between."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if watched(self):
            return size
        return ConsoleDimensions(UNLIMITED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def watched(console: Console) -> bool:
    """Whether someone watches this console live: a terminal (not a dumb one) or a notebook.

    A live display (a progress bar redrawn in place) only makes sense there; elsewhere rich draws
    it once, when it stops, so a log showed nothing until the run ended."""
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)
