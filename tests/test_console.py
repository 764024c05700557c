"""Output that survives files and pipes: off a terminal no line is wrapped (rich wrapped at 80
columns, or $COLUMNS, so a printed command or an error naming a long path broke across lines), and
help texts print what they mean."""
from __future__ import annotations

import pytest

# Far longer than any terminal: a clone path like the one that broke test_cli_input_errors.
LONG_DIR = "/tmp/" + "/".join(f"a-rather-long-directory-name-{i}" for i in range(8))


@pytest.fixture(autouse=True)
def narrow_columns(monkeypatch):
    # rich reads $COLUMNS for a console that is not a terminal: 40 makes any wrapping show.
    monkeypatch.setenv("COLUMNS", "40")


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_console_off_a_terminal_never_wraps(capsys):
    from sketchwalk.console import make_console

    console = make_console()
    assert not console.is_terminal
    command = f"mlflow ui --backend-store-uri sqlite:///{LONG_DIR}/runs/mlflow.db"
    console.print(command, highlight=False)
    assert capsys.readouterr().out == command + "\n"


def test_print_error_is_one_line_and_escapes_markup(capsys):
    from sketchwalk.console import make_console, print_error

    console = make_console()
    assert print_error(console, ValueError(f"x = [/not/markup] at {LONG_DIR}")) == 2
    assert capsys.readouterr().out == f"error: x = [/not/markup] at {LONG_DIR}\n"


@pytest.mark.parametrize("argv, needle", [
    (["ablate", f"{LONG_DIR}/missing.yaml"], "no such file"),
    (["sweep", f"{LONG_DIR}/missing.yaml", "--workdir", "/tmp/w21-unused"], "no such file"),
    (["eval", "--config", f"{LONG_DIR}/missing.yaml"], "missing.yaml"),
])
def test_cli_errors_naming_a_long_path_stay_on_one_line(capsys, argv, needle):
    """The bug behind issue 18's bug 11: under a long clone path the error wrapped and a test looking
    for 'no such file' in one line failed. Exit 2, the whole message (path included) on one line.
    Only the CLI is imported, so this runs (and fails) on the code from before the console factory."""
    from sketchwalk import cli

    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    (line,) = _lines_with(out, "error:")
    assert f"{LONG_DIR}/missing.yaml" in line and needle in line, out


def test_help_texts_print_single_percent(capsys):
    """argparse %-formats argument help but not descriptions: '95%%' in a description printed as is."""
    from sketchwalk import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"eval", "demo", "sweep", "pareto"} <= set(sub.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "%%" not in text, name
    assert "95% bootstrap" in " ".join(sub.choices["eval"].format_help().split())
