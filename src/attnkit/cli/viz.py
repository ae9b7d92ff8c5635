"""``attnkit viz TEXT --png maps.png``: the real all-MiniLM-L6-v2's attention on TEXT, as a picture.

    attnkit viz "The boat drifted to the bank of the river." --png maps.png   # 6 layers x 12 heads
    attnkit viz "..." --layer 5 --png layer5.png                              # one layer's heads
    attnkit viz "..." --layer 5 --head 3 --png map.png                        # one matrix, labelled
    attnkit viz "..." --layer 5 --token bank --png bank.png                   # what "bank" attends to

The model runs through ``attnkit.pretrained.load_bert``; ``attnkit.viz.capture`` records each
layer's q and k, and only the maps the picture needs are computed.
"""

from __future__ import annotations

import argparse

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the sentence to encode")
    p.add_argument("--png", default="attention.png", help="output picture (.png, .svg or .pdf)")
    p.add_argument("--layer", type=int, help="only this layer (0-based)")
    p.add_argument("--head", type=int, help="only this head of --layer (0-based)")
    p.add_argument("--token", help="draw what this token (a word piece, or its index) attends to")


def _token_index(token: str, tokens: list[str]) -> int:
    if token.lstrip("-").isdigit():
        index = int(token)
    elif token.lower() in tokens:
        index = tokens.index(token.lower())
    else:
        raise ValueError(f"--token {token!r} is not one of the word pieces {tokens}; give one of them or its index")
    if not 0 <= index < len(tokens):
        raise ValueError(f"--token {index} is out of range: the text has {len(tokens)} tokens (0..{len(tokens) - 1})")
    return index


def _check_range(name: str, value: int | None, n: int) -> None:
    if value is not None and not 0 <= value < n:
        raise ValueError(f"--{name} {value} is out of range: the model has {n} ({name}s 0..{n - 1})")


def _span(name: str, chosen: list[int], n: int) -> str:
    return f"all {n} {name}s" if len(chosen) == n else f"{name} {', '.join(map(str, chosen))}"


def run_viz(args: argparse.Namespace) -> int:
    from ..pretrained import load_bert, minilm_path
    from ..viz import capture
    from ..viz.plot import plot_grid, plot_map, plot_token, save

    bundle = load_bert(minilm_path())
    ids, valid = bundle.encode([args.text])  # (1, N)
    tokens = bundle.tokens(args.text)
    with torch.no_grad(), capture(bundle.model) as cap:
        bundle.model(ids, valid)
    L, H = len(cap.names), cap[cap.names[0]].shape[1]
    _check_range("layer", args.layer, L)
    _check_range("head", args.head, H)
    if args.head is not None and args.layer is None:
        raise ValueError("--head needs --layer (which layer's head)")
    layers = list(range(L)) if args.layer is None else [args.layer]
    heads = list(range(H)) if args.head is None else [args.head]
    if args.token is not None:
        query = _token_index(args.token, tokens)
        per_layer = [cap[cap.names[l_i]].weights(heads=heads)[0].mean(0) for l_i in layers]  # (N, N) each
        fig = plot_token(torch.stack(per_layer).mean(0), tokens, query,
                         title=f"attention from {tokens[query]!r}: mean over {_span('layer', layers, L)}, "
                               f"{_span('head', heads, H)}")
    elif len(layers) == 1 and len(heads) == 1:
        w = cap[cap.names[layers[0]]].weights(heads=heads)[0, 0]  # (N, N)
        fig = plot_map(w, tokens, title=f"layer {layers[0]}, head {heads[0]}")
    else:
        maps = [[cap[cap.names[l_i]].weights(heads=[h])[0, 0] for h in heads] for l_i in layers]
        fig = plot_grid(maps, tokens, layer_names=[f"layer {l_i}" for l_i in layers])
    path = save(fig, args.png)
    print(f"wrote {path} ({len(tokens)} tokens, layers {layers}, heads {heads})")
    return 0
