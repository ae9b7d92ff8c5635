"""attnkit.distributed.ContextParallelAttention inside nn.MultiHeadAttention / DecoderLM / Encoder.

Oracle: the same module (a deep copy, same weights) on the whole sequence in one process, exact
attention. Each rank runs its shard (``shard(..., dim=1)``) with its global positions, and after
backward the parameter gradients are all-reduced (SUM), as data parallelism does; outputs, input
gradients, parameter gradients, the loss and the parameters after an optimizer step must equal the
oracle's. One spawn per world size runs every case (processes are slow to start on a small machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _dist import run_ranks
from torch import nn

import attnkit as ak
from attnkit import nn as aknn
from attnkit.distributed import ContextParallelAttention, parallelize, positions, shard

E, H, V, B = 32, 4, 50, 2


def _rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """max |got - want| over max(max |want|, floor): one number per tensor, relative to its scale.
    ``floor``: a gradient that is zero in exact arithmetic (a key bias without RoPE shifts every
    score of a query alike, which softmax ignores) is rounding noise on both sides."""
    return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), floor)


def _all_reduce_grads(params) -> None:
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


# -- MultiHeadAttention: outputs, input and parameter gradients (float64) -----------------------------

MHA_CASES = {  # name: (layout, positional, num_kv_heads, mask, softcap, user bias, (B, n) positions)
    "rope-gqa-causal-zigzag": ("zigzag", "rope", 2, "causal", None, False, False),
    "rope-window-striped-batch-positions": ("striped", "rope", 4, "window", None, False, True),
    "alibi-gqa-softcap-bias-contiguous": ("contiguous", "alibi", 1, "causal", 5.0, True, False),
}


def _mha_case(rank: int, world: int, case: tuple) -> dict[str, float]:
    layout, pos, Hkv, mask_name, softcap, user_bias, batch_positions = case
    torch.manual_seed(3)
    N = 37  # not a multiple of 2P: uneven shards
    positional = {"rope": aknn.RotaryEmbedding(E // H), "alibi": aknn.ALiBi(H)}[pos]
    mha = aknn.MultiHeadAttention(E, H, num_kv_heads=Hkv, positional=positional, softcap=softcap).double()
    mask = ak.causal() if mask_name == "causal" else ak.sliding_window(5, 3)
    bias = 0.3 * torch.randn(H, N, N, dtype=torch.float64) if user_bias else None
    x = torch.randn(B, N, E, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, N, E, dtype=torch.float64)
    ref = mha(x, mask=mask, bias=bias)  # (B, N, E), positions 0..N-1
    (ref * w).sum().backward()

    cp = copy.deepcopy(mha)
    cp.zero_grad()
    assert parallelize(cp, layout=layout) == [""]
    xl = shard(x.detach(), rank, world, dim=1, layout=layout).requires_grad_()
    pl = cp.core.positions(N)
    pl = pl.expand(B, -1) if batch_positions else pl
    out = cp(xl, mask=mask, bias=bias, positions=pl)  # (B, n, E)
    (out * shard(w, rank, world, dim=1, layout=layout)).sum().backward()
    _all_reduce_grads(cp.parameters())
    errs = {"out": _rel_err(out, shard(ref, rank, world, dim=1, layout=layout)),
            "dx": _rel_err(xl.grad, shard(x.grad, rank, world, dim=1, layout=layout))}
    for (name, p), q in zip(cp.named_parameters(), mha.parameters()):
        errs[f"d{name}"] = _rel_err(p.grad, q.grad, floor=1e-8)
    return errs


# -- DecoderLM / Encoder: one training step (float32) --------------------------------------------------

def _decoder(pos: str) -> aknn.DecoderLM:
    torch.manual_seed(0)
    absolute = aknn.LearnedPositionalEmbedding(64, E) if pos == "learned" else None
    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=2, positional=(
                  aknn.RotaryEmbedding(E // H) if pos == "rope" else aknn.ALiBi(H) if pos == "alibi" else None)),
                                aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E)) for _ in range(2)]
    return aknn.DecoderLM(aknn.TokenEmbeddings(V, E, positional=absolute), blocks, aknn.RMSNorm(E),
                          nn.Linear(E, V, bias=False))


def _train_step(model: nn.Module, ids, targets, total: int, positions=None, world: int = 1):
    """One SGD step on loss = sum of cross-entropy over the given tokens / total tokens; returns the
    loss summed over ranks and the (all-reduced) gradients."""
    import torch.distributed as dist
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    logits = model(ids) if positions is None else model(ids, positions=positions)  # (B, n, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / total
    loss.backward()
    if world > 1:
        _all_reduce_grads(model.parameters())
        loss = loss.detach().clone()
        dist.all_reduce(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


def _decoder_case(rank: int, world: int, layout: str, pos: str) -> dict[str, float]:
    N = 48
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, N + 1), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model = _decoder(pos)
    ref = copy.deepcopy(model)
    ref_loss, ref_grads = _train_step(ref, inputs, targets, B * N)

    parallelize(model, layout=layout)
    core = model.blocks[0].attn.core
    loss, grads = _train_step(model, core.shard(inputs), core.shard(targets), B * N,
                              positions=positions(layout, rank, world, N), world=world)
    errs = {"loss": _rel_err(loss, ref_loss)}
    for (name, p), q, g, rg in zip(model.named_parameters(), ref.parameters(), grads, ref_grads):
        errs[f"grad {name}"] = _rel_err(g, rg, floor=1e-3)
        errs[f"param {name}"] = _rel_err(p, q)
    return errs


def _encoder_case(rank: int, world: int, layout: str) -> dict[str, float]:
    torch.manual_seed(5)
    N = 29
    blocks = [aknn.PostNormBlock(aknn.MultiHeadAttention(E, H, positional=aknn.RotaryEmbedding(E // H)),
                                 aknn.FeedForward(E, 64), nn.LayerNorm(E), nn.LayerNorm(E)) for _ in range(2)]
    model = aknn.Encoder(aknn.TokenEmbeddings(V, E, positional=aknn.LearnedPositionalEmbedding(32, E)), blocks,
                         mask=ak.sliding_window(6)).double()
    ids = torch.randint(0, V, (B, N))
    ref = model(ids)
    parallelize(model, layout=layout)
    out = model(shard(ids, rank, world, dim=1, layout=layout), positions=positions(layout, rank, world, N))
    return {"encoder out": _rel_err(out, shard(ref, rank, world, dim=1, layout=layout))}


def _every_case(rank: int, world: int, mha_cases: tuple, decoder_cases: tuple,
                encoder_layouts: tuple) -> dict[str, dict[str, float]]:
    results = {f"mha {name}": _mha_case(rank, world, MHA_CASES[name]) for name in mha_cases}
    for layout, pos in decoder_cases:
        results[f"decoder {layout} {pos}"] = _decoder_case(rank, world, layout, pos)
    for layout in encoder_layouts:
        results[f"encoder {layout}"] = _encoder_case(rank, world, layout)
    return results


# float64 cases are exact to rounding; the training step runs in float32 (sums in another order)
TOL = {"mha": 1e-10, "encoder": 1e-10, "decoder": 2e-5}


@pytest.mark.parametrize("world, mha_cases, decoder_cases, encoder_layouts", [
    (2, tuple(MHA_CASES), (("zigzag", "rope"), ("contiguous", "rope"), ("zigzag", "learned"), ("contiguous", "alibi")),
     ("striped",)),
    pytest.param(4, ("rope-gqa-causal-zigzag",), (("zigzag", "rope"),), (),  # 4 processes on 2 cores: ~30 s
                 marks=pytest.mark.slow),
])
def test_sharded_modules_equal_the_whole_sequence(world, mha_cases, decoder_cases, encoder_layouts):
    per_rank = run_ranks(_every_case, world, mha_cases, decoder_cases, encoder_layouts, timeout_s=240)
    bad = []
    for rank, results in enumerate(per_rank):
        for case, errs in results.items():
            tol = TOL[case.split()[0]]
            bad += [f"rank {rank} {case} {what}: {err:.3g} > {tol:g}" for what, err in errs.items() if not err <= tol]
    assert not bad, "\n".join(bad)
    assert len(per_rank[0]) == len(mha_cases) + len(decoder_cases) + len(encoder_layouts)


# -- refusals, in one process (they are raised before any communication) ------------------------------

def _cp_decoder(pos: str = "rope") -> aknn.DecoderLM:
    model = _decoder(pos)
    parallelize(model)
    return model


def test_dropout_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="dropout=0.1 .* has no dropout"):
        aknn.MultiHeadAttention(E, H, dropout=0.1, core=ContextParallelAttention())
    model = aknn.DecoderLM(aknn.TokenEmbeddings(V, E), [aknn.PreNormBlock(
        aknn.MultiHeadAttention(E, H, dropout=0.1), aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E))],
        aknn.RMSNorm(E), nn.Linear(E, V))
    with pytest.raises(ValueError, match="has no dropout"):
        parallelize(model)
    assert model.blocks[0].attn.core is None  # nothing changed


def test_an_exact_core_takes_alibi_and_softcap_an_approximate_one_does_not():
    aknn.MultiHeadAttention(E, H, positional=aknn.ALiBi(H), softcap=10.0, core=ContextParallelAttention())
    with pytest.raises(ValueError, match="additive bias"):
        aknn.MultiHeadAttention(E, H, positional=aknn.ALiBi(H), core=ak.approx.LinearAttention())


def test_dynamic_rope_is_refused_on_a_sharded_sequence():
    rope = aknn.RotaryEmbedding(E // H, scaling=aknn.RopeScaling("dynamic", factor=2.0, max_position_embeddings=16))
    with pytest.raises(ValueError, match="dynamic NTK RoPE"):
        aknn.MultiHeadAttention(E, H, positional=rope, core=ContextParallelAttention())


def test_a_cache_is_refused_with_the_reason():
    model = _cp_decoder()
    with pytest.raises(ValueError, match="context parallelism is for training and prefill"):
        model.new_cache()
    with pytest.raises(ValueError, match="context parallelism is for training and prefill"):
        model.generate(torch.randint(0, V, (1, 4)), 2)
    mha = model.blocks[0].attn
    cache = aknn.KVCache()
    with pytest.raises(ValueError, match="context parallelism is for training and prefill"):
        mha(torch.randn(1, 4, E), cache=cache, positions=torch.arange(4))
    assert len(cache) == 0 and cache.position == 0  # refused before anything was stored
    with pytest.raises(ValueError, match="not decoding"):
        mha.core(*(torch.randn(1, H, 4, E // H) for _ in range(3)), cache=cache)


def test_cross_attention_is_refused():
    mha = aknn.MultiHeadAttention(E, H, core=ContextParallelAttention())
    with pytest.raises(ValueError, match="cross-attention"):
        mha(torch.randn(1, 4, E), torch.randn(1, 6, E))


def test_missing_or_wrong_positions_are_refused():
    ids = torch.randint(0, V, (B, 6))
    with pytest.raises(ValueError, match="DecoderLM: .* pass positions="):  # a learned table would read 0..n-1
        _cp_decoder("learned")(ids)
    model = _cp_decoder()
    with pytest.raises(ValueError, match="pass positions="):
        model.blocks[0].attn(torch.randn(B, 6, E))  # RoPE needs them in the layer too
    for bad in (torch.arange(7), torch.arange(6).expand(B + 1, -1), torch.arange(6.0)):
        with pytest.raises(ValueError, match=r"positions must be integers of shape \(N,\) or \(B, N\)"):
            model(ids, positions=bad)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        model(ids, positions=torch.arange(6) - 1)
    with pytest.raises(ValueError, match="positions= places the tokens itself"):
        model(ids, torch.ones(B, 6), positions=torch.arange(6))
    with pytest.raises(ValueError, match="unknown|not a context-parallel layout"):
        ContextParallelAttention(layout="diagonal")


def test_explicit_positions_on_one_device_are_the_default_ones_and_offset_them():
    """Without a core, positions= 0..N-1 is the default; shifted positions change RoPE and learned
    embeddings exactly as the shift (a learned table's rows) says."""
    ids = torch.randint(0, V, (B, 10))
    for pos in ("rope", "learned"):
        model = _decoder(pos).double()
        torch.testing.assert_close(model(ids, positions=torch.arange(10)), model(ids), rtol=0, atol=0)
    rope = _decoder("rope").double()
    shifted = rope(ids, positions=torch.arange(10) + 3)  # RoPE: relative, so a shift changes nothing
    torch.testing.assert_close(shifted, rope(ids), rtol=1e-10, atol=1e-10)
    learned = _decoder("learned").double()
    assert not torch.allclose(learned(ids, positions=torch.arange(10) + 3), learned(ids))
