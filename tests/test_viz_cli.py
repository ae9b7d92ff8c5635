"""``attnkit viz`` on the real MiniLM: what it says when it cuts the text (its excerpts cut between
words), the rollout note with ``--layer``, and its progress bar (on a terminal only). The page's own
data is tested in test_viz_page.py and in a browser in test_viz_browser.py; the output paths (no
model) in test_cli_outputs.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from attnkit.cli.main import main
from attnkit.cli.viz import _ellipsis, _title

pytest.importorskip("tokenizers")

PREFIX = "all-MiniLM-L6-v2 attention: "


def page_data(path: Path) -> dict:
    return json.loads(re.search(r'id="ak-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)[1])


@pytest.fixture(scope="module")
def tokenizer():
    """The model's own tokenizer, without truncation: how many word pieces the text really has."""
    from tokenizers import Tokenizer

    from attnkit.pretrained import minilm_path
    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def long_text(words: int) -> str:
    """Varied English words (not one piece repeated), so a cut in the wrong place shows."""
    base = ("the boat drifted slowly past the old mill toward the bank of the wide river while herons "
            "watched from reeds").split()
    return " ".join(f"{base[i % len(base)]}" if i % 7 else f"{base[i % len(base)]}{i}" for i in range(words))


@pytest.mark.parametrize("words", [700, 20])
def test_a_cut_text_is_said_on_stderr_and_on_the_page(tmp_path, capsys, tokenizer, words):
    text = long_text(words)
    pieces = tokenizer.encode(text, add_special_tokens=False).tokens
    out = tmp_path / "maps.html"
    one = ["--layer", "1", "--head", "3"]  # one map keeps it quick; the cut is the same for every map
    assert main(["viz", text, "--out", str(out), *one]) == 0
    err = capsys.readouterr().err
    data = page_data(out)
    cut = len(pieces) + 2 > 512
    assert cut == (words == 700)  # the table holds one text longer than the model reads, one shorter
    # the title: the text up to the end of the last piece shown (a long one by its start and end)
    shown = text[:tokenizer.encode(text, add_special_tokens=False).offsets[min(len(pieces), 510) - 1][1]]
    assert data["title"].startswith(PREFIX) and data["title"].endswith(" [cut at 512 positions]" if cut else "")
    body = data["title"][len(PREFIX):].removesuffix(" [cut at 512 positions]")
    head, _, tail = body.partition(" ... ")
    assert (body == shown) if not tail else (shown.startswith(head) and shown.endswith(tail) and len(head) >= 40
                                             and len(tail) >= 20 and len(body) < len(shown)), (body, shown)
    if not cut:
        assert err == "" and data["notices"] == [] and shown == text
        assert data["tokens"] == ["[CLS]", *pieces, "[SEP]"]
        return
    assert len(shown) < len(text) and tokenizer.encode(shown, add_special_tokens=False).tokens == pieces[:510]
    assert data["tokens"] == ["[CLS]", *pieces[:510], "[SEP]"]  # what the model read
    # stderr: a warning with the counts and what to do
    assert err.count("attnkit viz: warning: ") == 1, err
    assert f"the text is {len(pieces)} word pieces but the model reads at most 512 positions" in err
    assert "only the first 510 pieces are shown" in err and "Shorten the text or split it" in err
    # its excerpts of where the text was cut begin and end on word boundaries
    end, start = re.search(r"up to '\.\.\.(.*?)'; the rest \(\d+ characters from '(.*?)\.\.\.'\)", err).groups()
    rest = text[len(shown):].strip()
    assert shown.endswith(" " + end) and rest.startswith(start + " ") and end and start, (end, start)
    # the page: the same warning at the top
    assert len(data["notices"]) == 1 and "only the first 510 pieces are shown" in data["notices"][0]
    assert main(["viz", text, "--png", str(tmp_path / "only.png"), *one]) == 0  # the picture alone warns too
    assert "attnkit viz: warning: the text is" in capsys.readouterr().err


WORDS = "the boat drifted slowly past the old mill toward the bank"


@pytest.mark.parametrize("text, n, expected", [
    (WORDS, 10, "the boat..."),  # text[:10] == "the boat d": the cut word goes
    (WORDS, 8, "the boat..."),  # a cut right at the end of a word keeps it
    (WORDS, 9, "the boat..."),  # ... and drops the space after it
    (WORDS, -13, "...the bank"),  # text[-13:] == "ward the bank" ('...oat under' in the trial)
    (WORDS, -8, "...the bank"),
    (WORDS, -9, "...the bank"),
    (WORDS, 100, WORDS),  # short enough: whole, no dots
    ("supercalifragilistic word", 6, "superc..."),  # one word longer than the excerpt: cut inside
    ("a antidisestablishmentarianism", -6, "...ianism"),
])
def test_excerpts_are_cut_between_words(text, n, expected):
    assert _ellipsis(text, n) == expected


def test_a_long_title_is_cut_between_words():
    text = " ".join(f"word{i}" for i in range(60))
    head, _, tail = _title(text, 512).removeprefix("all-MiniLM-L6-v2 attention: ").partition(" ... ")
    assert text.startswith(head + " ") and text.endswith(" " + tail.removesuffix(" [cut at 512 positions]"))
    assert 70 <= len(head) <= 80 and 30 <= len(tail.removesuffix(" [cut at 512 positions]")) <= 40


def test_layer_gives_the_true_rollout_note(tmp_path):
    out = tmp_path / "layer.html"
    assert main(["viz", "The boat drifted to the bank of the river.", "--out", str(out), "--layer", "2"]) == 0
    data = page_data(out)
    assert not any(L.get("rollout") for L in data["layers"])
    assert "this page shows one ('blocks.2.attn')" in data["note"] and "2048" not in data["note"]
    assert main(["viz", "The boat drifted to the bank of the river.", "--out", str(out)]) == 0
    assert page_data(out)["layers"][-1]["rollout"] and page_data(out)["note"] == ""


class Terminal:
    """A stderr that says it is a terminal and records what was written."""

    def __init__(self):
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_for_long_inputs_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    err = Terminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", err)
    for text, long in ((long_text(700), True), ("The boat drifted to the bank of the river.", False)):
        err.text = ""
        assert main(["viz", text, "--out", str(tmp_path / "p.html"), "--layer", "3"]) == 0
        written = err.text if terminal else capsys.readouterr().err
        bar = re.findall(r"\rattention page, (\d+) tokens: .*?(\d+)/(\d+) ", written)
        if terminal and long:
            assert bar and bar[0][0] == "512" and bar[0][2] == str(12 * 512), written[:300]  # layer 3's 12 heads' rows
        else:  # a short input, or stderr is a file or pipe: no bar, no carriage returns
            assert not bar and "\r" not in written, written[:300]
