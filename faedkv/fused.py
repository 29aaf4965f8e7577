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
import os

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


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_fuse_decode(x: torch.Tensor) -> bool:
    """x (batch, kv_heads, q, head_dim) new keys or values: CUDA with Triton (or Triton's CPU
    interpreter), contiguous head_dim, power-of-two head_dim."""
    dim = x.shape[-1]
    if x.stride(-1) != 1 or dim & (dim - 1) or dim > 256:
        return False
    if x.is_cuda:
        return triton_available()
    return interpreting() and triton_importable()


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=2)
def _decode_kernel(interpreted: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def decode_step_kernel(sink_ptr, means_ptr, ring_ptr, keys_ptr, values_ptr, out_ptr,
                           heads, num_sink, num_slots, window, query, head, row0, filled,
                           scale_more, scale_less, lap,
                           stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                           BLOCK: tl.constexpr, DIM: tl.constexpr):
        pair = tl.program_id(0)                     # one (batch, head); K and V both
        half = tl.num_programs(0)                   # batch * kv_heads: offset of the V planes
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, DIM)[None, :]
        total = num_sink + num_slots + window
        kept = num_sink + num_slots + window - query        # rows before the new tokens
        in_sink = rows < num_sink
        j = rows - num_sink                                   # ring row of a slot
        in_mid = (rows >= num_sink) & (j < num_slots)
        i = rows - num_sink - num_slots                       # window row of the output
        in_win = (i >= 0) & (rows < kept)
        n = rows - kept                                       # new token of the output
        in_new = (n >= 0) & (rows < total)
        # Slot row j takes the d-th folded token (the ring's d-th oldest) when d < query.
        d = (j - row0 + num_slots) % num_slots
        gets = in_mid & (d < query)
        count = lap + (j < filled).to(tl.int32)               # tokens in row j after the fold
        slot_scale = tl.where(j < filled, scale_more, scale_less)
        fold_pos = (head + d) % window
        win_pos = (head + query + i) % window
        b, h = pair // heads, pair % heads
        for kv in tl.static_range(2):
            plane = (kv * half + pair).to(tl.int64)
            if kv == 0:
                new_base = keys_ptr + b * stride_kb + h * stride_kh
                stride_t = stride_kt
            else:
                new_base = values_ptr + b * stride_vb + h * stride_vh
                stride_t = stride_vt
            sink = tl.load(sink_ptr + plane * num_sink * DIM + rows[:, None] * DIM + dims,
                           mask=in_sink[:, None], other=0.0)
            mean_ptrs = means_ptr + plane * num_slots * DIM + j[:, None] * DIM + dims
            mean = tl.load(mean_ptrs, mask=in_mid[:, None], other=0.0).to(tl.float32)
            ring_base = ring_ptr + plane * window * DIM
            folded = tl.load(ring_base + fold_pos[:, None] * DIM + dims, mask=gets[:, None],
                             other=0.0).to(tl.float32)
            # torch.lerp's formula, so the means match the torch path's rounding
            weight = (1.0 / count.to(tl.float32))[:, None]
            diff = folded - mean
            lerped = tl.where(weight < 0.5, mean + weight * diff, folded - diff * (1.0 - weight))
            mean = tl.where(gets[:, None], lerped, mean).to(out_ptr.dtype.element_ty)
            tl.store(mean_ptrs, mean, mask=gets[:, None])
            slot = (mean.to(tl.float32) * slot_scale[:, None]).to(out_ptr.dtype.element_ty)
            # the folded token's ring position now holds the d-th new token (read by no other
            # program: the window rows read the other W - query positions)
            incoming = tl.load(new_base + d[:, None] * stride_t + dims, mask=gets[:, None], other=0.0)
            tl.store(ring_base + fold_pos[:, None] * DIM + dims, incoming, mask=gets[:, None])
            recent = tl.load(ring_base + win_pos[:, None] * DIM + dims, mask=in_win[:, None], other=0.0)
            new = tl.load(new_base + n[:, None] * stride_t + dims, mask=in_new[:, None], other=0.0)
            value = tl.where(in_sink[:, None], sink,
                             tl.where(in_mid[:, None], slot,
                                      tl.where(in_win[:, None], recent, new)))
            tl.store(out_ptr + plane * total * DIM + rows[:, None] * DIM + dims, value,
                     mask=(rows < total)[:, None])

    return decode_step_kernel


def decode_step_into(out: torch.Tensor, sink: torch.Tensor, means: torch.Tensor, ring: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, head: int, folded: int) -> None:
    """One decode call of FAEDKVCache in one kernel: fold the `q` oldest window tokens into the
    ring means, write [sink | slots | window | new] into `out`, and put the new tokens into the
    window ring in place of the folded ones.

    out (2, batch, kv_heads, S + M + W, head_dim) fresh; sink (2, batch, kv_heads, S, head_dim);
    means (2, batch, kv_heads, M, head_dim); ring (2, batch, kv_heads, W, head_dim) whose oldest
    row is `head`; keys, values (batch, kv_heads, q, head_dim) with 1 <= q <= min(W, M); folded:
    middle tokens in the means before this call. means and ring are updated in place; the
    caller advances head by q and folded by q.
    """
    _, batch, heads, num_slots, dim = means.shape
    num_sink, window, query = sink.shape[-2], ring.shape[-2], keys.shape[-2]
    if not 1 <= query <= min(window, num_slots):
        raise ValueError(f"decode_step_into folds 1..min(W, M) = {min(window, num_slots)} tokens, got {query}")
    for name, t in (("out", out), ("sink", sink), ("means", means), ("ring", ring)):
        if not t.is_contiguous():
            raise ValueError(f"decode_step_into needs {name} contiguous")
    lap, filled = divmod(folded + query, num_slots)
    scale = num_slots / (folded + query)
    block = 32 if dim <= 128 else 16
    grid = (batch * heads, (num_sink + num_slots + window + block - 1) // block)
    _decode_kernel(interpreting())[grid](
        sink, means, ring, keys, values, out,
        heads, num_sink, num_slots, window, query, head, folded % num_slots, filled,
        (lap + 1) * scale, lap * scale, lap,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        BLOCK=block, DIM=dim)
