"""A fused CUDA path for the commonest case of FAEDKVPress: iwdft, every bin kept, post-RoPE.

With every bin kept the inverse DFT undoes the forward one, so the slots are the class means of
the distance fold (or, for the old normalisation, the fold scaled by M/N;
faedkv.variants.compress_iwdft). `fold_into` computes them with one Triton kernel per tensor: it
reads the middle tokens once (bf16/fp16/fp32), accumulates in float32 and writes the slots
straight into their rows of the compressed cache, so a layer costs one
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
    """Triton imports and a CUDA device is there."""
    return triton_importable() and torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fold_kernel(x_ptr, out_ptr, num_tokens, num_slots, scale, periods,
                    stride_x_row, stride_x_tok, stride_o_row, stride_o_tok,
                    BLOCK: tl.constexpr, DIM: tl.constexpr, MEAN: tl.constexpr):
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
        if MEAN:
            # class b holds the tokens first + p M < N: ceil((N - first) / M) of them
            count = tl.maximum((num_tokens - first + num_slots - 1) // num_slots, 1)
            acc = acc / count.to(tl.float32)[:, None]
        else:
            acc = acc * scale
        out = out_ptr + row * stride_o_row + bins[:, None] * stride_o_tok + dims[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None])

    return fold_kernel


def can_fuse(x: torch.Tensor) -> bool:
    """x (batch, kv_heads, tokens, head_dim): CUDA, contiguous rows, power-of-two head_dim."""
    if not (x.is_cuda and triton_available()):
        return False
    batch, heads, _, dim = x.shape
    return (x.stride(-1) == 1 and dim & (dim - 1) == 0 and dim <= 256
            and (batch == 1 or x.stride(0) == heads * x.stride(1)))


def fold_into(out: torch.Tensor, x: torch.Tensor, num_slots: int, mean: bool = True) -> None:
    """out (batch, kv_heads, M, head_dim) <- class means of the distance fold of x (batch,
    kv_heads, N, head_dim); mean=False: (M / N) * the fold (the old normalisation).

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
                    BLOCK=block, DIM=dim, MEAN=mean)


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


_COMPILED: dict[tuple, object] = {}


def launch(kernel, grid: tuple, tensors: tuple, layout: tuple, step: tuple, constexprs: tuple,
           **options):
    """kernel[grid](*tensors, *layout, *step, *constexprs): layout integers are specialised on
    (== 1, multiple of 16), step scalars are not (the kernel lists them in do_not_specialize);
    options are Triton's launch options (num_warps). Returns the compiled kernel (None under the
    interpreter), which `DirectLaunch` can launch again for the same key.

    After the first call the compiled kernel is launched from a cache, skipping Triton's per-call
    argument binding and cache-key hashing. The compiled kernel depends only on what the key
    holds: the tensors' dtypes and 16-byte alignment, the layout integers' specialisation, the
    constexprs, the options, the device and whether every integer fits in int32."""
    args = tensors + layout + step + constexprs
    if interpreting():
        kernel[grid](*args, **options)
        return None
    key = launch_key(kernel, tensors, layout, step, constexprs, options)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = kernel[grid](*args, **options)
    else:
        compiled[grid + (1,) * (3 - len(grid))](*args)
    return compiled


def launch_key(kernel, tensors: tuple, layout: tuple, step: tuple, constexprs: tuple, options: dict) -> tuple:
    small = all(-2**31 <= a < 2**31 for a in layout + step if type(a) is int)
    return (kernel, tensors[0].device, small, constexprs, tuple(options.items()),
            tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
            tuple((a == 1, a % 16 == 0) for a in layout))


class DirectLaunch:
    """A compiled kernel launched straight through Triton's launcher with a fixed grid: the
    fewest host steps per call, for decode steps that launch a few kernels per layer and are
    bound by the host. The caller guarantees the arguments match the compiled kernel's key
    (same dtypes, alignment and layout integers); pointers may be passed as ints. Launch hooks
    (profilers that use Triton's own) are not called."""

    def __init__(self, compiled, grid: tuple, device: torch.device):
        from torch._C import _cuda_getCurrentRawStream

        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.device = device.index if device.index is not None else torch.cuda.current_device()
        self.stream = _cuda_getCurrentRawStream

    def __call__(self, *args) -> None:
        x, y, z = self.grid
        self.run(x, y, z, self.stream(self.device), self.function, self.metadata, None, None, None, *args)
