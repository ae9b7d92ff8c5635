"""Every output of every command is checked before the work starts (missing, not a directory, not
writable: proved by writing, so also as root); list options say how to separate their items and
refuse empty ones; every option's help shows its default.

The work is stubbed (the real MiniLM never loads here); ``attnkit viz`` on the model is in test_viz_cli.py.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

import attnkit.bench.cpu as bench_cpu
import attnkit.cli.train as cli_train
import attnkit.cli.viz as cli_viz
import attnkit.pretrained as pretrained
from attnkit.cli._paths import OutputPathError, check_output_file, prepare_output_dir
from attnkit.cli.main import main


class _WorkStarted(Exception):
    """Raised in place of the command's real work: reaching it means the paths were accepted."""


def _refuse_work(*args, **kwargs):
    raise _WorkStarted


_TRAIN = ["--steps", "1", "--length", "4", "--num-symbols", "4", "--embed-dim", "8", "--layers", "1"]
_BENCH = ["--ns", "64", "--impls", "tiled", "--masks", "dense", "--modes", "fwd", "--reps", "1"]

# (entry point, argv before the path, option, a file name for it or None for a directory, the
#  module-level function that starts the work: reaching it means the output was accepted)
COMMANDS = [
    (main, ["train", *_TRAIN], "--out", "run.json", (cli_train, "run_variant")),
    (cli_train.main, _TRAIN, "--out", "run.json", (cli_train, "run_variant")),  # python -m attnkit.cli.train
    (main, ["bench", *_BENCH], "--out-dir", None, (bench_cpu, "run_case")),
    (bench_cpu.main, _BENCH, "--out-dir", None, (bench_cpu, "run_case")),  # python -m attnkit.bench.cpu
    (main, ["viz", "hi"], "--out", "maps.html", (pretrained, "minilm_path")),  # first step of loading MiniLM
    (main, ["viz", "hi"], "--png", "maps.png", (pretrained, "minilm_path")),
    (main, ["viz", "hi", "--png", "ok.png"], "--out", "maps.html", (pretrained, "minilm_path")),  # both outputs
    (main, ["viz", "hi", "--out", "ok.html"], "--png", "maps.svg", (pretrained, "minilm_path")),
]
IDS = ["attnkit train", "python -m attnkit.cli.train", "attnkit bench", "python -m attnkit.bench.cpu",
       "attnkit viz --out", "attnkit viz --png", "attnkit viz --png ok --out", "attnkit viz --out ok --png"]


def _bad_paths(tmp: Path, name: str | None) -> list[tuple[Path, str]]:
    """Paths that cannot be written as the file ``name`` (None: a directory), each with a phrase the
    error must contain."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a directory")
    if name is not None:
        return [(tmp / "missing" / "deeper" / name, "mkdir -p"),  # the case
                (a_file / name, "is a file, not a directory"),
                (tmp / name.replace(".", "_dir."), "is a directory")]
    return [(a_file, "is a file, not a directory"), (a_file / "results", "is a file, not a directory")]


def _in_tmp(argv: list[str], tmp: Path) -> list[str]:
    """argv with the fixed outputs of the viz rows (ok.png, ok.html) placed in ``tmp``."""
    return [str(tmp / a) if a in ("ok.png", "ok.html") else a for a in argv]


@pytest.mark.parametrize("entry, argv, option, name, work", COMMANDS, ids=IDS)
def test_unwritable_output_is_refused_before_the_work(entry, argv, option, name, work, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr(*work, _refuse_work)
    for path, phrase in _bad_paths(tmp_path, name):
        if phrase == "is a directory":
            path.mkdir()
        assert entry([*_in_tmp(argv, tmp_path), option, str(path)]) == 2, path  # and _WorkStarted never raised
        err = capsys.readouterr().err
        assert "error" in err and option in err and str(path) in err and phrase in err, err
        assert not (tmp_path / "missing").exists()  # nothing created for a refused file path


def _unwritable_dir(tmp: Path, how: str) -> Path:
    """An existing directory where no file can be created."""
    if how == "/proc":  # as root too: the kernel's /proc takes no new files, whatever access() says
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        return Path("/proc")
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only (chmod 555) directory; the /proc case covers root")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.parametrize("how", ["/proc", "chmod 555"])
@pytest.mark.parametrize("entry, argv, option, name, work", COMMANDS, ids=IDS)
def test_a_directory_that_takes_no_files_is_refused_before_the_work(entry, argv, option, name, work, how,
                                                                    tmp_path, monkeypatch, capsys):
    directory = _unwritable_dir(tmp_path, how)
    path = directory if name is None else directory / name
    monkeypatch.setattr(*work, _refuse_work)
    try:
        assert entry([*_in_tmp(argv, tmp_path), option, str(path)]) == 2  # and _WorkStarted was never raised
    finally:
        if how != "/proc":
            directory.chmod(0o755)
    err = capsys.readouterr().err
    assert f"the directory {str(directory)!r} is not writable (creating a file there failed" in err, err
    assert option in err and "choose a path in a directory you can write to" in err, err
    assert not any(p.name.startswith(".attnkit-write-check-") for p in tmp_path.rglob("*"))  # the probe is gone


def test_viz_refuses_an_unwritable_default_picture_before_loading_the_model(monkeypatch, capsys):
    directory = _unwritable_dir(Path("/unused"), "/proc")
    monkeypatch.chdir(directory)  # no --out, no --png: the picture would go to ./attention.png
    monkeypatch.setattr(pretrained, "minilm_path", _refuse_work)
    assert main(["viz", "hi"]) == 2
    err = capsys.readouterr().err
    assert "attnkit viz: error: --png (default) 'attention.png': the directory '.' is not writable" in err, err


@pytest.mark.parametrize("entry, argv, option, name, work", COMMANDS, ids=IDS)
def test_writable_output_is_ready_when_the_work_starts(entry, argv, option, name, work, tmp_path, monkeypatch):
    kind = "dir" if name is None else "file"
    target = tmp_path / "new" / "results" if kind == "dir" else tmp_path / name
    argv = _in_tmp(argv, tmp_path)
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
    assert list(tmp_path.iterdir()) == []  # the writability probe leaves nothing behind
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
    args = bench_cpu.parse_args(["--ns", "128, 256", "--impls", "tiled,sdpa"])
    assert args.ns == (128, 256) and args.impls == ("tiled", "sdpa")
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(["--ns", "128;256"])
    err = capsys.readouterr().err
    assert "argument --ns: '128;256' in '128;256' is not a valid int; expected comma-separated int values" in err


@pytest.mark.parametrize("text, phrase", [
    ("64,", "'64,' ends with a comma: empty items are not allowed"),  # the trial's case, once accepted as (64,)
    (",64", "',64' starts with a comma: empty items are not allowed"),
    ("64,,128", "'64,,128' has an empty item (item 2): empty items are not allowed"),
    ("64, ,128", "'64, ,128' has an empty item (item 2)"),
    ("", "'' is empty"),
])
@pytest.mark.parametrize("option", ["--ns", "--impls"])
def test_comma_lists_refuse_empty_items(text, phrase, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"attnkit bench: error: argument {option}: {phrase}" in err and "expected comma-separated" in err, err


# -- --help: the command's own name, and every option's default --------------------------------------

def _viz_parser() -> argparse.ArgumentParser:
    viz = argparse.ArgumentParser(prog="attnkit viz")
    cli_viz.add_arguments(viz)
    return viz


def _shown(default: object) -> str:
    """A default as the help text writes it: 1024,4096 for a comma list, 180 for 180.0."""
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    if isinstance(default, list):
        return " ".join(map(str, default))
    return f"{default:g}" if isinstance(default, float) else str(default)


@pytest.mark.parametrize("command", ["attnkit bench", "attnkit train", "attnkit viz"])
def test_help_names_the_command_and_shows_every_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    parser = {**_parsers(), "attnkit viz": _viz_parser()}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command.split()[1], "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: {command} "), text[:80]  # not "python -m attnkit.bench.cpu"
    with_defaults = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                     and a.default not in (None, False, argparse.SUPPRESS)]
    assert command != "attnkit bench" or len(with_defaults) == 10  # the introspection sees bench's options
    for action in with_defaults:
        entry = _option_help(text, action.option_strings[-1])
        assert f"default {_shown(action.default)}" in entry, (action.option_strings[-1], entry)


def test_bench_says_where_it_writes_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default benchmarks/results under the current directory)" in _option_help(capsys.readouterr().out,
                                                                                       "--out-dir")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_cpu, "run_case", _refuse_work)
    with pytest.raises(_WorkStarted):
        main(["bench", *_BENCH])
    results = (tmp_path / "benchmarks" / "results").resolve()
    assert results.is_dir() and f"results in {results}" in capsys.readouterr().out
