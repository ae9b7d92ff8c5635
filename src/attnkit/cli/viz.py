"""``attnkit viz TEXT --out maps.html --png maps.png``: the real all-MiniLM-L6-v2's attention on TEXT,
or, with ``--model DIR``, the attention of any local transformers checkpoint.

    attnkit viz "The boat drifted to the bank of the river." --out maps.html  # the interactive page
    attnkit viz "The boat drifted to the bank of the river." --png maps.png   # 6 layers x 12 heads
    attnkit viz "..." --layer 5 --png layer5.png                              # one layer's heads
    attnkit viz "..." --layer 5 --head 3 --png map.png                        # one matrix, labelled
    attnkit viz "..." --layer 5 --token bank --png bank.png                   # what "bank" attends to

``--out`` writes the self-contained page (head view, model view, statistics, rollout; opens from
disk with no network); ``--layer`` / ``--head`` keep those layers and heads in it, ``--token`` pins
that token. With neither ``--out`` nor ``--png``, the picture goes to attention.png.

The model reads at most 512 positions ([CLS] and [SEP] included): a longer text is cut there, and
then a warning on stderr and on the page says so, and the page's title holds only the text shown
(a long one by its start and its end).
For long inputs the page shows a tqdm progress bar while it summarizes the maps (on a terminal only).

The model runs through ``attnkit.pretrained.load_bert``; ``attnkit.viz.capture`` records each
layer's q and k, and only the maps the picture needs are computed.

``--model DIR``: a local checkpoint folder as ``save_pretrained`` writes it (config.json, weights in
``*.safetensors``, the tokenizer's files), loaded offline (``local_files_only``) with transformers'
``AutoModel`` / ``AutoTokenizer`` and ``attn_implementation="attnkit"``, so that every attention call
is recorded (``attnkit.integrations.transformers.observing``); layers are named as the model names
them ("layers.0.self_attn"). Weights load only from safetensors: a folder with only pickled weights
(``pytorch_model.bin``) is refused, since unpickling can run code. The text is cut at the model's
length (the tokenizer's ``model_max_length`` or the config's ``max_position_embeddings``, the
smaller), with the same warning as above.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ._paths import check_output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the sentence to encode")
    p.add_argument("--out", help="write the interactive page here (.html); its directory must exist (checked "
                                 "before the model runs)")
    p.add_argument("--png", help="write a picture here (.png, .svg or .pdf; the default when --out is not given: "
                                 "attention.png in the current directory); its directory must exist")
    p.add_argument("--layer", type=int, help="only this layer (0-based)")
    p.add_argument("--head", type=int, help="only this head (0-based; for --png it needs --layer)")
    p.add_argument("--token", help="draw what this token (a word piece, or its index) attends to")
    p.add_argument("--model", metavar="DIR", help="a local transformers checkpoint folder (config.json, *.safetensors "
                                                  "weights, tokenizer files) to show instead of the bundled "
                                                  "all-MiniLM-L6-v2; loaded offline, safetensors only")


def _token_index(token: str, tokens: list[str]) -> int:
    if token.lstrip("-").isdigit():
        index = int(token)
    elif token in tokens:  # exact first: [CLS], [SEP]
        index = tokens.index(token)
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


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output names, unwritable output paths and option combinations before the model runs."""
    from ..viz.plot import FORMATS

    png_option = "--png"
    if args.out is None and args.png is None:
        args.png, png_option = "attention.png", "--png (default)"
    if args.out is not None and not args.out.lower().endswith((".html", ".htm")):
        raise ValueError(f"--out {args.out!r}: expected a path ending in .html (the page); use --png for pictures")
    if args.png is not None and not args.png.lower().endswith(FORMATS):
        raise ValueError(f"--png {args.png!r}: expected a path ending in one of {', '.join(FORMATS)}")
    if args.png is not None and args.head is not None and args.layer is None:
        raise ValueError("--head needs --layer for a picture (which layer's head); the page (--out) takes --head "
                         "alone")
    for option, path in (("--out", args.out), (png_option, args.png)):
        if path is not None:
            check_output_file(path, option)  # an OutputPathError (a ValueError) names the option and the fix


def _shown_text(tokenizer, text: str) -> tuple[str, str | None]:
    """The part of ``text`` the model reads (the tokenizer cuts it at its max_length) and, when
    that is not all of it, a warning that says how much was left out."""
    encoding = tokenizer.encode(text)
    if not encoding.overflowing:
        return text, None
    whole = type(tokenizer).from_str(tokenizer.to_str())  # a copy that does not truncate
    whole.no_truncation()
    whole.no_padding()
    total = len(whole.encode(text, add_special_tokens=False).ids)
    kept = [end for (_, end), special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
    shown, rest = text[:max(kept)], text[max(kept):].strip()
    return shown, (f"the text is {total} word pieces but the model reads at most {len(encoding.ids)} positions, "
                   f"[CLS] and [SEP] included: only the first {len(kept)} pieces are shown, up to "
                   f"{_ellipsis(shown, -40)!r}; the rest ({len(rest)} characters from {_ellipsis(rest, 40)!r}) is "
                   "left out. Shorten the text or split it into parts")


TITLE_HEAD, TITLE_TAIL = 80, 40  # characters of a long text's start and end in the page's title


def _title(shown: str, cut_at: int | None, model: str = "all-MiniLM-L6-v2") -> str:
    """The page's title: the model, the text it read (its start and end when long), and where it was cut."""
    if len(shown) > TITLE_HEAD + TITLE_TAIL + 5:
        shown = f"{_excerpt(shown, TITLE_HEAD)} ... {_excerpt(shown, -TITLE_TAIL)}"
    return f"{model} attention: {shown}" + ("" if cut_at is None else f" [cut at {cut_at} positions]")


def _excerpt(text: str, n: int) -> str:
    """At most the first n (last -n when n < 0) characters of text, cut between words.

    A cut that would fall inside a word moves back to the space before that word (the excerpt gets
    shorter); only a word longer than the whole excerpt is cut inside, as there is no space to use.
    """
    if len(text) <= abs(n):
        return text
    if n > 0:
        head, inside = text[:n], not text[n].isspace() and not text[n - 1].isspace()
        space = re.search(r"\s\S*\Z", head) if inside else None
        return (head[:space.start()] if space and head[:space.start()].strip() else head).rstrip()
    tail, inside = text[n:], not text[n - 1].isspace() and not text[n].isspace()
    space = re.search(r"\s", tail) if inside else None
    return (tail[space.start():] if space and tail[space.start():].strip() else tail).lstrip()


def _ellipsis(text: str, n: int) -> str:
    """The first n (last -n when n < 0) characters of text at most, cut between words (see
    :func:`_excerpt`), with "..." where it was cut."""
    if len(text) <= abs(n):
        return text
    return _excerpt(text, n) + "..." if n > 0 else "..." + _excerpt(text, n)


@dataclass(frozen=True)
class Shown:
    """A model's forward pass on the text, captured: what the page and the pictures need."""

    cap: object  # attnkit.viz.Capture
    tokens: list[str]  # one label per position
    special: list[int]  # positions of special tokens ([CLS], [SEP], <s>, ...)
    text: str  # the part of the text the model read
    warning: str | None  # what was cut, or None
    model: str  # the model's name in the title


def _run_minilm(text: str) -> Shown:
    """The bundled all-MiniLM-L6-v2 through ``attnkit.pretrained.load_bert``."""
    from ..pretrained import load_bert, minilm_path
    from ..viz import capture

    bundle = load_bert(minilm_path())
    ids, valid = bundle.encode([text])  # (1, N)
    tokens = bundle.tokens(text)
    shown, warning = _shown_text(bundle.tokenizer, text)
    with torch.no_grad(), capture(bundle.model) as cap:
        bundle.model(ids, valid)
    special = [i for i, t in enumerate(tokens) if t in ("[CLS]", "[SEP]")]
    return Shown(cap, tokens, special, shown, warning, "all-MiniLM-L6-v2")


def run_viz(args: argparse.Namespace) -> int:
    _check_outputs(args)  # before the model: a bad path costs a second, not the run
    folder = None if args.model is None else checkpoint_folder(args.model)
    run = _run_minilm(args.text) if folder is None else _run_checkpoint(folder, args.text)
    if run.warning is not None:
        print(f"attnkit viz: warning: {run.warning}", file=sys.stderr)
    cap, tokens = run.cap, run.tokens
    L, H = len(cap.names), cap[cap.names[0]].shape[1]
    _check_range("layer", args.layer, L)
    _check_range("head", args.head, H)
    layers = list(range(L)) if args.layer is None else [args.layer]
    heads = list(range(H)) if args.head is None else [args.head]
    query = None if args.token is None else _token_index(args.token, tokens)
    if args.out is not None:
        _write_page(run, layers, heads, query, args.out)
    if args.png is not None:
        _write_picture(cap, tokens, layers, heads, query, args.png, (L, H))
    return 0


def _write_page(run: Shown, layers: list[int], heads: list[int], query: int | None, out: str) -> None:
    """The page; its title names the model and the text it read, its notice what was cut."""
    from ..viz.page import SHORT, write_html

    cap, tokens, warning = run.cap, run.tokens, run.warning
    title = _title(run.text, len(tokens) if warning else None, run.model)
    path = write_html(cap, tokens, out, layers=[cap.names[l_i] for l_i in layers], heads=heads, special=run.special,
                      focus=query, title=title, notices=[f"Input cut short: {warning}."] if warning else [],
                      progress=len(tokens) > SHORT)
    print(f"wrote {path} ({len(tokens)} tokens, layers {layers}, heads {heads}; open it in a browser, "
          "no network needed)")


# -- a local transformers checkpoint (--model DIR) ------------------------------------------------

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weight files that unpickle: never loaded
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "spiece.model")  # one of these: the folder has a tokenizer


def checkpoint_folder(folder: str) -> Path:
    """``--model DIR`` checked before anything loads: a folder with config.json and safetensors weights.

    Raises:
        ValueError: not a folder, no config.json, no tokenizer files, or no ``*.safetensors``
            (only pickled weights, or none); the message says what to do.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        got = "a file" if path.exists() else "nothing there"
        raise ValueError(f"--model {folder!r}: expected a local checkpoint folder (config.json, *.safetensors "
                         f"weights, tokenizer files, as save_pretrained writes them), got {got}")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {folder!r}: the folder has no config.json; expected a transformers checkpoint "
                         "saved with save_pretrained")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLED)
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise ValueError(f"--model {folder!r}: the folder holds {what} and no *.safetensors file; attnkit viz "
                         "loads safetensors only (unpickling a .bin file can run code). Convert it once, where you "
                         "trust the file: model.save_pretrained(folder, safe_serialization=True)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise _no_tokenizer(folder, f"none of {', '.join(TOKENIZER_FILES)} is there")
    return path


def _no_tokenizer(folder: str | Path, why: str) -> ValueError:
    return ValueError(f"--model {str(folder)!r}: no tokenizer could be loaded from the folder ({why}); save the "
                      "model's tokenizer there too: tokenizer.save_pretrained(folder)")


def _run_checkpoint(folder: Path, text: str) -> Shown:
    """The checkpoint's forward pass on ``text``, captured (transformers, offline, attnkit attention)."""
    from ..integrations import transformers as akt  # registers attn_implementation="attnkit"
    from ..viz import capture
    try:
        model, tokenizer = akt.load_pretrained(folder)
    except (OSError, ValueError) as e:  # files transformers cannot read (the folder was checked for weights first)
        raise ValueError(f"--model {str(folder)!r}: transformers could not load the checkpoint ({str(e).strip()}); "
                         "the folder needs config.json, *.safetensors weights and the tokenizer's files "
                         "(model.save_pretrained(folder), tokenizer.save_pretrained(folder))") from e
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"--model {str(folder)!r}: {type(model).__name__} is an encoder-decoder model; attnkit viz "
                         "shows one sequence's self-attention (an encoder or a decoder-only checkpoint)")
    limit = min(int(tokenizer.model_max_length), getattr(model.config, "max_position_embeddings", None) or 2 ** 62)
    enc = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")
    ids = enc["input_ids"][:1]  # (1, N)
    shown, warning = _checkpoint_cut(tokenizer, text, ids[0].tolist(), limit)
    with torch.no_grad(), capture(model) as cap:
        model(input_ids=ids, attention_mask=enc["attention_mask"][:1])
    if not cap.names:
        raise ValueError(f"--model {str(folder)!r}: the model ({type(model).__name__}) made no attention call "
                         f"through attn_implementation={akt.NAME!r}; its attention code does not use transformers' "
                         "attention interface, so attnkit viz cannot see it")
    special_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # [CLS], [SEP], <s>, </s>, ...
    special = [i for i, t in enumerate(ids[0].tolist()) if t in special_ids]
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids[0].tolist())]
    return Shown(cap, tokens, special, shown, warning, folder.resolve().name)


def _checkpoint_cut(tokenizer, text: str, ids: list[int], limit: int) -> tuple[str, str | None]:
    """The part of ``text`` the model reads (``ids``, cut at ``limit`` positions) and a warning
    saying how much was left out, or (text, None)."""
    total = len(tokenizer(text, truncation=False)["input_ids"])
    if total <= len(ids):
        return text, None
    special = set(tokenizer.all_special_ids)
    shown = tokenizer.decode([t for t in ids if t not in special]).strip()
    return shown, (f"the text is {total} tokens, special tokens included, but the model reads at most {limit} "
                   f"positions: only the first {len(ids)} are shown, up to {_ellipsis(shown, -40)!r}; the rest is "
                   "left out. Shorten the text or split it into parts")


def _write_picture(cap, tokens: list[str], layers: list[int], heads: list[int], query: int | None, png: str,
                   sizes: tuple[int, int]) -> None:
    from ..viz.plot import plot_grid, plot_map, plot_token, save

    L, H = sizes
    if query is not None:
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
    path = save(fig, png)
    print(f"wrote {path} ({len(tokens)} tokens, layers {layers}, heads {heads})")
