"""Chunked token log-probs: equal to log_softmax + gather, right gradients, no full-size float32 copy kept."""

from __future__ import annotations

import pytest
import torch

from gepo.logprobs import token_entropy, token_logprobs


def _naive(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return torch.log_softmax(x, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _data(B=3, T=7, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fp32_matches_log_softmax_gather_values_and_grads(chunk_size, temperature):
    logits, tokens = _data()
    g_out = torch.randn(3, 7)
    a = logits.clone().requires_grad_()
    out = token_logprobs(a, tokens, temperature, chunk_size)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    (out * g_out).sum().backward()
    b = logits.clone().requires_grad_()
    ref = _naive(b, tokens, temperature)
    (ref * g_out).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_upcast_reference(dtype):
    logits, tokens = _data(dtype=dtype)
    a = logits.clone().requires_grad_()
    out = token_logprobs(a, tokens, 0.7, chunk_size=4)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert a.grad.dtype == dtype
    b = logits.float().requires_grad_()  # the same bf16 values, upcast: what we must equal
    ref = _naive(b, tokens, 0.7)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad.to(dtype), rtol=1e-2, atol=1e-3)


def test_gradcheck_float64():
    logits, tokens = _data(B=2, T=5, V=9, dtype=torch.float64)
    logits.requires_grad_()
    for chunk in (2, 16):
        assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 0.8, chunk), (logits,))


def test_non_contiguous_slice_of_model_output():
    full, _ = _data(B=2, T=12, V=20)
    tokens = torch.randint(0, 20, (2, 8))
    sliced = full.requires_grad_()[:, 3:11]  # logits[:, P-1:-1] as a training step takes them
    assert not sliced.is_contiguous()
    out = token_logprobs(sliced, tokens, 1.0, chunk_size=5)
    out.sum().backward()
    ref_leaf = full.detach().clone().requires_grad_()
    _naive(ref_leaf[:, 3:11], tokens, 1.0).sum().backward()
    torch.testing.assert_close(out, _naive(full.detach()[:, 3:11], tokens, 1.0))
    torch.testing.assert_close(full.grad, ref_leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_saves_no_copy_of_the_logits(dtype):
    B, T, V = 2, 6, 40
    logits, tokens = _data(B, T, V, dtype=dtype)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, tokens, 0.9, chunk_size=4)
    big = [t for t in saved if t.numel() >= B * T * V]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].dtype == dtype
    assert sum(t.numel() for t in saved if t.data_ptr() != logits.data_ptr()) <= 2 * B * T  # tokens + logsumexp


def test_token_entropy_matches_categorical_and_masks():
    logits, _ = _data(B=2, T=5, V=30)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    h = token_entropy(logits, mask, temperature=0.5, chunk_size=3)
    ref = torch.distributions.Categorical(logits=logits / 0.5).entropy()
    torch.testing.assert_close(h, ref.masked_fill(~mask, 0.0), rtol=1e-5, atol=1e-5)
    assert not h.requires_grad
    masked_vocab = logits.clone()
    masked_vocab[..., :10] = -torch.inf  # top-k style -inf logits must not give NaN
    h2 = token_entropy(masked_vocab, None, 1.0, 4)
    ref2 = torch.distributions.Categorical(logits=logits[..., 10:]).entropy()
    torch.testing.assert_close(h2, ref2, rtol=1e-5, atol=1e-5)


def test_bad_input():
    logits, tokens = _data()
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(logits[0], tokens)
    with pytest.raises(ValueError, match="tokens must be"):
        token_logprobs(logits, tokens[:, :3])
    with pytest.raises(ValueError, match="int64"):
        token_logprobs(logits, tokens.float())
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, tokens, chunk_size=0)
