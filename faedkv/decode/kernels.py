"""Triton kernels for FAEDKVCache's decode calls (CUDA; Triton's CPU interpreter in the tests).

A decode step is bound by kernel launches. The slots are the ring means (each with its log count
added to its logit by the attention), so a call of q new tokens changes q rows. Two ways to
serve it, each a couple of launches per layer:

- `decode_step_into`: fold + [sink | slots | window | new] written in one pass; any attention
  reads the result (the default);
- `FoldStep` + `SlotAttention`: only the fold and the window-ring write, O(q *
  head_dim) per head, and an attention (split-KV flash decoding, q = 1) over the stored
  [sink | ring means | window] that adds each ring row's log count to its logit, so nothing is
  copied. Used when the model runs faedkv's attention.

Layouts: sink, means and ring are (2, batch, kv_heads, rows, head_dim) (index 0 keys, 1 values)
with contiguous rows whose (2, batch, kv_heads) planes flatten (`plane_stride`); they may be views
of one buffer. The torch paths in faedkv.decode.cache and faedkv.decode.slots define every result.
"""
from __future__ import annotations

import functools
import math

import torch

from faedkv.fused import DirectLaunch, interpreting, launch

# as the profiler names them: what the cache's update launches, what the attention launches
UPDATE_KERNELS = ("decode_step_kernel", "fold_step_kernel")
ATTENTION_KERNELS = ("slot_attention_kernel", "slot_attention_combine_kernel")


def plane_stride(t: torch.Tensor, name: str) -> int:
    """Elements between consecutive (kv, batch, head) planes of t (2, batch, kv_heads, rows, dim)."""
    _, batch, heads, rows, dim = t.shape
    plane = t.stride(2)
    if (t.stride(-1) != 1 or (rows > 1 and t.stride(-2) != dim) or t.stride(1) != heads * plane
            or t.stride(0) != batch * heads * plane):
        raise ValueError(f"{name} needs contiguous rows and flattening (kv, batch, head) planes, "
                         f"got strides {t.stride()} for shape {tuple(t.shape)}")
    return plane


# Kernel arguments come in two kinds. Layout integers (shapes, strides) are fixed for a layer:
# Triton specialises on them (== 1, multiples of 16), which lets it prove rows aligned and load
# them 16 bytes at a time. Step scalars change every token: specialising on them would compile
# new variants mid-decode, so they are listed here as not specialised.
STEP_SCALARS = {"step": ["query", "head", "row0", "filled", "lap"],
                "fold": ["head", "folded"],
                "attention": ["filled"],
                "combine": []}


@functools.lru_cache(maxsize=2)
def _kernels(interpreted: bool) -> dict:
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=STEP_SCALARS["step"])
    def decode_step_kernel(sink_ptr, means_ptr, ring_ptr, keys_ptr, values_ptr, out_ptr,
                           heads, num_sink, num_slots, window, sink_plane, means_plane, ring_plane,
                           stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                           query, head, row0, filled, lap,
                           BLOCK: tl.constexpr, DIM: tl.constexpr):
        pair = tl.program_id(0)                     # one (batch, head); K and V both
        half = tl.num_programs(0)                   # batch * kv_heads: offset of the V planes
        rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, DIM)[None, :]
        total = num_sink + num_slots + window
        kept = total - query                                  # rows before the new tokens
        in_sink = rows < num_sink
        j = rows - num_sink                                   # ring row of a slot
        in_mid = (j >= 0) & (j < num_slots)
        i = j - num_slots                                     # window row of the output
        in_win = (i >= 0) & (rows < kept)
        n = rows - kept                                       # new token of the output
        in_new = (n >= 0) & (rows < total)
        # Ring row j takes the d-th folded token (the window's d-th oldest) when d < query.
        d = (j - row0 + num_slots) % num_slots
        gets = in_mid & (d < query)
        count = lap + (j < filled).to(tl.int32)               # tokens in row j after the fold
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
            sink = tl.load(sink_ptr + plane * sink_plane + rows[:, None] * DIM + dims,
                           mask=in_sink[:, None], other=0.0)
            mean_ptrs = means_ptr + plane * means_plane + j[:, None] * DIM + dims
            mean = tl.load(mean_ptrs, mask=in_mid[:, None], other=0.0).to(tl.float32)
            ring_base = ring_ptr + plane * ring_plane
            folded = tl.load(ring_base + fold_pos[:, None] * DIM + dims, mask=gets[:, None],
                             other=0.0).to(tl.float32)
            # torch.lerp's formula, so the means match the torch path's rounding
            weight = (1.0 / count.to(tl.float32))[:, None]
            diff = folded - mean
            lerped = tl.where(weight < 0.5, mean + weight * diff, folded - diff * (1.0 - weight))
            mean = tl.where(gets[:, None], lerped, mean).to(out_ptr.dtype.element_ty)
            tl.store(mean_ptrs, mean, mask=gets[:, None])
            # the folded token's ring position now holds the d-th new token (no other program
            # reads it: the window rows read the other W - query positions)
            incoming = tl.load(new_base + d[:, None] * stride_t + dims, mask=gets[:, None], other=0.0)
            tl.store(ring_base + fold_pos[:, None] * DIM + dims, incoming, mask=gets[:, None])
            recent = tl.load(ring_base + win_pos[:, None] * DIM + dims, mask=in_win[:, None], other=0.0)
            new = tl.load(new_base + n[:, None] * stride_t + dims, mask=in_new[:, None], other=0.0)
            value = tl.where(in_sink[:, None], sink,
                             tl.where(in_mid[:, None], mean,
                                      tl.where(in_win[:, None], recent, new)))
            tl.store(out_ptr + plane * total * DIM + rows[:, None] * DIM + dims, value,
                     mask=(rows < total)[:, None])

    @triton.jit(do_not_specialize=STEP_SCALARS["fold"])
    def fold_step_kernel(means_ptr, ring_ptr, keys_ptr, values_ptr,
                         heads, num_slots, window, means_plane, ring_plane,
                         stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                         head, folded, DIM: tl.constexpr):
        pair = tl.program_id(0)
        half = tl.num_programs(0)
        d = tl.program_id(1)                        # the d-th oldest window token folds
        dims = tl.arange(0, DIM)
        index = folded + d                          # its middle index: row index mod M, the
        row = index % num_slots                     # row's (index // M + 1)-th token
        weight = 1.0 / (index // num_slots + 1).to(tl.float32)
        pos = (head + d) % window
        b, h = pair // heads, pair % heads
        for kv in tl.static_range(2):
            plane = (kv * half + pair).to(tl.int64)
            if kv == 0:
                new = tl.load(keys_ptr + b * stride_kb + h * stride_kh + d * stride_kt + dims)
            else:
                new = tl.load(values_ptr + b * stride_vb + h * stride_vh + d * stride_vt + dims)
            ring_ptrs = ring_ptr + plane * ring_plane + pos * DIM + dims
            mean_ptrs = means_ptr + plane * means_plane + row * DIM + dims
            x = tl.load(ring_ptrs).to(tl.float32)
            mean = tl.load(mean_ptrs).to(tl.float32)
            diff = x - mean                         # torch.lerp's formula, as above
            lerped = tl.where(weight < 0.5, mean + weight * diff, x - diff * (1.0 - weight))
            tl.store(mean_ptrs, lerped.to(means_ptr.dtype.element_ty))
            tl.store(ring_ptrs, new)

    @triton.jit(do_not_specialize=STEP_SCALARS["attention"])
    def slot_attention_kernel(q_ptr, k_ptr, v_ptr, acc_ptr, max_ptr, sum_ptr,
                              kv_heads, rows, rows_per_split, slot_start, num_slots,
                              stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                              stride_vb, stride_vh, stride_vt,
                              filled, scaling, bias_more, bias_less,
                              GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                              DIM: tl.constexpr, PRECISION: tl.constexpr):
        pair = tl.program_id(0)                     # one (batch, kv head): its GROUP query heads
        split = tl.program_id(1)
        b, h = pair // kv_heads, pair % kv_heads
        g = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM)
        q = tl.load(q_ptr + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + dims[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)
        running_max = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
        running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], dtype=tl.float32)
        start = split * rows_per_split
        stop = tl.minimum(start + rows_per_split, rows)
        col0 = start
        while col0 < stop:                          # a while loop: the interpreter runs it too
            cols = col0 + tl.arange(0, BLOCK_N)
            valid = cols < stop
            k = tl.load(k_ptr + b * stride_kb + h * stride_kh + cols[:, None] * stride_kt + dims[None, :],
                        mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols[:, None] * stride_vt + dims[None, :],
                        mask=valid[:, None], other=0.0)
            j = cols - slot_start
            # a ring mean stands for its count of tokens: + log(count) on its logit
            column_bias = tl.where((j >= 0) & (j < num_slots),
                                   tl.where(j < filled, bias_more, bias_less), 0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling + column_bias[None, :]
            logits = tl.where(valid[None, :], logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            decay = tl.exp(running_max - new_max)
            weights = tl.exp(logits - new_max[:, None])
            running_sum = running_sum * decay + tl.sum(weights, axis=1)
            acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
            col0 += BLOCK_N
        part = (pair * tl.num_programs(1) + split).to(tl.int64)
        real = g < GROUP                            # the padding rows are not kept
        tl.store(acc_ptr + part * GROUP * DIM + g[:, None] * DIM + dims[None, :], acc, mask=real[:, None])
        tl.store(max_ptr + part * GROUP + g, running_max, mask=real)
        tl.store(sum_ptr + part * GROUP + g, running_sum, mask=real)

    @triton.jit
    def slot_attention_combine_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr,
                                      kv_heads, splits, stride_ob, stride_oh,
                                      GROUP: tl.constexpr, DIM: tl.constexpr,
                                      SPLIT_BLOCK: tl.constexpr):
        program = tl.program_id(0)                  # one query head: (batch, kv head, g)
        pair, g = program // GROUP, program % GROUP
        b, h = pair // kv_heads, pair % kv_heads
        dims = tl.arange(0, DIM)
        lanes = tl.arange(0, SPLIT_BLOCK)
        # SPLIT_BLOCK splits at a time (a serial chain over every split is latency-bound); the
        # first block outside the loop, so the running values start finite (no split is empty)
        part = (pair * splits + lanes).to(tl.int64)
        ok = lanes < splits
        part_max = tl.load(max_ptr + part * GROUP + g, mask=ok, other=float("-inf"))
        total_max = tl.max(part_max, axis=0)
        weight = tl.exp(part_max - total_max)
        total_sum = tl.sum(tl.load(sum_ptr + part * GROUP + g, mask=ok, other=0.0) * weight, axis=0)
        acc = tl.sum(tl.load(acc_ptr + (part * GROUP + g)[:, None] * DIM + dims[None, :],
                             mask=ok[:, None], other=0.0) * weight[:, None], axis=0)
        first = SPLIT_BLOCK
        while first < splits:
            index = first + lanes
            part = (pair * splits + index).to(tl.int64)
            ok = index < splits
            part_max = tl.load(max_ptr + part * GROUP + g, mask=ok, other=float("-inf"))
            new_max = tl.maximum(total_max, tl.max(part_max, axis=0))
            decay = tl.exp(total_max - new_max)
            weight = tl.exp(part_max - new_max)
            total_sum = total_sum * decay + tl.sum(tl.load(sum_ptr + part * GROUP + g, mask=ok,
                                                           other=0.0) * weight, axis=0)
            acc = acc * decay + tl.sum(tl.load(acc_ptr + (part * GROUP + g)[:, None] * DIM + dims[None, :],
                                               mask=ok[:, None], other=0.0) * weight[:, None], axis=0)
            total_max = new_max
            first += SPLIT_BLOCK
        tl.store(out_ptr + b * stride_ob + (h * GROUP + g) * stride_oh + dims,
                 (acc / total_sum).to(out_ptr.dtype.element_ty))

    return {"step": decode_step_kernel, "fold": fold_step_kernel, "attention": slot_attention_kernel,
            "combine": slot_attention_combine_kernel}


def new_token_strides(keys: torch.Tensor, values: torch.Tensor) -> tuple:
    return keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2)


def decode_step_into(out: torch.Tensor, sink: torch.Tensor, means: torch.Tensor, ring: torch.Tensor,
                     keys: torch.Tensor, values: torch.Tensor, head: int, folded: int,
                     block: int = 16, num_warps: int = 4) -> None:
    """One decode call in one kernel: fold the q oldest window tokens into the ring means, write
    [sink | slots | window | new] into `out`, and put the new tokens into the window ring in
    place of the folded ones.

    out (2, batch, kv_heads, S + M + W, head_dim) contiguous; sink (2, batch, kv_heads, S,
    head_dim); means (2, batch, kv_heads, M, head_dim); ring (2, batch, kv_heads, W, head_dim)
    whose oldest row is `head`; keys, values (batch, kv_heads, q, head_dim) with 1 <= q <=
    min(W, M); folded: middle tokens in the means before this call. means and ring are updated
    in place; the caller advances head and folded by q. block (rows per program) and num_warps
    tune the launch (analysis.bench gpu measures them).
    """
    _, batch, heads, num_slots, dim = means.shape
    num_sink, window, query = sink.shape[-2], ring.shape[-2], keys.shape[-2]
    if not 1 <= query <= min(window, num_slots):
        raise ValueError(f"decode_step_into folds 1..min(W, M) = {min(window, num_slots)} tokens, got {query}")
    if not out.is_contiguous():
        raise ValueError("decode_step_into needs out contiguous")
    lap, filled = divmod(folded + query, num_slots)
    grid = (batch * heads, (num_sink + num_slots + window + block - 1) // block)
    layout = (heads, num_sink, num_slots, window, plane_stride(sink, "sink"), plane_stride(means, "means"),
              plane_stride(ring, "ring"), *new_token_strides(keys, values))
    step = (query, head, folded % num_slots, filled, lap)
    launch(_kernels(interpreting())["step"], grid, (sink, means, ring, keys, values, out), layout, step,
           (block, dim), num_warps=num_warps)


class FoldStep:
    """Fold the q oldest tokens of one layer's window ring into its means and write the q new
    tokens in their place (one kernel, O(q * head_dim) per head): the decode update when the
    attention scales the means itself (`SlotAttention`). means (2, batch, kv_heads, M, head_dim),
    ring (2, batch, kv_heads, W, head_dim) with oldest row `head`; the caller advances head and
    folded. After the first call, a call whose new tokens have the same strides, dtype and
    alignment goes straight to the compiled kernel (`DirectLaunch`), the few host steps a
    launch-bound decode step can afford."""

    def __init__(self, means: torch.Tensor, ring: torch.Tensor):
        self.means, self.ring = means, ring
        _, self.batch, self.heads, self.num_slots, self.dim = means.shape
        self.window = ring.shape[-2]
        self.planes = (plane_stride(means, "means"), plane_stride(ring, "ring"))
        self.direct = None     # (DirectLaunch, new-token strides, dtype, alignment)

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, head: int, folded: int) -> None:
        query = keys.shape[-2]
        if not 1 <= query <= min(self.window, self.num_slots):
            raise ValueError(f"FoldStep folds 1..min(W, M) = {min(self.window, self.num_slots)} "
                             f"tokens, got {query}")
        strides = keys.stride() + values.stride()
        key_ptr, value_ptr = keys.data_ptr(), values.data_ptr()
        aligned = (key_ptr % 16 == 0, value_ptr % 16 == 0)
        direct = self.direct
        if direct is not None and query == 1 and direct[1] == strides and direct[2] is keys.dtype and direct[3] == aligned:
            direct[0](self.means_ptr, self.ring_ptr, key_ptr, value_ptr, self.heads, self.num_slots,
                      self.window, *self.planes, *strides[:3], *strides[4:7], head, folded, self.dim)
            return
        layout = (self.heads, self.num_slots, self.window, *self.planes, *strides[:3], *strides[4:7])
        compiled = launch(_kernels(interpreting())["fold"], (self.batch * self.heads, query),
                          (self.means, self.ring, keys, values), layout, (head, folded), (self.dim,),
                          num_warps=1)
        if compiled is not None and query == 1:
            self.means_ptr, self.ring_ptr = self.means.data_ptr(), self.ring.data_ptr()
            self.direct = (DirectLaunch(compiled, (self.batch * self.heads, 1), keys.device), strides,
                           keys.dtype, aligned)


class SlotAttention:
    """Attention of one new token over one layer's fixed key and value rows whose ring-mean rows
    [slot_start, slot_start + M) stand for their classes of tokens: such a row's logit gets
    + bias_more (r < filled) or + bias_less (after), its log count (the mass). Split-KV
    flash decoding: each program reduces a run of rows for the GROUP query heads of one KV head,
    a second kernel combines.

    keys, values (batch, kv_heads, rows, head_dim) with contiguous head_dim; a call takes out
    (batch, 1, heads, head_dim) (transformers' attention output layout) and query (batch, heads,
    1, head_dim). block_n (rows per tile) and target_programs (programs of the first kernel) tune
    the launch (analysis.bench gpu measures them). The split, the scratch and, after the first
    call, the compiled kernels (`DirectLaunch`) are kept, so a decode call passes only the
    query, the output and the step's biases."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot_start: int, num_slots: int,
                 block_n: int = 128, target_programs: int = 512, workspace: dict | None = None):
        self.keys, self.values = keys, values
        self.batch, self.kv_heads, self.rows, self.dim = keys.shape
        self.slot_start, self.num_slots, self.block_n = slot_start, num_slots, block_n
        pairs = self.batch * self.kv_heads
        splits = max(1, min(math.ceil(self.rows / block_n), math.ceil(target_programs / pairs)))
        self.rows_per_split = math.ceil(math.ceil(self.rows / splits) / block_n) * block_n
        self.splits = math.ceil(self.rows / self.rows_per_split)    # none empty
        # float32 partials of every split; layers run one after another, so one cache's layers
        # share them through `workspace` ((device, elements) -> tensor)
        self.workspace = {} if workspace is None else workspace
        self.direct = None     # (attention, combine, query+out strides, dtype, layouts, constexprs)

    def __call__(self, out: torch.Tensor, query: torch.Tensor, filled: int, bias_more: float,
                 bias_less: float, scaling: float) -> None:
        batch, heads, length, dim = query.shape
        if (length != 1 or heads % self.kv_heads or query.stride(-1) != 1 or batch != self.batch
                or out.shape != (batch, 1, heads, dim)):
            raise ValueError("SlotAttention takes one query token (batch, heads, 1, head_dim), "
                             "heads a multiple of kv_heads, and out (batch, 1, heads, head_dim); got "
                             f"query {tuple(query.shape)}, keys {tuple(self.keys.shape)}, out {tuple(out.shape)}")
        query_ptr, out_ptr = query.data_ptr(), out.data_ptr()
        direct = self.direct
        if (direct is not None and direct[2] == query.stride() + out.stride() and direct[3] is query.dtype
                and query_ptr % 16 == 0 and out_ptr % 16 == 0):
            attention, combine, _, _, layout, combine_layout, constexprs, combine_constexprs = direct
            attention(query_ptr, self.keys_ptr, self.values_ptr, *self.parts_ptrs, *layout,
                      filled, scaling, bias_more, bias_less, *constexprs)
            combine(*self.parts_ptrs, out_ptr, *combine_layout, *combine_constexprs)
            return
        group = heads // self.kv_heads
        group_pad = max(16, 1 << (group - 1).bit_length())       # tl.dot needs 16 rows
        parts = self.batch * self.kv_heads * self.splits * group
        key = (query.device, parts * (dim + 2))
        if key not in self.workspace:
            self.workspace[key] = torch.empty(parts * (dim + 2), dtype=torch.float32, device=query.device)
        scratch = self.workspace[key]
        acc = scratch[:parts * dim]
        running_max, running_sum = scratch[parts * dim:parts * (dim + 1)], scratch[parts * (dim + 1):]
        layout = (self.kv_heads, self.rows, self.rows_per_split, self.slot_start, self.num_slots,
                  query.stride(0), query.stride(1), *self.keys.stride()[:3], *self.values.stride()[:3])
        constexprs = (group, group_pad, self.block_n, dim, "ieee" if query.dtype == torch.float32 else "tf32")
        combine_layout = (self.kv_heads, self.splits, out.stride(0), out.stride(2))
        combine_constexprs = (group, dim, 16)
        kernels = _kernels(interpreting())
        grid = (self.batch * self.kv_heads, self.splits)
        first = launch(kernels["attention"], grid, (query, self.keys, self.values, acc, running_max, running_sum),
                       layout, (filled, scaling, bias_more, bias_less), constexprs)
        second = launch(kernels["combine"], (batch * heads,), (acc, running_max, running_sum, out),
                        combine_layout, (), combine_constexprs)
        if first is not None and query_ptr % 16 == 0 and out_ptr % 16 == 0:
            self.keys_ptr, self.values_ptr = self.keys.data_ptr(), self.values.data_ptr()
            self.parts_ptrs = (acc.data_ptr(), running_max.data_ptr(), running_sum.data_ptr())
            self.direct = (DirectLaunch(first, grid, query.device), DirectLaunch(second, (batch * heads,), query.device),
                           query.stride() + out.stride(), query.dtype, layout, combine_layout, constexprs,
                           combine_constexprs)
