"""Per-token log-probs and entropies from logits, without a second full-size float32 copy of the logits.

The (B, T, V) logits are the learner's memory peak. `log_softmax(logits.float() / T).gather(...)` materialises a
float32 copy for the upcast, another for the division, and autograd keeps the (B, T, V) log-softmax for backward:
~3x the logits (more in bf16). Here each chunk of token positions is upcast on its own, autograd keeps only the
logits themselves (no copy: the tensor the caller already holds) plus one logsumexp per position, and backward
recomputes the softmax chunk by chunk. Extra memory: the gradient buffer (logits' dtype, which any backward needs)
plus a few chunk-sized float32 temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from gepo.config import LossConfig

# Token positions upcast at once (LossConfig.logprob_chunk_rows): 128 x 32k vocab x 4 B = 16 MB per temporary.
DEFAULT_CHUNK_SIZE = LossConfig.logprob_chunk_rows


def _chunks(B: int, T: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """(batch slice, time slice) pairs covering (B, T) with at most ~chunk_size positions each.

    Slicing along B and T (never flattening) keeps every chunk a view even when the logits are a non-contiguous
    slice of the model's output such as logits[:, P-1:-1]; reshape(-1, V) would silently copy the whole thing.
    """
    if T <= chunk_size:
        rows = max(1, chunk_size // T)
        for b0 in range(0, B, rows):
            yield slice(b0, min(B, b0 + rows)), slice(0, T)
    else:
        for b in range(B):
            for t0 in range(0, T, chunk_size):
                yield slice(b, b + 1), slice(t0, min(T, t0 + chunk_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 upcast to float32; float64 stays float64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


def _scaled(chunk: Tensor, temperature: float) -> Tensor:
    """The chunk upcast and divided by temperature: one fresh chunk-sized tensor, safe to modify in place."""
    x = chunk.to(_compute_dtype(chunk.dtype))
    if x is chunk:  # already float32/64: a view of the caller's logits, never write into it
        return chunk / temperature if temperature != 1.0 else chunk.clone()
    return x.div_(temperature) if temperature != 1.0 else x


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> Tensor:
        B, T, _ = logits.shape
        out_dtype = _compute_dtype(logits.dtype)
        out = torch.empty(B, T, dtype=out_dtype, device=logits.device)
        lse = torch.empty(B, T, dtype=out_dtype, device=logits.device)
        for bs, ts in _chunks(B, T, chunk_size):
            chunk = logits[bs, ts]
            # Read-only here, so float32 logits at temperature 1 need no copy at all.
            x = chunk if chunk.dtype == out_dtype and temperature == 1.0 else _scaled(chunk, temperature)
            chunk_lse = torch.logsumexp(x, dim=-1)
            lse[bs, ts] = chunk_lse
            out[bs, ts] = x.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1) - chunk_lse
        ctx.save_for_backward(logits, tokens, lse)  # the caller's own logits: a reference, not a copy
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, tokens, lse = ctx.saved_tensors
        B, T, _ = logits.shape
        temperature = ctx.temperature
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        # d out_t / d logits_tv = (onehot_v(token_t) - softmax_v(logits_t / T)) / T
        for bs, ts in _chunks(B, T, ctx.chunk_size):
            x = _scaled(logits[bs, ts], temperature)
            g = grad_out[bs, ts].to(x.dtype).unsqueeze(-1)
            p = x.sub_(lse[bs, ts].unsqueeze(-1)).exp_()  # softmax, written over the chunk temporary
            p.mul_(-g)
            p.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), g)
            if temperature != 1.0:
                p.div_(temperature)
            grad_logits[bs, ts] = p
        return grad_logits, None, None, None


def _check(logits: Tensor, tokens: Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V); got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens must be (B, T) = {tuple(logits.shape[:2])}; got {tuple(tokens.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32; got {tokens.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")


def token_logprobs(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """log softmax(logits / temperature)[b, t, tokens[b, t]], differentiable w.r.t. logits.

    logits: (B, T, V) float32, bf16, fp16 (or float64); may be a non-contiguous slice. Row t must be the logits that
        predicted tokens[:, t] (i.e. already shifted by one).
    tokens: (B, T) int64/int32, values in [0, V). Padding positions need a valid id (e.g. 0); mask them later.
    Returns (B, T) float32 (float64 for float64 logits).

    Memory: besides the output, forward and backward allocate only ~chunk_size x V float32 temporaries and the
    gradient buffer in the logits' dtype; autograd saves the logits by reference and a (B, T) logsumexp.
    """
    _check(logits, tokens, temperature, chunk_size)
    tokens = tokens.long()
    return _TokenLogprobs.apply(logits, tokens, float(temperature), int(chunk_size))


@torch.no_grad()
def token_entropy(
    logits: Tensor, mask: Tensor | None = None, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, for metrics (no gradient).

    logits: (B, T, V); mask: (B, T) bool or None. Returns (B, T) float32 (float64 for float64 logits), 0 where
    mask is False; callers average over the mask themselves.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V); got shape {tuple(logits.shape)}")
    if mask is not None and mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(logits.shape[:2])}; got {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    B, T, _ = logits.shape
    out = torch.empty(B, T, dtype=_compute_dtype(logits.dtype), device=logits.device)
    for bs, ts in _chunks(B, T, chunk_size):
        x = _scaled(logits[bs, ts], temperature)
        p = x.sub_(torch.logsumexp(x, dim=-1, keepdim=True)).exp_()  # x is ours to overwrite
        # xlogy makes 0 * log 0 = 0, so -inf logits (masked vocabulary) give no NaN.
        out[bs, ts] = -torch.special.xlogy(p, p).sum(-1)
    if mask is not None:
        out = out.masked_fill(~mask.bool(), 0.0)
    return out
