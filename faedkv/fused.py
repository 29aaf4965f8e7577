"""A fused CUDA path for the commonest case of FAEDKVPress: iwdft, every bin kept, post-RoPE.

With every bin kept the inverse DFT undoes the forward one, so the slots are the distance fold
scaled by M/N (faedkv.variants.compress_iwdft). `fold_into` computes that fold with one Triton
kernel per tensor: it reads the middle tokens once (bf16/fp16/fp32), accumulates in float32 and
writes the scaled slots straight into their rows of the compressed cache, so a layer costs one
read of K and V and one write of the kept rows. Used only where Triton and a CUDA tensor are
there; everything else takes the torch path, which defines the result (the GPU benchmark
checks the two agree).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fold_kernel(x_ptr, out_ptr, num_tokens, num_slots, scale, periods,
                    stride_x_row, stride_x_tok, stride_o_row, stride_o_tok,
                    BLOCK: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0)                      # one (batch, head)
        bins = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, DIM)
        valid = bins < num_slots
        # Bin b holds the middle tokens i with distance N - i = b (mod M): i = (N - b) mod M + p M.
        first = (num_tokens - bins) % num_slots
        acc = tl.zeros((BLOCK, DIM), dtype=tl.float32)
        for p in range(periods):
            index = first + p * num_slots
            ok = valid & (index < num_tokens)
            ptrs = x_ptr + row * stride_x_row + index[:, None] * stride_x_tok + dims[None, :]
            acc += tl.load(ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        out = out_ptr + row * stride_o_row + bins[:, None] * stride_o_tok + dims[None, :]
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=valid[:, None])

    return fold_kernel


def can_fuse(x: torch.Tensor) -> bool:
    """x (batch, kv_heads, tokens, head_dim): CUDA, contiguous rows, power-of-two head_dim."""
    if not (x.is_cuda and triton_available()):
        return False
    batch, heads, _, dim = x.shape
    return (x.stride(-1) == 1 and dim & (dim - 1) == 0 and dim <= 256
            and (batch == 1 or x.stride(0) == heads * x.stride(1)))


def fold_into(out: torch.Tensor, x: torch.Tensor, num_slots: int) -> None:
    """out (batch, kv_heads, M, head_dim) <- (M / N) * distance fold of x (batch, kv_heads, N, head_dim).

    `out` may be a slice of the compressed cache (rows contiguous in head_dim)."""
    batch, heads, tokens, dim = x.shape
    if out.shape != (batch, heads, num_slots, dim) or out.stride(-1) != 1:
        raise ValueError(f"fold_into needs out of shape {(batch, heads, num_slots, dim)} with "
                         f"contiguous rows, got {tuple(out.shape)}")
    if batch > 1 and out.stride(0) != heads * out.stride(1):
        raise ValueError("fold_into needs the batch and head axes of out to flatten")
    block = 32 if dim <= 128 else 16
    grid = (batch * heads, (num_slots + block - 1) // block)
    periods = (tokens + num_slots - 1) // num_slots
    _kernel()[grid](x, out, tokens, num_slots, num_slots / tokens, periods,
                    x.stride(1), x.stride(2), out.stride(1), out.stride(2),
                    BLOCK=block, DIM=dim)
