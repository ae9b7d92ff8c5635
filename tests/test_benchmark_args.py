"""The benchmark scripts follow the command line's conventions (issue 13, item 9), one table row per
script: --help calls every list option comma-separated, and an output directory that cannot be used
is refused, or a missing one created, before any benchmark work starts (the work is stubbed here)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from attnkit.bench.cpu import CommaList

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@dataclass(frozen=True)
class Script:
    name: str
    lists: tuple[str, ...]  # every option that takes a list
    out: str  # the output-directory option
    work: tuple[str, ...]  # the script's functions that start the benchmark's work
    argv: tuple[str, ...] = ()  # options that keep a stubbed run harmless
    needs: str | None = None  # a package the script imports
    fake_cuda: bool = False  # the script checks for a GPU after its options

    def __str__(self) -> str:  # the test id; a bare "gpu" would be taken for conftest's gpu marker
        return f"{self.name}.py"


SCRIPTS = [
    Script("longformer_cpu", ("--ns", "--attnkit-only-ns", "--modes", "--contenders"), "--out-dir", ("run",),
           argv=("--as-limit-gb", "0")),
    Script("decode_cpu", ("--batches",), "--out-dir", ("build_models", "run"), needs="transformers"),
    Script("gpu", ("--kinds", "--ns", "--ds"), "--out", ("measure", "tune_case"), argv=("--quick",),
           needs="triton", fake_cuda=True),
]

_loaded: dict[str, object] = {}


@pytest.fixture(params=SCRIPTS, ids=str)
def script(request):
    s: Script = request.param
    if s.needs:
        pytest.importorskip(s.needs)
    if s.name not in _loaded:
        spec = importlib.util.spec_from_file_location(f"bench_args_{s.name}", BENCH / f"{s.name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        _loaded[s.name] = module
    return s, _loaded[s.name]


def _main(module, s: Script, argv: list[str], monkeypatch) -> int:
    """Run the script's main as ``python benchmarks/<name>.py ARGV`` would; its exit status."""
    monkeypatch.setattr(sys, "argv", [f"{s.name}.py", *argv])
    try:
        return module.main()
    except SystemExit as e:
        return e.code


def _help_entries(text: str) -> dict[str, str]:
    """Each option's entry of an argparse --help (its first flag -> the entry on one line)."""
    entries, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"  (-[-\w]+)", line):
            current = m.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_calls_every_list_option_comma_separated(script, monkeypatch, capsys):
    s, module = script
    monkeypatch.setenv("COLUMNS", "200")
    assert _main(module, s, ["--help"], monkeypatch) == 0
    entries = _help_entries(capsys.readouterr().out)
    for option in s.lists:
        assert option in entries, f"{s.name}.py --help has no {option}"
        assert re.search(r"comma-\s*separated", entries[option]), f"{s.name}.py --help: {entries[option]!r}"


def test_the_list_options_are_the_shared_comma_list_type(script):
    s, module = script
    parser = module.build_parser()
    typed = {a.option_strings[-1] for a in parser._actions if isinstance(a.type, CommaList)}
    assert typed == set(s.lists)  # the table names every list option, and each uses CommaList


class WorkStarted(Exception):
    """Raised by the stubbed work, with whether the output directory existed by then."""


def _stub_work(module, s: Script, out: Path, monkeypatch) -> list[bool]:
    started: list[bool] = []

    def work(*args, **kwargs):
        started.append(out.is_dir())
        raise WorkStarted

    for name in s.work:
        monkeypatch.setattr(module, name, work)
    if s.fake_cuda:  # past the device check, so that only the output path can stop the run
        monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(module.torch.cuda, "get_device_name", lambda *a: "stub GPU")
    return started


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "results").write_text("not a directory")
    return tmp_path / "results"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "results"


def _read_only(tmp_path: Path) -> Path:
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    if os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("this user can write to a read-only directory (root)")
    return tmp_path / "ro"


@pytest.mark.parametrize("unusable", [_a_file, _under_a_file, _read_only], ids=lambda f: f.__name__[1:])
def test_an_unusable_output_dir_is_refused_before_any_work(script, unusable, tmp_path, monkeypatch, capsys):
    s, module = script
    out = unusable(tmp_path)
    started = _stub_work(module, s, out, monkeypatch)
    try:
        code = _main(module, s, [*s.argv, s.out, str(out)], monkeypatch)
    except WorkStarted:
        code = None
    assert not started, f"{s.name}.py started its work with {s.out} {out}"
    assert code == 2
    err = capsys.readouterr().err
    assert s.out in err and str(out) in err


def test_a_missing_output_dir_is_created_before_any_work(script, tmp_path, monkeypatch):
    s, module = script
    out = tmp_path / "new" / "results"
    started = _stub_work(module, s, out, monkeypatch)
    with pytest.raises(WorkStarted):
        _main(module, s, [*s.argv, s.out, str(out)], monkeypatch)
    assert started == [True]
