"""The one place the command line's rich consoles are made (`sketchwalk` and every package that adds
subcommands use it), and the one way an input error is printed.

On a terminal rich wraps at the terminal's width, which is what a reader wants. Written to a file
or a pipe, rich would wrap at 80 columns (or $COLUMNS): a printed command (`mlflow ui
--backend-store-uri sqlite:///...`) or an error naming a long path would break across lines and no
longer paste or grep. So off a terminal nothing soft-wraps and tables get their natural width.
"""
from __future__ import annotations

from typing import Any

#: Width of a console that does not write to a terminal: wide enough that no table or line of ours
#: is ever folded (rich renders tables at their natural width, below this bound).
FILE_WIDTH = 10_000


def make_console(*, stderr: bool = False, **kwargs: Any):
    """A rich Console for stdout (or stderr): as rich makes it on a terminal; off a terminal (file,
    pipe, captured by a test) with `soft_wrap=True` and width FILE_WIDTH, so no line is wrapped.
    Extra `kwargs` go to Console (e.g. `width=` to force a width for a report)."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal or "width" in kwargs:
        return Console(stderr=stderr, **kwargs)
    return Console(stderr=stderr, soft_wrap=True, width=FILE_WIDTH, **kwargs)


def print_error(console, exc: BaseException | str, *, label: str = "error") -> int:
    """Print `label: <exc>` on one line (exception text escaped, so a '[/path]' in it is not read as
    rich markup); returns 2, the exit code of a user error."""
    from rich.markup import escape

    console.print(f"[red]{label}:[/red] {escape(str(exc))}", highlight=False)
    return 2
