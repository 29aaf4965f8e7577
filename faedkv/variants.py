"""The three compressors of the middle segment, behind one interface.

Each maps middle tokens (..., N, head_dim) to M slots (..., M, head_dim), linearly along the
token axis (head_dim columns are independent), computed in float32 (float64 for float64 input):

- ``iwdft``: fold by distance from the newest token, M-point FFT, keep the plan's bins, inverse
  DFT (faedkv.iwdft). Slot m stands for the tokens whose distance is congruent to m mod M.
- ``resample``: rfft of the N tokens, band-limit to the M-point grid's Nyquist, keep the plan's
  bins of the M-point spectrum, irfft to M evenly spaced virtual tokens (scaled so a constant
  sequence stays constant). Slot j stands for the tokens around index j * N / M.
- ``dct-iterative`` (FreqKV-style comparator): tokens arrive ``step`` at a time; whenever the
  buffer (previous slots + new tokens) holds more than M rows it is replaced by its first M
  DCT-II coefficients (plan-masked), inverse-transformed to M rows. Old tokens pass through
  many compressions, so its contribution profile is biased to recent tokens.

``keep`` arguments are callables mapping normalised frequencies (F,) in [0, 0.5] to a bool mask
(F,) or (heads, F); None keeps everything.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from faedkv.budget import kept_rows
from faedkv.iwdft import compute_dtype, fold_by_distance, fold_counts, symmetric_keep
from faedkv.plans import FrequencyPlan, bin_frequencies

VARIANTS = ("iwdft", "resample", "dct-iterative")
# What an iwdft slot holds: the mean of its class (default; attention adds log count), or the
# spec's first reading, (M/t) x the class sum, kept to show why it fails on real models.
SLOT_NORMALIZATIONS = ("mean", "sum")
KeepFn = Optional[Callable[[torch.Tensor], torch.Tensor]]


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


def check_normalization(variant: str, normalization: str) -> str:
    if normalization not in SLOT_NORMALIZATIONS:
        raise ValueError(f"unknown slot_normalization {normalization!r}; use 'mean' (class means) or "
                         "'sum' (the old (M/t) x class sums, iwdft only)")
    if normalization == "sum" and variant != "iwdft":
        raise ValueError(f"slot_normalization='sum' is the old iwdft reading; variant {variant!r} "
                         "already returns averages: use slot_normalization='mean'")
    return normalization


def slot_mass(variant: str, num_tokens: int, num_slots: int) -> torch.Tensor:
    """(M,) float64 tokens each slot stands for: the class counts for iwdft, N/M otherwise.
    Attention adds log(mass) to a slot's logit (the mass correction)."""
    if check_variant(variant) == "iwdft":
        return fold_counts(num_tokens, num_slots).double()
    return torch.full((num_slots,), num_tokens / num_slots, dtype=torch.float64)


def _bin_mask(keep: KeepFn, freqs: torch.Tensor, device) -> torch.Tensor | None:
    """The keep mask shaped to broadcast over (..., heads, F, head_dim): (F, 1) or (heads, F, 1)."""
    if keep is None:
        return None
    return keep(freqs).to(device).unsqueeze(-1)


# --- iwdft ----------------------------------------------------------------------------------
def class_means(x: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Mean of the tokens in each distance class (x (..., N, d) -> (..., M, d), compute dtype):
    class m holds the c_m tokens whose distance from the newest is congruent to m mod M."""
    counts = fold_counts(x.shape[-2], num_slots).clamp(min=1).to(x.device)
    return fold_by_distance(x, num_slots) / counts.unsqueeze(-1)


def compress_iwdft(x: torch.Tensor, num_slots: int, keep: KeepFn = None,
                   normalization: str = "mean") -> torch.Tensor:
    """The iwdft slots: class means (normalization "mean"), band-limited by the kept bins when
    there is a plan (irfft(rfft(means) x mask)); "sum" is the spec's first reading,
    iwdft_slots(iwdft(x, M), keep) = (M/t) x class sums. Real throughout: the folded rows are
    real, so a plan is applied with rfft / irfft, and without one no FFT runs (the inverse DFT
    undoes the forward one exactly)."""
    if normalization == "mean":
        rows = class_means(x, num_slots)
    else:
        rows = fold_by_distance(x, num_slots) * (num_slots / x.shape[-2])
    if keep is None:
        return rows
    mask = symmetric_keep(keep(bin_frequencies(num_slots)).to(x.device))
    half = mask[..., : num_slots // 2 + 1].unsqueeze(-1)
    return torch.fft.irfft(torch.fft.rfft(rows, dim=-2) * half, n=num_slots, dim=-2)


def iwdft_positions(num_tokens: int, num_slots: int) -> torch.Tensor:
    """Mean 0-based index of the tokens each slot stands for, (M,) float64."""
    index = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(-1)
    sums = fold_by_distance(index, num_slots).squeeze(-1)
    return sums / fold_counts(num_tokens, num_slots).clamp(min=1)


def iwdft_expand(slots: torch.Tensor, num_tokens: int, normalization: str = "mean") -> torch.Tensor:
    """Each token i gets the mean of its class b = (N - i) mod M: the attention-equivalent
    expanded cache (and, with every bin kept, the pseudo-inverse of the map). "sum" slots are
    first rescaled to means, slot[b] * N / (M * count_b)."""
    num_slots = slots.shape[-2]
    member = (num_tokens - torch.arange(num_tokens, device=slots.device)) % num_slots
    if normalization == "sum":
        scale = num_tokens / (num_slots * fold_counts(num_tokens, num_slots).clamp(min=1))
        slots = slots * scale.to(slots.device, slots.dtype).unsqueeze(-1)
    return slots.index_select(-2, member)


# --- resample -------------------------------------------------------------------------------
def compress_resample(x: torch.Tensor, num_slots: int, keep: KeepFn = None) -> torch.Tensor:
    num_tokens = x.shape[-2]
    if num_slots > num_tokens:
        raise ValueError(f"resample needs num_slots <= tokens, got {num_slots} > {num_tokens}")
    spectrum = torch.fft.rfft(x.to(compute_dtype(x.dtype)), dim=-2)
    band = spectrum[..., : num_slots // 2 + 1, :]
    mask = _bin_mask(keep, torch.arange(num_slots // 2 + 1, dtype=torch.float64) / num_slots, x.device)
    if mask is not None:
        band = band * mask
    return torch.fft.irfft(band, n=num_slots, dim=-2) * (num_slots / num_tokens)


def resample_positions(num_tokens: int, num_slots: int) -> torch.Tensor:
    """Virtual token j is the band-limited interpolant at original index j * N / M."""
    return torch.arange(num_slots, dtype=torch.float64) * (num_tokens / num_slots)


def resample_expand(slots: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Band-limited interpolation of the M slots back to N tokens (the inverse resampling)."""
    num_slots = slots.shape[-2]
    spectrum = torch.fft.rfft(slots, dim=-2)
    return torch.fft.irfft(spectrum, n=num_tokens, dim=-2) * (num_tokens / num_slots)


# --- dct-iterative --------------------------------------------------------------------------
def dct2(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised DCT-II along dim -2: X_k = sum_n x_n cos(pi k (2n+1) / (2L))."""
    length = x.shape[-2]
    mirrored = torch.cat([x, x.flip(-2)], dim=-2)
    spectrum = torch.fft.rfft(mirrored, dim=-2)[..., :length, :]
    k = torch.arange(length, dtype=torch.float64, device=x.device)
    phase = torch.polar(torch.ones_like(k), -math.pi * k / (2 * length)).to(spectrum.dtype)
    return (spectrum * phase.unsqueeze(-1)).real / 2


def idct(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of dct2 (a scaled DCT-III) along dim -2, same length."""
    length = coefficients.shape[-2]
    k = torch.arange(length, dtype=torch.float64, device=coefficients.device)
    cdtype = torch.complex128 if coefficients.dtype == torch.float64 else torch.complex64
    phase = torch.polar(torch.ones_like(k), math.pi * k / (2 * length)).to(cdtype)
    half = coefficients.to(cdtype) * phase.unsqueeze(-1)
    half = torch.nn.functional.pad(half, (0, 0, 0, 1))  # bin L of the 2L-point spectrum is 0
    return 2 * torch.fft.irfft(half, n=2 * length, dim=-2)[..., :length, :]


def dct_resample(x: torch.Tensor, num_slots: int, keep: KeepFn = None) -> torch.Tensor:
    """First num_slots DCT-II coefficients of x (L rows), inverse-transformed to num_slots rows,
    scaled by M / L so a constant stays constant."""
    length = x.shape[-2]
    coefficients = dct2(x)[..., :num_slots, :]
    mask = _bin_mask(keep, torch.arange(num_slots, dtype=torch.float64) / (2 * num_slots), x.device)
    if mask is not None:
        coefficients = coefficients * mask
    return idct(coefficients) * (num_slots / length)


def compress_dct_iterative(x: torch.Tensor, num_slots: int, step: int = 64,
                           keep: KeepFn = None) -> torch.Tensor:
    """Tokens arrive `step` at a time; the buffer is re-compressed to num_slots rows every time it
    outgrows them (so the first tokens pass through about (N - M) / step compressions)."""
    if step < 1:
        raise ValueError(f"dct-iterative needs step >= 1 (the window), got {step}")
    x = x.to(compute_dtype(x.dtype))
    num_tokens = x.shape[-2]
    if num_slots > num_tokens:
        raise ValueError(f"dct-iterative needs num_slots <= tokens, got {num_slots} > {num_tokens}")
    # The first M tokens fit without compression; from there on every chunk triggers one.
    buffer = x[..., :num_slots, :]
    for start in range(num_slots, num_tokens, step):
        buffer = torch.cat([buffer, x[..., start:start + step, :]], dim=-2)
        buffer = dct_resample(buffer, num_slots, keep)
    return buffer


def dct_iterative_positions(num_tokens: int, num_slots: int, step: int = 64) -> torch.Tensor:
    """The iterative map applied to the token indices (it maps a constant to itself, so each
    slot's value is a weighted mean position of the tokens it stands for)."""
    index = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(-1)
    return compress_dct_iterative(index, num_slots, step).squeeze(-1)


def dct_expand(slots: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """DCT interpolation of M rows to num_tokens rows: the pseudo-inverse of dct_resample with
    every coefficient kept (that map is sqrt(M/L) * C_M^T P C_L with orthonormal DCTs)."""
    num_slots = slots.shape[-2]
    coefficients = torch.nn.functional.pad(dct2(slots), (0, 0, 0, num_tokens - num_slots))
    return idct(coefficients) * (num_tokens / num_slots)


def dct_iterative_expand(slots: torch.Tensor, num_tokens: int, step: int = 64) -> torch.Tensor:
    """Undo the re-compressions newest first, each by its pseudo-inverse (DCT interpolation back
    to M + chunk rows), peeling off the chunk's tokens; the first M tokens are what remains."""
    num_slots = slots.shape[-2]
    buffer, chunks = slots, []
    for start in reversed(range(num_slots, num_tokens, step)):
        chunk = min(step, num_tokens - start)
        grown = dct_expand(buffer, num_slots + chunk)
        buffer, tokens = grown[..., :num_slots, :], grown[..., num_slots:, :]
        chunks.append(tokens)
    return torch.cat([buffer] + chunks[::-1], dim=-2)


# --- dimsplit (FourierAttention-style dimension split, arXiv 2506.11886) -------------------
# Not a slot variant: every middle token keeps a row. A share of the head dims is kept exact,
# the others are stored as the lowest rfft bins along the token axis (M real numbers per dim)
# and reconstructed at every middle position; the bytes N d_e + M (d - d_e) fit the rows' R d.
DIMSPLIT = "dimsplit"


def lowpass_numbers(num_tokens: int, bins: int) -> int:
    """Real numbers stored for rfft bins 0..bins-1 of an N-point real sequence (bin 0 and a
    Nyquist bin are real, the others complex)."""
    nyquist = num_tokens % 2 == 0 and bins == num_tokens // 2 + 1
    return 2 * bins - 1 - int(nyquist)


def lowpass_bins(num_tokens: int, numbers: int) -> int:
    """The most rfft bins 0..K-1 of an N-point sequence whose real numbers fit in `numbers`
    (at least bin 0): every bin once numbers >= N."""
    if numbers >= num_tokens:
        return num_tokens // 2 + 1
    return max(1, (numbers + 1) // 2)


def lowpass_band(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x band-limited along the tokens (..., N, d) in the compute dtype, the kept rfft bins
    (..., bins, d) complex): rfft, keep bins 0..bins-1, irfft back to N positions. bins = N // 2 + 1
    keeps everything (x itself, up to round-off). The bins are what a store of the split keeps."""
    spectrum = torch.fft.rfft(x.to(compute_dtype(x.dtype)), dim=-2)
    kept = spectrum[..., :bins, :].clone()
    spectrum[..., bins:, :] = 0
    return torch.fft.irfft(spectrum, n=x.shape[-2], dim=-2), kept


def lowpass(x: torch.Tensor, bins: int) -> torch.Tensor:
    """x (..., N, d) band-limited to rfft bins 0..bins-1 along the tokens (`lowpass_band`)."""
    return lowpass_band(x, bins)[0]


def dimsplit_sizes(num_tokens: int, rows: int, head_dim: int, dim_share: float,
                   pairs: bool = False) -> tuple[int, int, int]:
    """(d_e exact dims, K kept bins, M real numbers per compressed dim) for a middle of N tokens
    whose budget is R rows of d numbers: d_e = floor(dim_share R d / N) (even with `pairs`),
    then the most bins whose numbers M satisfy N d_e + M (d - d_e) <= R d (R < N, so d_e < d;
    d_e drops while no number fits)."""
    if not 0 <= dim_share < 1:
        raise ValueError(f"dim_share must be in [0, 1) (the share of the middle budget spent on exact dims), got {dim_share!r}")
    if rows < 1 or num_tokens < 1 or head_dim < 1:
        raise ValueError(f"dimsplit needs rows, tokens and head_dim >= 1, got {rows}, {num_tokens}, {head_dim}")
    step = 2 if pairs and head_dim % 2 == 0 else 1
    exact = min(int(dim_share * rows * head_dim / num_tokens) // step * step, head_dim - step)
    while exact > 0 and (rows * head_dim - num_tokens * exact) // (head_dim - exact) < 1:
        exact -= step
    budget = (rows * head_dim - num_tokens * exact) // (head_dim - exact)
    bins = lowpass_bins(num_tokens, budget)
    return exact, bins, lowpass_numbers(num_tokens, bins)


def split_numbers(num_tokens: int, exact: int, numbers: int, head_dim: int) -> int:
    """Real numbers the split of N tokens stores: N d_e exact values plus M per compressed dim."""
    return num_tokens * exact + numbers * (head_dim - exact)


def exact_dims(x: torch.Tensor, low: torch.Tensor, count: int, pairs: bool = False) -> torch.Tensor:
    """(..., count) sorted head dims of x (..., N, d) whose energy lies most outside the kept band
    (sum over tokens of (x - low)^2, low = lowpass(x)): what a low-pass summary would lose most.
    `pairs`: rotate-half RoPE pairs (i, i + d/2) are chosen together by their summed energy."""
    energy = (x.to(low.dtype) - low).square().sum(-2)
    if count == 0:
        return torch.zeros(energy.shape[:-1] + (0,), dtype=torch.long, device=x.device)
    if pairs and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        top = (energy[..., :half] + energy[..., half:]).topk(count // 2, dim=-1).indices
        return torch.cat([top, top + half], dim=-1).sort(dim=-1).values
    return energy.topk(count, dim=-1).indices.sort(dim=-1).values


def take_dims(target: torch.Tensor, source: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """target (..., N, d) with the dims (..., E) of each row copied bit-exactly from source."""
    index = dims.unsqueeze(-2).expand(*dims.shape[:-1], target.shape[-2], dims.shape[-1])
    return target.scatter(-1, index, source.to(target.dtype).gather(-1, index))


def compress_dimsplit(x: torch.Tensor, rows: int, dim_share: float,
                      pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (..., N, d) -> (the middle as attention sees it (..., N, d) in the compute dtype: the
    exact dims copied, the others low-pass reconstructed at every position; the exact dims
    (..., d_e); M the real numbers stored per compressed dim), for a budget of `rows` rows."""
    exact, bins, numbers = dimsplit_sizes(x.shape[-2], rows, x.shape[-1], dim_share, pairs)
    low = lowpass(x, bins)
    dims = exact_dims(x, low, exact, pairs)
    return take_dims(low, x, dims), dims, numbers


def compress_dimsplit_rest(x: torch.Tensor, exact: torch.Tensor, rows: int,
                           dim_share: float) -> tuple[torch.Tensor, list, torch.Tensor, torch.Tensor]:
    """A hybrid's split: x (batch, kv_heads, N, d), exact (batch, kv_heads, N) bool (tokens kept
    whole; a different count per head is allowed) -> (x with each head's other tokens replaced by
    `compress_dimsplit` of them taken in time order, in x.dtype, exact dims and exact tokens
    bit-exact; the exact dims per head as nested lists (batch, kv_heads, d_e); the real numbers
    each head's split stores (batch, kv_heads); M per head (batch, kv_heads)). A head whose other
    tokens fit in `rows` keeps them whole (d_e = d)."""
    batch, heads, _, dim = x.shape
    out = x.clone()
    dims = [[[] for _ in range(heads)] for _ in range(batch)]
    numbers = torch.zeros(batch, heads, dtype=torch.long)
    coefficients = torch.zeros(batch, heads, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            rest = (~exact[b, h]).nonzero().squeeze(-1)
            if rest.numel() <= rows:
                dims[b][h], numbers[b, h] = list(range(dim)), rest.numel() * dim
                continue
            split, kept_dims, count = compress_dimsplit(x[b, h].index_select(0, rest), rows, dim_share)
            out[b, h, rest] = split.to(x.dtype)   # the exact dims are x's own values, exact in any dtype
            dims[b][h] = kept_dims.tolist()
            numbers[b, h] = split_numbers(rest.numel(), kept_dims.numel(), count, dim)
            coefficients[b, h] = count
    return out, dims, numbers, coefficients


# --- one interface --------------------------------------------------------------------------
def compress(variant: str, x: torch.Tensor, num_slots: int, keep: KeepFn = None,
             step: int = 64, normalization: str = "mean") -> torch.Tensor:
    """(..., N, head_dim) -> (..., num_slots, head_dim) in the compute dtype."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if check_normalization(check_variant(variant), normalization) and variant == "iwdft":
        return compress_iwdft(x, num_slots, keep, normalization)
    if variant == "resample":
        return compress_resample(x, num_slots, keep)
    return compress_dct_iterative(x, num_slots, step, keep)


def slot_positions(variant: str, num_tokens: int, num_slots: int, step: int = 64) -> torch.Tensor:
    """Representative 0-based index (within the middle) of each slot, (num_slots,) float64."""
    if check_variant(variant) == "iwdft":
        return iwdft_positions(num_tokens, num_slots)
    if variant == "resample":
        return resample_positions(num_tokens, num_slots)
    return dct_iterative_positions(num_tokens, num_slots, step)


def expand(variant: str, slots: torch.Tensor, num_tokens: int, step: int = 64,
           normalization: str = "mean") -> torch.Tensor:
    """The closed-form way back from slots to tokens: replication for iwdft, band-limited
    interpolation for resample (both the pseudo-inverse of the map when every bin is kept), and
    for dct-iterative each re-compression undone by its pseudo-inverse, newest first."""
    if check_variant(variant) == "iwdft":
        return iwdft_expand(slots, num_tokens, normalization)
    if variant == "resample":
        return resample_expand(slots, num_tokens)
    return dct_iterative_expand(slots, num_tokens, step)


def plan_keep(plan: FrequencyPlan | None, layer: int, kind: str, num_heads: int | None = None,
              head: int | None = None) -> KeepFn:
    """The keep callable of a plan at one layer (None for plan=None: keep every bin)."""
    if plan is None:
        return None
    plan._spec(layer, kind)  # fail early on an unknown layer

    def keep(freqs: torch.Tensor) -> torch.Tensor:
        mask = plan.keep_some_frequencies(layer, freqs, kind, num_heads if head is None else None)
        if head is not None and mask.ndim == 2:
            return mask[head]
        return mask

    return keep


def compression_matrix(variant: str, num_tokens: int, compression_ratio: float | None = None,
                       plan: FrequencyPlan | None = None, layer: int = 0, kind: str = "key",
                       head: int | None = None, step: int = 64, normalization: str = "mean",
                       num_slots: int | None = None) -> torch.Tensor:
    """The linear map (slots x tokens, float64) a variant applies to a middle of num_tokens
    tokens, M = num_slots or kvpress's budget for the middle alone (faedkv.budget.kept_rows);
    for dct-iterative it is the composition over all re-compressions. Obtained by compressing
    the identity. Attention sees each slot with its mass (`slot_mass`):
    `faedkv.contribution.attention_equivalent` gives the map to the attention-equivalent
    expanded cache."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_slots is None:
        if compression_ratio is None:
            raise ValueError("compression_matrix needs compression_ratio or num_slots")
        num_slots = kept_rows(num_tokens, compression_ratio)
    identity = torch.eye(num_tokens, dtype=torch.float64)  # token n = unit vector e_n
    keep = plan_keep(plan, layer, kind, head=head)
    if plan is not None and plan.is_per_head(layer, kind) and head is None:
        raise ValueError(f"plan layer {layer} is per head: pass head= to compression_matrix")
    return compress(variant, identity, num_slots, keep, step, normalization)
