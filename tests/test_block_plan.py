"""The block plan (ops/block_plan.py): tile signatures name equal truth, plans are cached by the
mask's structure (a mask rebuilt every call builds no new plan), and a call that hits the cache
reads no tensor value back to the host before its kernel launch. tests/test_triton.py checks the
plan against the materialized mask tile for tile and runs the kernels."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.masks import CONTENT_KEY_MAX, Mask
from attnkit.ops import block_plan
from attnkit.ops.block_plan import cached_plan, make_plan, plan_builds, structure_key

IDS = torch.tensor([0] * 9 + [1] * 20 + [2] * 3 + [3] * 28)  # 60 positions, 4 documents

SIGNATURE_MASKS = {
    "causal": lambda: ak.causal(),
    "window": lambda: ak.sliding_window(7, 3),
    "dilated": lambda: ak.sliding_window(3, dilation=(1, 2)),
    "longformer": lambda: ak.sliding_window(5) | ak.global_tokens([0, 1, 33]),
    "per-sample-global": lambda: ak.sliding_window(2) | ak.global_tokens(torch.rand(2, 60) < 0.1),
    "documents": lambda: ak.causal() & ak.document(IDS),
    "bool-padding": lambda: ak.key_padding(torch.arange(60)[None, :] % 7 != 3) & ak.causal(),
    "padding-under-or": lambda: ak.key_padding([40, 13]) | ak.sliding_window(4),
    "not-window": lambda: ~ak.sliding_window(6),
    "dense": lambda: ak.dense_mask(torch.rand(1, 60) < 0.5),  # rows broadcast: fits Nq = 45 too
}


def _all_tiles(mask: Mask, Nq: int, Nk: int, bm: int, bn: int):
    """Every tile's signature (with its in-bounds extent, as the plan groups them) and truth."""
    nQ, nK = -(-Nq // bm), -(-Nk // bn)
    pq, pk = (t.flatten() for t in torch.meshgrid(torch.arange(nQ), torch.arange(nK), indexing="ij"))
    q0, k0 = pq * bm, pk * bn
    extent = torch.stack([(Nq - q0).clamp(max=bm), (Nk - k0).clamp(max=bn)], 1)
    sig = torch.cat([extent, mask.tile_signature(q0, k0, bm, bn, Nq, Nk)], 1)
    truth = block_plan._tile_truth(mask, pq, pk, Nq, Nk, bm, bn)  # (Bm, Hm, P, BM, BN)
    return sig, truth


@pytest.mark.parametrize("name", list(SIGNATURE_MASKS))
@pytest.mark.parametrize("Nq,Nk,bm,bn", [(60, 60, 8, 8), (45, 60, 16, 8), (60, 60, 4, 16)])
def test_tiles_with_one_signature_have_one_truth(name, Nq, Nk, bm, bn):
    mask = SIGNATURE_MASKS[name]()
    sig, truth = _all_tiles(mask, Nq, Nk, bm, bn)
    _, group = torch.unique(sig, dim=0, return_inverse=True)
    for g in group.unique().tolist():
        members = (group == g).nonzero().flatten()
        first = truth[:, :, members[0]]
        for m in members[1:].tolist():
            assert torch.equal(truth[:, :, m], first), f"{name}: tiles {members[0].item()} and {m} share a signature"


def test_structured_masks_store_few_distinct_tiles():
    """The point of the signatures: a Longformer mask's thousands of partial tiles are a handful
    of patterns (the window's two edges, the global rows and columns)."""
    N = 4096
    plan = make_plan(ak.sliding_window(256) | ak.global_tokens(range(16)), N, N, 64, 64, "cpu")
    partial = int((plan.kv_tile >= 0).sum())
    assert partial > 200 and plan.tiles.shape[2] <= 16, (partial, plan.tiles.shape)
    assert make_plan(ak.causal(), N, N, 64, 64, "cpu").tiles.shape[2] == 1  # the diagonal tile, once
    dense = make_plan(ak.dense_mask(torch.rand(256, 256) < 0.5), 256, 256, 64, 64, "cpu")
    assert dense.tiles.shape[2] == 16  # no structure: every tile its own


REBUILT = {  # a mask as a model builds it in every forward; the tensors it reads may be new each time
    "causal": lambda: ak.causal(),
    "window-global-list": lambda: ak.sliding_window(8) | ak.global_tokens([0, 5]),
    "window-global-range": lambda: ak.sliding_window(8) | ak.global_tokens(torch.arange(3)),
    "new-lengths-each-call": lambda: ak.causal() & ak.key_padding(torch.randint(1, 40, (2,))),
    "documents-same-tensor": lambda: ak.causal() & ak.document(IDS[:40]),
    "documents-equal-small-tensor": lambda: ak.causal() & ak.document(IDS[:40].clone()),
    "dilated": lambda: ak.sliding_window(4, dilation=(1, 2)) & ak.causal(),
}


@pytest.mark.parametrize("name", list(REBUILT))
def test_a_mask_rebuilt_alike_builds_no_new_plan(name):
    first = cached_plan(REBUILT[name](), 40, 40, 16, 16, "cpu")
    builds = plan_builds()
    for _ in range(3):
        assert cached_plan(REBUILT[name](), 40, 40, 16, 16, "cpu") is first
    assert plan_builds() == builds


@pytest.mark.parametrize("a,b", [
    (lambda: ak.sliding_window(8), lambda: ak.sliding_window(9)),
    (lambda: ak.sliding_window(8) | ak.global_tokens([0, 5]), lambda: ak.sliding_window(8) | ak.global_tokens([0, 6])),
    (lambda: ak.causal() & ak.sliding_window(8), lambda: ak.causal() | ak.sliding_window(8)),
    (lambda: ak.sliding_window(4, dilation=(1, 2)), lambda: ak.sliding_window(4, dilation=(2, 1))),
    (lambda: ak.document(IDS[:40]), lambda: ak.document(IDS[:40].flip(0))),
], ids=["window", "global-indices", "and-or", "dilations", "document-ids"])
def test_masks_of_another_structure_get_another_plan(a, b):
    assert structure_key(a()) != structure_key(b())
    assert cached_plan(a(), 40, 40, 16, 16, "cpu") is not cached_plan(b(), 40, 40, 16, 16, "cpu")


def test_a_tensor_changed_in_place_gets_a_new_plan():
    ids = torch.zeros(2000, dtype=torch.long)  # past CONTENT_KEY_MAX: keyed by identity and version
    assert ids.numel() > CONTENT_KEY_MAX
    mask = ak.causal() & ak.document(ids)
    first = cached_plan(mask, 2000, 2000, 64, 64, "cpu")
    assert cached_plan(ak.causal() & ak.document(ids), 2000, 2000, 64, 64, "cpu") is first  # same tensor
    ids[1000:] = 1  # a second document: the old plan would let it see the first
    fresh = cached_plan(mask, 2000, 2000, 64, 64, "cpu")
    assert fresh is not first and fresh.kv_ptr.tolist() != first.kv_ptr.tolist()


def test_key_lengths_are_not_part_of_the_plan():
    plan = make_plan(ak.sliding_window(4) & ak.key_padding([30, 7]), 30, 30, 16, 16, "cpu")
    assert "key_padding" not in repr(plan.mask)
    assert plan.key == structure_key(ak.sliding_window(4))


def _triton_or_skip():
    pytest.importorskip("triton")
    from attnkit.ops.triton import op
    return op


def test_the_call_path_counts_one_plan_for_masks_rebuilt_every_call():
    """ak.attention(impl="triton") in a loop that builds its mask anew each step, as a model does:
    one plan for the forward (no gradient asked), none after."""
    _triton_or_skip()
    q = k = v = torch.randn(2, 2, 40, 16)
    before = plan_builds()
    for step in range(4):
        mask = (ak.sliding_window(5) | ak.global_tokens([0, 17])) & ak.key_padding(torch.tensor([40, 30 - step]))
        got = ak.attention(q, k, v, mask=mask, impl="triton")
        want = ak.attention(q, k, v, mask=mask, impl="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert plan_builds() - before <= 1


class _HostReads:
    """Records every read of a tensor's values into Python (on a GPU, each waits for the device)."""

    NAMES = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def spy(t, *args, _name=name, _original=original, **kwargs):
                self.reads.append((_name, tuple(t.shape)))
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, spy)


GLOBAL = torch.tensor([0, 17])  # tensors a model keeps (buffers) and passes to a mask it builds per call


@pytest.mark.parametrize("mask_of", [
    lambda lengths: ak.sliding_window(5) | ak.global_tokens(GLOBAL),
    lambda lengths: ak.causal() & ak.key_padding(lengths),
    lambda lengths: (ak.sliding_window(3) | ak.global_tokens(GLOBAL)) & ak.key_padding(lengths),
    lambda lengths: ak.causal() & ak.document(IDS[:40]),
    lambda lengths: ak.sliding_window(4, dilation=(1, 2)),
], ids=["longformer", "padding", "longformer-padding", "documents", "dilated"])
def test_a_cache_hit_reads_no_tensor_value_before_the_launch(mask_of, monkeypatch):
    """From ak.attention to the kernel launch, a call whose plan is cached does no host read of a
    tensor's values (int(), bool(), .item(), .tolist(): each is a device sync on a GPU). Here the
    launch is stubbed: the CPU cannot show a device sync, but it can show that none is asked for.
    The tensors are reused, as a model's buffers are (their ranges are checked once per tensor and
    version); a mask built from a Python list reads its (host) values each time it is built."""
    op = _triton_or_skip()
    q = k = v = torch.randn(2, 2, 40, 16)
    lengths = torch.tensor([40, 23])
    ak.attention(q, k, v, mask=mask_of(lengths), impl="triton")  # warm: plan built, lengths checked
    launched = []

    def fake_op(q, k, v, *rest):
        launched.append(rest)
        return torch.empty_like(q), q.new_empty(q.shape[:3])
    monkeypatch.setattr(op, "_attention_op", fake_op)
    reads = _HostReads(monkeypatch)
    builds = plan_builds()
    ak.attention(q, k, v, mask=mask_of(lengths), impl="triton")  # the mask rebuilt, as in a model
    monkeypatch.undo()
    assert launched and plan_builds() == builds
    assert reads.reads == [], f"host reads of tensor values before the launch: {reads.reads}"


@pytest.mark.gpu
def test_a_cache_hit_does_not_sync_and_captures_in_a_cuda_graph():
    """On a GPU: with torch's sync debug mode set to error, a warm call syncs nowhere; the same
    call is captured in a CUDA graph and replays to the eager result."""
    _triton_or_skip()
    dev = "cuda"
    q, k, v = (torch.randn(2, 4, 512, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    lengths = torch.tensor([512, 300], device=dev)

    def call():
        mask = (ak.sliding_window(64) | ak.global_tokens([0, 1, 2])) & ak.key_padding(lengths)
        return ak.attention(q, k, v, mask=mask, impl="triton")
    want = call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_a_subclass_that_evaluates_otherwise_gets_its_own_plan():
    """Keys name the class itself: a user's mask derived from a built-in one (here causal aligned
    top-left) must not share the built-in's plan, either way round (found by review)."""
    _triton_or_skip()
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class TopLeftCausal(ak.masks.Causal):
        def _evaluate(self, rows, cols, Nq, Nk):
            return (cols <= rows)[None, None]

        def _block_kinds(self, tiling, device):
            return ak.dense_mask(self.materialize(tiling.Nq, tiling.Nk))._block_kinds(tiling, device)

        def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
            return torch.stack([q0, k0], 1).long()

    assert structure_key(TopLeftCausal()) != structure_key(ak.causal())
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    for mask in (ak.causal(), TopLeftCausal(), ak.causal()):
        got = ak.attention(q[:, :, :12], k, v, mask=mask, impl="triton")
        want = ak.attention(q[:, :, :12], k, v, mask=mask, impl="reference")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "tiled", "triton"])
def test_inference_mode_tensors_are_checked_every_time_and_never_cached(impl):
    """Inference tensors have no version counter: a mask holding one runs (it crashed reading
    ``_version``), its values are checked each call, and no plan built from it is cached."""
    if impl == "triton":
        _triton_or_skip()
    q, k, v = (torch.randn(2, 1, 1500, 16) for _ in range(3))
    with torch.inference_mode():
        ids = torch.arange(1500).repeat(2, 1) // 500  # (2, 1500): past CONTENT_KEY_MAX, identity-keyed
        for mask in (ak.causal() & ak.key_padding(torch.tensor([1500, 700])), ak.document(ids)):
            before = plan_builds()
            got = [ak.attention(q[:, :, :64], k, v, mask=mask, impl=impl) for _ in range(2)]
            want = ak.attention(q[:, :, :64], k, v, mask=mask, impl="reference")
            torch.testing.assert_close(got[1], want, atol=1e-5, rtol=1e-5)
            if impl == "triton" and "document" in repr(mask):
                assert plan_builds() - before == 2  # not cached: its values could change unseen
        with pytest.raises(ValueError, match="must lie in"):
            ak.attention(q, k, v, mask=ak.key_padding(torch.tensor([1500, 1501])), impl=impl)


def test_a_direct_triton_call_checks_its_mask_and_make_plan_its_blocks():
    op = _triton_or_skip()
    q = k = v = torch.randn(1, 2, 20, 16)
    with pytest.raises(ValueError, match="3 per-head dilations for Hq=2"):
        op.triton_attention(q, k, v, mask=ak.sliding_window(2, dilation=(1, 2, 3)))
    for bad in (0, -16, 1.5):
        with pytest.raises(ValueError, match="block_m must be an int >= 1"):
            make_plan(ak.causal(), 20, 20, bad, 16, "cpu")


def test_per_sample_global_flags_plan_in_bounded_memory():
    """Per-sample global tokens (B, N) flags, as the nn Longformer passes them: the tile grouping
    reads the flags' bytes (no int64 copy per flag) and evaluates tiles in chunks sized by the
    mask's batch, so the plan builds at B=16 (it took 29 s and 2 GB at N=16k before)."""
    B, N = 16, 2048
    flags = torch.zeros(B, N, dtype=torch.bool)
    flags[torch.arange(B)[:, None], torch.randint(0, N, (B, 4))] = True
    mask = ak.sliding_window(64) | ak.global_tokens(flags)
    plan = make_plan(mask, N, N, 64, 64, "cpu")
    tiles = plan.tiles.shape[2]
    assert plan.tiles.shape[0] == B and tiles <= int((plan.kv_tile >= 0).sum())
    rows = torch.arange(N)[:, None]
    truth = mask.materialize(N, N)  # (B, 1, N, N)
    qb, kb = 5, int(plan.kv_idx[plan.kv_ptr[5]])  # a visited tile of query block 5, checked bit for bit
    t = int(plan.kv_tile[plan.kv_ptr[5]])
    if t >= 0:
        from attnkit.ops.block_plan import unpack_bits
        assert torch.equal(unpack_bits(plan.tiles[:, 0, t], 64), truth[:, 0, qb * 64:(qb + 1) * 64, kb * 64:(kb + 1) * 64])
    del rows


def test_the_cache_holds_a_bounded_number_of_bytes(monkeypatch):
    """A dense mask rebuilt every call (a new tensor, so a new key) must not pin PLAN_CACHE_SIZE
    masks: entries are evicted past PLAN_CACHE_BYTES, counting the plans' tensors and their masks'."""
    from attnkit.ops import block_plan as bp
    monkeypatch.setattr(bp, "_plans", type(bp._plans)())
    monkeypatch.setattr(bp, "_plan_bytes", {})
    monkeypatch.setattr(bp, "PLAN_CACHE_BYTES", 200_000)
    for _ in range(10):
        cached_plan(ak.dense_mask(torch.rand(256, 256) < 0.5), 256, 256, 64, 64, "cpu")  # 64 KiB of mask each
    assert 1 <= len(bp._plans) < 10 and sum(bp._plan_bytes.values()) <= 200_000
    assert set(bp._plan_bytes) == set(bp._plans)
    assert all(bp._plan_bytes[k] >= 256 * 256 for k in bp._plans)  # the mask's bytes are counted
