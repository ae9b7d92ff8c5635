"""Static views: files are written in each format, have a plausible size and are not blank."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from attnkit.viz import capture  # noqa: E402
from attnkit.viz.plot import plot_grid, plot_map, plot_mask, plot_token, save  # noqa: E402


def not_blank(path) -> None:
    pixels = imread(path)  # (h, w, channels) floats in [0, 1]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05, "the picture is (nearly) one colour"


@pytest.fixture(scope="module")
def minilm_maps():
    from attnkit.pretrained import load_bert, minilm_path
    bundle = load_bert(minilm_path())
    sentence = "The boat drifted to the bank of the river."
    ids, valid = bundle.encode([sentence])
    with torch.no_grad(), capture(bundle.model) as cap:
        bundle.model(ids, valid)
    return bundle.tokens(sentence), [cap[name].weights()[0] for name in cap.names]  # L x (H, N, N)


def test_grid_of_the_real_model(minilm_maps, tmp_path):
    tokens, layers = minilm_maps
    fig = plot_grid([[w[h] for h in range(4)] for w in layers[:3]], tokens)
    path = save(fig, tmp_path / "grid.png")
    assert path.stat().st_size > 20_000
    not_blank(path)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_one_map_in_every_format(minilm_maps, tmp_path, suffix):
    tokens, layers = minilm_maps
    path = save(plot_map(layers[-1][0], tokens, title="layer 6, head 0"), tmp_path / f"map{suffix}")
    assert path.stat().st_size > 5_000
    if suffix == ".png":
        not_blank(path)
    elif suffix == ".svg":
        assert path.read_text().lstrip().startswith("<?xml") and "river" in path.read_text()


def test_token_bars_and_mask_picture(minilm_maps, tmp_path):
    tokens, layers = minilm_maps
    bank = tokens.index("bank")
    not_blank(save(plot_token(layers[-1].mean(0), tokens, bank), tmp_path / "bank.png"))
    mask = (ak.sliding_window(3) | ak.global_tokens([0])) & ak.causal()
    not_blank(save(plot_mask(mask, 24), tmp_path / "mask.png"))


def test_bad_inputs_explain_themselves(tmp_path):
    with pytest.raises(ValueError, match=r"one \(Nq, Nk\) matrix"):
        plot_map(torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="one label per token"):
        plot_map(torch.rand(3, 3), ["a", "b"])
    with pytest.raises(ValueError, match="expected one of"):
        save(plot_map(torch.rand(3, 3)), tmp_path / "x.jpg")


SENTENCE = "The boat drifted to the bank of the river."


@pytest.mark.parametrize("options", [[], ["--layer", "5"], ["--layer", "5", "--head", "3"],
                                     ["--layer", "5", "--token", "bank"], ["--token", "3"]])
def test_cli_writes_a_picture(tmp_path, options, capsys):
    from attnkit.cli.main import main
    path = tmp_path / "out.png"
    assert main(["viz", SENTENCE, "--png", str(path), *options]) == 0
    not_blank(path)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("options,message", [(["--layer", "6"], "out of range"), (["--head", "1"], "needs --layer for a picture"),
                                             (["--token", "money"], "not one of the word pieces")])
def test_cli_bad_options_say_why(tmp_path, options, message, capsys):
    from attnkit.cli.main import main
    assert main(["viz", SENTENCE, "--png", str(tmp_path / "x.png"), *options]) == 2
    assert message in capsys.readouterr().err
