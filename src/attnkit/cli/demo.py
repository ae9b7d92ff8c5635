"""``attnkit demo``: the seed pipeline on the CPU, step by step, in about a minute."""

from __future__ import annotations

import math
import time

import torch

import attnkit as ak

TOKENS = ["The", "boat", "drifted", "to", "the", "bank"]


def _title(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}")


def step_multi_head() -> None:
    """Multi-head self-attention by hand: W_q, W_k, W_v, H heads, concat, W_o."""
    _title("1. Multi-head self-attention, one token at a time (d_model=16, H=2, d_k=8)")
    g = torch.Generator().manual_seed(0)
    N, d_model, H = len(TOKENS), 16, 2
    d_k = d_model // H
    x = torch.randn(1, N, d_model, generator=g)  # (B, N, d_model) token embeddings
    W_q, W_k, W_v, W_o = (torch.randn(d_model, d_model, generator=g) / math.sqrt(d_model) for _ in range(4))
    split = lambda t: t.view(1, N, H, d_k).transpose(1, 2)  # noqa: E731  (B, N, d) -> (B, H, N, d_k)
    q, k, v = split(x @ W_q), split(x @ W_k), split(x @ W_v)
    weights = ak.attention_weights(q, k, mask=ak.causal())  # (B, H, N, N) softmax(QK^T/sqrt(d_k))
    heads = ak.attention(q, k, v, mask=ak.causal())  # (B, H, N, d_k) = weights @ V
    out = heads.transpose(1, 2).reshape(1, N, d_model) @ W_o  # concat heads, project
    print("causal attention weights of head 0 (row = query, column = key; rows sum to 1):")
    print("          " + "".join(f"{t:>8}" for t in TOKENS))
    for t, row in zip(TOKENS, weights[0, 0].tolist()):
        print(f"{t:>10}" + "".join(f"{p:8.3f}" for p in row))
    manual = (weights @ v).transpose(1, 2).reshape(1, N, d_model) @ W_o
    print(f"output {tuple(out.shape)}; max |ak.attention - weights @ V| = {(out - manual).abs().max():.1e}")


def step_masks() -> None:
    _title("2. The mask language: compose with & | ~  (rows = queries, columns = keys)")
    ids = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    examples = [
        ("causal(), Nq=3 Nk=5 (bottom-right: the newest query sees every key)", ak.causal(), 3, 5),
        ("sliding_window(2) | global_tokens([0, 9])  (Longformer)",
         ak.sliding_window(2) | ak.global_tokens([0, 9]), 16, 16),
        ("causal() & document(ids)  (3 packed sequences)", ak.causal() & ak.document(ids), 16, 16),
        ("causal() & sliding_window(3) & key_padding([12])",
         ak.causal() & ak.sliding_window(3) & ak.key_padding([12]), 16, 16),
    ]
    for text, mask, nq, nk in examples:
        print(f"\n{text}\n{mask.to_ascii(nq, nk)}")
    kinds = (ak.sliding_window(2) | ak.global_tokens([0, 9])).block_kinds(16, 16, 4, 4)[0, 0]
    print("\nits 4x4 tiles, as a fast path sees them (. empty, ~ partial, # full):")
    print("\n".join("".join(".~#"[x] for x in row) for row in kinds.tolist()))


def step_backends() -> None:
    _title("3. Every backend on one input (B=2, Hq=8, Hkv=2, N=300, D=64, causal & window | global)")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 300, 64, generator=g)
    k, v = torch.randn(2, 2, 300, 64, generator=g), torch.randn(2, 2, 300, 64, generator=g)
    mask = ak.causal() & ak.sliding_window(48) | ak.global_tokens([0, 150])
    oracle = ak.attention(q.double(), k.double(), v.double(), mask=mask, impl="reference")
    print(ak.explain(q, k, v, mask=mask))
    for impl in ("reference", "sdpa", "banded", "tiled", "auto"):
        t0 = time.perf_counter()
        out = ak.attention(q, k, v, mask=mask, impl=impl)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"  {impl:<10} max |out - float64 reference| = {(out.double() - oracle).abs().max():.2e}  ({ms:.0f} ms)")


def step_long(n: int) -> None:
    from ..bench.process import compare_samples, measure_in_child
    _title(f"4. Exact attention at N={n} (B=1, H=1, D=64, fp32, forward): tiled vs reference")
    print("each runs in a fresh process so that its peak memory is its own ...")
    rows = {impl: measure_in_child(impl, n) for impl in ("tiled", "reference")}
    for impl, r in rows.items():
        print(f"  {impl:<10} {r['ms']:8.0f} ms   extra peak memory {r['extra_mb']:8.0f} MB")
    t, ref = rows["tiled"], rows["reference"]
    print(f"  tiled uses {ref['extra_mb'] / max(t['extra_mb'], 1):.0f}x less memory "
          f"(reference holds the {n}x{n} score matrix: {n * n * 4 / 2**20:.0f} MB each), "
          f"max |difference| {compare_samples(t, ref):.1e}")


def step_longformer(n: int) -> None:
    from ..bench.process import LONGFORMER_GLOBALS, LONGFORMER_WINDOW, measure_in_child
    heads, d = 12, 64
    _title(f"5. Longformer at N={n} (B=1, H={heads}, D={d}, fp32, forward): window {LONGFORMER_WINDOW} "
           f"each side + {LONGFORMER_GLOBALS} global tokens, vs dense attention")
    print("mask = ak.sliding_window(256) | ak.global_tokens(16 positions), run by impl='banded':")
    print("each query sees 513 neighbours and the 16 global tokens; the global tokens see everything.")
    print("each runs in a fresh process so that its peak memory is its own ...")
    runs = [("Longformer, banded", "banded", "longformer"), ("dense, torch SDPA", "sdpa", "none")]
    rows = {label: measure_in_child(impl, n, heads, d, mask) for label, impl, mask in runs}
    for label, r in rows.items():
        print(f"  {label:<20} {r['ms']:8.0f} ms   extra peak memory {r['extra_mb']:8.0f} MB   "
              f"max |error| vs float64 reference rows {r['max_err']:.1e}")
    lf, dense = rows["Longformer, banded"], rows["dense, torch SDPA"]
    pairs = n * (2 * LONGFORMER_WINDOW + 1) + 2 * LONGFORMER_GLOBALS * n
    print(f"  Longformer computes {pairs / n**2:.1%} of the N x N pairs: {dense['ms'] / lf['ms']:.1f}x faster "
          f"than dense; its cost grows linearly in N, dense attention's quadratically")


BANK_SENTENCES = [
    "The boat drifted to the bank of the river.",
    "We sat on the bank and watched the water.",
    "She deposited the money at the bank.",
    "The bank raised its interest rates on money.",
]


def _bank_attention(bundle, sentences: list[str], top: int = 5) -> list[list[tuple[str, float]]]:
    """For each sentence, the tokens "bank" attends to most in the last layer (mean over heads)."""
    from ..viz import capture

    ids, valid = bundle.encode(sentences)  # (B, N), (B, N)
    last = f"blocks.{len(bundle.model.blocks) - 1}.attn"
    with torch.no_grad(), capture(bundle.model, layers=[last]) as cap:
        bundle.model(ids, valid)
    weights = cap[last].weights().mean(1)  # (B, N, N), mean over heads
    rows = []
    for b, sentence in enumerate(sentences):
        tokens = bundle.tokens(sentence)
        row = weights[b, tokens.index("bank"), :len(tokens)]  # (N_b,) over the real keys
        best = row.topk(top)
        rows.append([(tokens[j], p) for p, j in zip(best.values.tolist(), best.indices.tolist())])
    return rows


def _bank_vectors(bundle, sentences: list[str]):
    """Cosine similarities (B, B) of the last layer's vector for the token "bank" in each sentence."""
    ids, valid = bundle.encode(sentences)  # (B, N), (B, N)
    with torch.no_grad():
        hidden = bundle.model(ids, valid)  # (B, N, E)
    rows = [hidden[b, bundle.tokens(s).index("bank")] for b, s in enumerate(sentences)]
    vecs = torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # (B, E)
    return vecs @ vecs.T


def step_pretrained() -> None:
    _title("6. Real weights: all-MiniLM-L6-v2 (BERT, 6 layers, H=12) as an attnkit Encoder")
    try:
        from ..pretrained import load_bert, minilm_path
        bundle = load_bert(minilm_path())
    except ImportError as e:
        print(f"skipped: {e}")
        return
    emb = bundle.embed(BANK_SENTENCES)  # (B, E), mean-pooled and L2-normalized
    sim = emb @ emb.T  # (B, B) cosine similarities
    print("cosine similarity of the sentence embeddings (mean pooling, as sentence-transformers):")
    print(f"  {'':<50}" + "".join(f"{f'[{i}]':>6}" for i in range(len(BANK_SENTENCES))))
    for i, (sentence, row) in enumerate(zip(BANK_SENTENCES, sim.tolist())):
        print(f"  [{i}] {sentence:<46}" + "".join(f"{x:6.2f}" for x in row))
    senses = _bank_vectors(bundle, BANK_SENTENCES)  # (B, B) cosine of the "bank" token vectors
    print('the token "bank" itself after 6 layers of attention (cosine of its vectors: one word piece, '
          'four contexts):')
    for i, row in enumerate(senses.tolist()):
        print(f"  [{i}] " + "".join(f"{x:6.2f}" for x in row))
    same = [senses[0, 1].item(), senses[2, 3].item()]
    cross = senses[:2, 2:].flatten().tolist()
    print(f"  same sense (river/river, money/money): {same[0]:.2f}, {same[1]:.2f}; across senses: "
          f"{min(cross):.2f}..{max(cross):.2f}: attention moved each 'bank' toward its context")
    print('what "bank" attends to in the last layer (attention weights, mean over the 12 heads):')
    for i, row in zip((0, 2), _bank_attention(bundle, [BANK_SENTENCES[0], BANK_SENTENCES[2]])):
        print(f"  [{i}] " + "  ".join(f"{tok} {p:.2f}" for tok, p in row))
    print("  ([CLS] soaks up much of it, as in most BERTs; the rest goes to the words that say which bank)")
    print(f'  every layer and head, in a page that opens offline: attnkit viz "{BANK_SENTENCES[0]}" --out maps.html')


def run_demo(long_n: int = 16384) -> int:
    t0 = time.perf_counter()
    print(f"attnkit {ak.__version__} demo, torch {torch.__version__}, CPU ({torch.get_num_threads()} threads)")
    step_multi_head()
    step_masks()
    step_backends()
    step_long(long_n)
    step_longformer(long_n)
    step_pretrained()
    print(f"\ndone in {time.perf_counter() - t0:.0f} s. Next: `attnkit info`, `attnkit bench`, docs/.")
    return 0
