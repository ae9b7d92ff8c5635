"""Every command that writes files checks its output paths before the work starts; list options say
how to separate their items.

(``attnkit viz`` checks its own outputs; its tests are in test_viz_*.)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import attnkit.bench.cpu as bench_cpu
import attnkit.cli.train as cli_train
from attnkit.cli._paths import OutputPathError, check_output_file, prepare_output_dir
from attnkit.cli.main import main


class _WorkStarted(Exception):
    """Raised in place of the command's real work: reaching it means the paths were accepted."""


def _refuse_work(*args, **kwargs):
    raise _WorkStarted


_TRAIN = ["--steps", "1", "--length", "4", "--num-symbols", "4", "--embed-dim", "8", "--layers", "1"]
_BENCH = ["--ns", "64", "--impls", "tiled", "--masks", "dense", "--modes", "fwd", "--reps", "1"]

# (entry point, argv before the path, option, "file" or "dir", the module-level function doing the work)
COMMANDS = [
    (main, ["train", *_TRAIN], "--out", "file", (cli_train, "run_variant")),
    (cli_train.main, _TRAIN, "--out", "file", (cli_train, "run_variant")),  # python -m attnkit.cli.train
    (main, ["bench", *_BENCH], "--out-dir", "dir", (bench_cpu, "run_case")),
    (bench_cpu.main, _BENCH, "--out-dir", "dir", (bench_cpu, "run_case")),  # python -m attnkit.bench.cpu
]
IDS = ["attnkit train", "python -m attnkit.cli.train", "attnkit bench", "python -m attnkit.bench.cpu"]


def _bad_paths(tmp: Path, kind: str) -> list[tuple[Path, str]]:
    """Paths that cannot be written as ``kind``, each with a phrase the error must contain."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a directory")
    if kind == "file":
        return [(tmp / "missing" / "deeper" / "run.json", "mkdir -p"),  # the case
                (a_file / "run.json", "is a file, not a directory"),
                (tmp, "is a directory")]
    return [(a_file, "is a file, not a directory"), (a_file / "results", "is a file, not a directory")]


@pytest.mark.parametrize("entry, argv, option, kind, work", COMMANDS, ids=IDS)
def test_unwritable_output_is_refused_before_the_work(entry, argv, option, kind, work, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr(*work, _refuse_work)
    for path, phrase in _bad_paths(tmp_path, kind):
        assert entry([*argv, option, str(path)]) == 2, path  # and _WorkStarted was never raised
        err = capsys.readouterr().err
        assert "error" in err and option in err and str(path) in err and phrase in err, err
        assert not (tmp_path / "missing").exists()  # nothing created for a refused file path


@pytest.mark.parametrize("entry, argv, option, kind, work", COMMANDS, ids=IDS)
def test_writable_output_is_ready_when_the_work_starts(entry, argv, option, kind, work, tmp_path, monkeypatch):
    target = tmp_path / "new" / "results" if kind == "dir" else tmp_path / "run.json"
    seen = []

    def work_after_checking_the_output(*args, **kwargs):
        seen.append(target.is_dir() if kind == "dir" else target.parent.is_dir())
        raise _WorkStarted

    monkeypatch.setattr(*work, work_after_checking_the_output)
    with pytest.raises(_WorkStarted):
        entry([*argv, option, str(target)])
    assert seen == [True]  # a directory output is created before the first case, not after it


def test_path_helpers_return_paths_and_refuse_with_the_option_named(tmp_path):
    assert check_output_file(str(tmp_path / "x.json"), "--out") == tmp_path / "x.json"
    assert prepare_output_dir(tmp_path / "a" / "b", "--out-dir").is_dir()
    with pytest.raises(OutputPathError, match=r"--save .*does not exist; create it first \(mkdir -p"):
        check_output_file(tmp_path / "nope" / "x.json", "--save")
    assert issubclass(OutputPathError, ValueError)


# -- list options say how their items are separated --------------------------------------------------

def _parsers() -> dict[str, argparse.ArgumentParser]:
    train = argparse.ArgumentParser(prog="attnkit train")
    cli_train.add_arguments(train)
    return {"attnkit bench": bench_cpu.build_parser(), "attnkit train": train}


def _list_options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(option, separator) of every option that takes a list: a comma-list type, or nargs + / *."""
    found = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action.type, bench_cpu.CommaList):
            found.append((action.option_strings[-1], "comma-separated"))
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
            found.append((action.option_strings[-1], "space-separated"))
    return found


def _option_help(text: str, option: str) -> str:
    """The help paragraph of ``option`` in argparse's --help output."""
    m = re.search(rf"^  {re.escape(option)}\b.*?(?=^  -|\Z)", text, re.M | re.S)
    assert m, f"{option} not in the help text:\n{text}"
    return " ".join(m.group(0).split())


@pytest.mark.parametrize("command", ["attnkit bench", "attnkit train"])
def test_help_of_every_list_option_says_how_to_separate_items(command, capsys):
    options = _list_options(_parsers()[command])
    expected = {"attnkit bench": {"--ns", "--impls", "--masks", "--modes"}, "attnkit train": {"--seed"}}[command]
    assert {o for o, _ in options} == expected  # the introspection finds the list options
    with pytest.raises(SystemExit) as exit_info:
        main([command.split()[1], "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option, separator in options:
        assert separator in _option_help(text, option), (option, _option_help(text, option))


def test_comma_lists_parse_and_explain_bad_items(capsys):
    args = bench_cpu.parse_args(["--ns", "128, 256,", "--impls", "tiled,sdpa"])
    assert args.ns == (128, 256) and args.impls == ("tiled", "sdpa")
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(["--ns", "128;256"])
    assert "comma-separated" in capsys.readouterr().err
