"""Bad input gets a clear error that says what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak


def qkv(B=1, H=2, N=8, D=4, Hkv=None, Nk=None, Dv=None, dtype=torch.float32):
    return (torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, Hkv or H, Nk or N, D, dtype=dtype),
            torch.randn(B, Hkv or H, Nk or N, Dv or D, dtype=dtype))


def test_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, N, D\), got shape \(2, 8, 4\)"):
        ak.attention(q[0], k, v)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ak.attention(q, k.tolist(), v)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch sizes differ: q has B=1, k has 2"):
        ak.attention(q, k.expand(2, -1, -1, -1), v)


def test_head_dim_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dims differ: q has D=4, k has D=5"):
        ak.attention(q, torch.randn(1, 2, 8, 5), v)


def test_kv_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"must share \(B, Hkv, Nk\)"):
        ak.attention(q, k, v[:, :, :5])


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must share one dtype, got torch.float32, torch.float64"):
        ak.attention(q, k.double(), v)


def test_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q has dtype torch.int64; expected one of"):
        ak.attention(q.long(), k, v)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta, cpu"):
        ak.attention(q, k.to("meta"), v)


def test_heads_not_multiple():
    q, k, v = qkv(H=3, Hkv=2)
    with pytest.raises(ValueError, match="Hq=3 query heads is not a multiple of Hkv=2"):
        ak.attention(q, k, v)


def test_mask_cannot_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask of shape \(3, 3\) cannot broadcast to \(B, H, Nq, Nk\) = \(1, 2, 8, 8\)"):
        ak.attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 8, 8\) cannot broadcast"):  # bigger than B=1
        ak.attention(q, k, v, mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has 5 dims; expected at most 4"):
        ak.attention(q, k, v, mask=torch.ones(1, 1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias of shape \(3, 8, 8\) cannot broadcast"):
        ak.attention(q, k, v, bias=torch.zeros(3, 8, 8))


def test_float_mask_is_refused_as_mask():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="a mask is bool .* Pass an additive float mask as bias="):
        ak.attention(q, k, v, mask=torch.zeros(8, 8))


def test_global_index_out_of_range():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"global_tokens: indices must lie in \[0, Nk=8\), got min=1 max=8"):
        ak.attention(q, k, v, mask=ak.global_tokens([1, 8]))
    with pytest.raises(ValueError, match="global_tokens: -1 is negative"):
        ak.global_tokens([-1, 2])


def test_negative_window():
    with pytest.raises(ValueError, match="sliding_window: left=-1 is negative"):
        ak.sliding_window(-1)
    with pytest.raises(ValueError, match="sliding_window: right=-2 is negative"):
        ak.sliding_window(3, -2)
    with pytest.raises(TypeError, match="sliding_window: left must be an int, got float"):
        ak.sliding_window(2.5)


def test_infinite_bias():
    q, k, v = qkv()
    bias = torch.zeros(8, 8)
    bias[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"bias contains \+inf"):
        ak.attention(q, k, v, bias=bias)


def test_nan_in_bias():
    q, k, v = qkv()
    bias = torch.zeros(8, 8)
    bias[2, 3] = float("nan")
    with pytest.raises(ValueError, match="bias contains NaN"):
        ak.attention(q, k, v, bias=bias)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_dropout_out_of_range(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dropout_p must be a (real )?number"):
        ak.attention(q, k, v, dropout_p=p)


def test_unknown_impl():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl='flash' is not a backend; choose one of 'auto'"):
        ak.attention(q, k, v, impl="flash")


def test_explicit_impl_never_falls_back():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl='sdpa' cannot run this call: bias alibi.* is structured"):
        ak.attention(q, k, v, bias=ak.alibi(2), impl="sdpa")
    bias = torch.zeros(1, 1, q.shape[2], k.shape[2], requires_grad=True)
    with pytest.raises(ValueError, match="impl='tiled' cannot run this call: bias requires grad: tiled does not"):
        ak.attention(q, k, v, bias=bias, impl="tiled")


def test_padding_and_documents_must_fit():
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match=r"key_padding: lengths must lie in \[0, Nk=8\], got min=3 max=9"):
        ak.attention(q, k, v, mask=ak.key_padding([3, 9]))
    with pytest.raises(ValueError, match="key_padding: 3 lengths for batch size B=2"):
        ak.attention(q, k, v, mask=ak.key_padding([3, 4, 5]))
    with pytest.raises(ValueError, match=r"document: ids of shape \(1, 7\) do not fit B=2, Nk=8"):
        ak.attention(q, k, v, mask=ak.document(torch.zeros(7, dtype=torch.long)))
    with pytest.raises(ValueError, match="document: expected integer ids"):
        ak.document(torch.zeros(8))


def test_alibi_slopes_must_match_heads():
    q, k, v = qkv(H=4)
    with pytest.raises(ValueError, match="alibi: 2 slopes for Hq=4 query heads"):
        ak.attention(q, k, v, bias=ak.alibi(2))


def test_bad_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ak.attention(q, k, v, scale=float("inf"))


def test_wrong_mask_and_bias_types():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="mask must be None, an attnkit mask .* got str"):
        ak.attention(q, k, v, mask="causal")
    with pytest.raises(TypeError, match="bias tensor has dtype torch.bool; a bias is an additive float"):
        ak.attention(q, k, v, bias=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="bias must be None, a float tensor or a structured bias"):
        ak.attention(q, k, v, bias=1.0)
    with pytest.raises(ValueError, match="bias tensor is on meta but q is on cpu"):
        ak.attention(q, k, v, bias=torch.zeros(8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"bias of shape \(3, 8\) cannot broadcast"):
        ak.attention(q, k, v, bias=torch.zeros(3, 8))
    with pytest.raises(TypeError, match="dense_mask: expected a bool tensor .* got torch.float32"):
        ak.dense_mask(torch.zeros(3, 3))


def test_mask_argument_shapes():
    with pytest.raises(ValueError, match=r"global_tokens: a bool tensor must be \(B, Nk\), got shape \(5,\)"):
        ak.global_tokens(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding: expected lengths .* got dtype=torch.float32"):
        ak.key_padding([1.5, 2.0])
    q, k, v = qkv(N=8, Nk=4)
    with pytest.raises(ValueError, match="document: Nq=8 > Nk=4 puts queries before the first key"):
        ak.attention(q, k, v, mask=ak.document([0, 0, 1, 1]))


def test_alibi_arguments():
    with pytest.raises(ValueError, match=r"alibi: expected float slopes of shape \(H,\)"):
        ak.alibi(torch.ones(2, 2))
    with pytest.raises(ValueError, match="alibi: slopes must be finite"):
        ak.alibi(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="alibi_slopes: num_heads must be >= 1, got 0"):
        ak.alibi_slopes(0)


def test_tiled_fused_kernel_needs_equal_head_dims():
    from attnkit.ops.tiled import tiled_attention
    q, k, v = qkv(Dv=6)
    with pytest.raises(ValueError, match="tiled kernel='fused' needs CPU tensors with Dv == D"):
        tiled_attention(q, k, v, mask=None, bias=None, scale=0.5, kernel="fused")


def test_per_sample_flags_must_fit():
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match=r"global_tokens: a bool mask of shape \(2, 5\) does not fit B=2, Nk=8"):
        ak.attention(q, k, v, mask=ak.global_tokens(torch.zeros(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"key_padding: bool mask of shape \(3, 8\) does not fit B=2, Nk=8"):
        ak.attention(q, k, v, mask=ak.key_padding(torch.ones(3, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="key_padding: -2 is negative"):
        ak.key_padding([3, -2])
    with pytest.raises(TypeError, match="sliding_window: right must be an int, got str"):
        ak.sliding_window(2, "3")


def test_sdpa_return_lse_refusals():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="return_lse: torch SDPA returns no log-sum-exp on this device"):
        ak.attention(q.to("meta"), k.to("meta"), v.to("meta"), impl="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="return_lse with Dv=6 != D=4"):
        ak.attention(q, k, torch.randn(1, 2, 8, 6), impl="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="return_lse with dropout"):
        ak.attention(q, k, v, impl="sdpa", return_lse=True, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_lse under autograd"):
        ak.attention(q.requires_grad_(), k, v, impl="sdpa", return_lse=True)
    bias = torch.zeros(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="return_lse under autograd"):
        ak.attention(q.detach(), k, v, bias=bias, impl="sdpa", return_lse=True)


def test_unknown_tiled_kernel():
    from attnkit.ops.tiled import tiled_attention
    q, k, v = qkv()
    with pytest.raises(ValueError, match="tiled kernel='fussed': choose 'auto', 'fused' or 'math'"):
        tiled_attention(q, k, v, mask=None, bias=None, scale=0.5, kernel="fussed")
