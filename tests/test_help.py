"""Every subcommand's --help runs and shows the default of every option that has one."""
from __future__ import annotations

import argparse

import pytest

from pipelines import cli


def subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every leaf subcommand, e.g. (("bench", "packing"), parser)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not actions:
        yield prefix, parser
        return
    for name, sub in actions[0].choices.items():
        yield from subparsers(sub, prefix + (name,))


COMMANDS = list(subparsers(cli.build_parser()))


def default_texts(default) -> set[str]:
    """Ways a help text may spell a default: 256, 100000000 or 1e8, [64, 128] or 64 128."""
    if isinstance(default, (list, tuple)):
        return {str(list(default)), " ".join(map(str, default)), ", ".join(map(str, default))}
    texts = {str(default)}
    try:
        number = float(default)
        texts |= {f"{number:g}", f"{number:.0e}".replace("e+0", "e"), f"{number:,.0f}"}
    except (TypeError, ValueError):
        pass
    return texts


def test_every_subcommand_is_covered():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"pack", "stats", "inspect", "verify", "bench packing", "advise", "serve"} <= names


@pytest.mark.parametrize("words,parser", COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_help_runs_and_shows_every_default(words, parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: navit-pack " + " ".join(words) in capsys.readouterr().out
    formatter = parser._get_formatter()  # noqa: SLF001
    missing = []
    for action in parser._actions:  # noqa: SLF001
        if action.help == argparse.SUPPRESS or action.default in (None, False, argparse.SUPPRESS) or \
                isinstance(action, argparse._HelpAction) or not action.option_strings:  # noqa: SLF001
            continue
        text = formatter._expand_help(action) if action.help else ""  # noqa: SLF001
        after = text[text.find("default"):] if "default" in text else ""  # the value must follow the word
        if not any(t in after or f"{t} (default" in text for t in default_texts(action.default)):
            missing.append(f"{action.option_strings[0]} (default {action.default!r}): {text!r}")
    assert not missing, "\n".join(missing)
