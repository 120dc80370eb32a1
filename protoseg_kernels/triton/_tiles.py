"""Device helpers shared by the Triton kernels of every op.

The similarity S = x̂·Ŵᵀ between rows x [N, D] and columns W [M, D] (``_columns``)
is never stored: kernels compute it one tile at a time, [BN rows] × [a tile of
columns], by ``dot_tile`` (fp32 accumulation over D in chunks) and scale it by the
inverse norms, so normalisation costs two multiplies per element instead of a
normalised copy of x.

A column tile is a set of column indices j, in one of two layouts (``column_tile``):

* flat: KS·BC consecutive j, for ops that treat all M columns alike;
* class: BC consecutive groups × KS consecutive slots of a group (column
  j = g·group + k), so that ``tl.reshape(tile, (BN, KS, BC))`` gathers the columns
  of one group along axis 1 (the per-class reductions of ``class_scores``). The group
  size need not be a power of two: slots k ≥ group are masked.

Offsets are int64 (N·D and N·M exceed 2³¹); masked-off lanes never form an
address from a negative index.
"""

import triton
import triton.language as tl

# Norm floor of F.normalize: x̂ = x / max(‖x‖, eps).
NORM_EPS = tl.constexpr(1e-12)
# 1/NORM_EPS: an inverse norm this large means the norm was clamped.
CLAMPED_INV_NORM = tl.constexpr(1e12)


# Two bf16 operations are wrong in Triton's interpreter (and right on a GPU): ``tl.dot``
# on bf16 operands, and fp32 → bf16 casts, which truncate instead of rounding to
# nearest even. The kernels work around both when interpreted, so the tests check
# the GPU arithmetic; see ``mma`` and ``to_dtype``.
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (``PRECISION`` applies to fp32 operands).

    Interpreted, bf16 operands are widened to fp32 first: products of bf16 values are
    exact in fp32, so this is the arithmetic of the tensor-core dot.
    """
    if INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to ``dtype``, rounding to nearest even.

    Interpreted, a bf16 target gets the rounding applied to the fp32 bits first
    (add half an ulp of bf16, ties to even), so the truncating cast is then exact.
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def inverse_norm(norm):
    """1 / max(norm, eps); NaN for a NaN norm (``tl.maximum`` would drop it on a GPU)."""
    return 1.0 / tl.where(norm <= NORM_EPS, NORM_EPS, norm)


@triton.jit
def row_inverse_norms(ptr, stride_r, stride_d, rows, row_ok, D, BR: tl.constexpr, BD: tl.constexpr):
    """1 / max(‖row‖₂, eps) for the rows ``rows`` of a [R, D] matrix, in fp32."""
    sum_sq = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        v = tl.load(ptr + rows[:, None] * stride_r + dd[None, :] * stride_d,
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(v * v, axis=1)
    return inverse_norm(tl.sqrt_rn(sum_sq))


@triton.jit
def load_inverse_norms(inv_ptr, idx, ok, NORMALIZE: tl.constexpr):
    """Precomputed inverse norms at ``idx`` (1 where not normalising, 0 where masked)."""
    if NORMALIZE:
        inv = tl.load(inv_ptr + idx, mask=ok, other=0.0)
    else:
        inv = tl.where(ok, 1.0, 0.0)
    return inv


@triton.jit
def num_columns(cols):
    """M of the columns ``cols`` (a ``_columns.ColumnArgs``)."""
    return cols.groups * cols.group


@triton.jit
def column_tile(t, cols, FLAT: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    """Columns of tile ``t``: (index j int64, group c int64, slot k int32, valid)."""
    r = tl.arange(0, KS * BC)
    K = cols.group
    if FLAT:
        j = (t * (KS * BC) + r).to(tl.int64)
        valid = j < num_columns(cols)
        c = j // K
        k = (j - c * K).to(tl.int32)
    else:
        groups = cols.groups
        group_blocks = tl.cdiv(groups, BC)
        c = ((t % group_blocks) * BC + r % BC).to(tl.int64)
        k = (t // group_blocks) * KS + r // BC
        valid = (c < groups) & (k < K)
        j = c * K + k
    return j, c, k, valid


@triton.jit
def num_column_tiles(cols, FLAT: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    if FLAT:
        n = tl.cdiv(num_columns(cols), KS * BC)
    else:
        n = tl.cdiv(cols.groups, BC) * tl.cdiv(cols.group, KS)
    return n


@triton.jit
def column_labels(cols, tile):
    """The label of each column of ``tile``: ``cols.labels[j]``, or its group without
    labels; -1 outside the valid columns."""
    j, c, k, valid = tile
    if cols.labels is None:
        label = c
    else:
        label = tl.load(cols.labels + j, mask=valid, other=-1)
    return tl.where(valid, label, -1)


@triton.jit
def dot_tile(x, rows, row_ok, cols, j, col_ok, BN: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
             PRECISION: tl.constexpr):
    """[BN, BP] raw dot products ⟨x_row, W_col⟩ over all D (fp32 accumulation); 0 where masked."""
    acc = tl.zeros([BN, BP], dtype=tl.float32)
    for d0 in range(0, x.d, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        d_ok = dd < x.d
        a = tl.load(x.ptr + rows[:, None] * x.stride_n + dd[None, :] * x.stride_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(cols.ptr + j[None, :] * cols.stride_m + dd[:, None] * cols.stride_d,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def similarity_tile(x, rows, row_ok, inv_x, cols, tile, inv_p, BN: tl.constexpr, BD: tl.constexpr,
                    KS: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """S of one [BN, KS·BC] tile: dot products scaled by the row and column inverse norms."""
    j, c, k, col_ok = tile
    s = dot_tile(x, rows, row_ok, cols, j, col_ok, BN, KS * BC, BD, PRECISION)
    return s * inv_x[:, None] * inv_p[None, :]


@triton.jit
def logsumexp_merge(m_a, sum_a, m_b, sum_b):
    """Merge two (max, Σ exp(· − max)) pairs; an empty pair is (-inf, 0). An infinite max
    shifts by 0 (torch.logsumexp's rule: inf − inf would be NaN), so +inf values give +inf."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    return m, sum_a * tl.exp(m_a - m_safe) + sum_b * tl.exp(m_b - m_safe)


@triton.jit
def logsumexp_rows(z, axis: tl.constexpr):
    """(max, Σ exp(z − max)) along ``axis``; (-inf, 0) for an all -inf line; an infinite max
    shifts by 0, as in :func:`logsumexp_merge`."""
    m = tl.max(z, axis=axis)
    m_safe = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    return m, tl.sum(tl.exp(z - tl.expand_dims(m_safe, axis)), axis=axis)


LN2 = tl.constexpr(0.6931471805599453)
SQRT_HALF_BITS = tl.constexpr(0x3F3504F3)  # fp32 bits of sqrt(1/2)


@triton.jit
def natural_log(x):
    """ln x for normal fp32 x > 0, without libdevice (``tl.log`` calls it on NVIDIA GPUs).

    x = m·2^e with m in [sqrt(1/2), sqrt(2)) read off the bits; ln m = 2·atanh(t) with
    t = (m − 1)/(m + 1), |t| < 0.172, summed to t¹¹ (the next term is below 1e-11).
    """
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - SQRT_HALF_BITS) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    series = 1.0 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))))
    return 2.0 * t * series + e.to(tl.float32) * LN2


@triton.jit
def logsumexp_value(m, total):
    """log Σ exp from a (max, sum) pair; -inf when empty (total is then 0, else >= 1), NaN
    when a NaN was summed (the sum carries it: the max may have dropped it)."""
    value = tl.where(total > 0, m + natural_log(tl.where(total > 0, total, 1.0)), float("-inf"))
    return tl.where(total != total, total, value)


@triton.jit
def replaces_max(v, best):
    """The merge test of a running "first maximum": strictly greater, or the first NaN
    (NaN ranks above every number; an earlier NaN stays)."""
    return (v > best) | ((v != v) & (best == best))


@triton.jit
def first_argmax(z, idx, SIZE: tl.constexpr, axis: tl.constexpr):
    """(max, smallest ``idx`` reaching it) along ``axis``; the index is always in [0, SIZE).

    NaN ranks above every number, as in torch.max: a line holding NaN gives (NaN, the
    first NaN's idx), whatever ``tl.max`` does with NaN on the device."""
    nan = z != z
    m = tl.max(tl.where(nan, float("-inf"), z), axis=axis)
    first = tl.min(tl.where(z == tl.expand_dims(m, axis), idx, SIZE), axis=axis)
    first_nan = tl.min(tl.where(nan, idx, SIZE), axis=axis)
    has_nan = first_nan < SIZE
    m = tl.where(has_nan, float("nan"), m)
    first = tl.where(has_nan, first_nan, first)
    return m, tl.minimum(first, SIZE - 1)


@triton.jit
def rows_dot(a_ptr, stride_an, b_ptr, stride_bn, stride_bd, rows, row_ok, D, BR: tl.constexpr, BD: tl.constexpr):
    """Σ_d a[row, d]·b[row, d] in fp32 (a is a contiguous-row fp32 buffer)."""
    total = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        ok = row_ok[:, None] & (dd < D)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_an + dd[None, :], mask=ok, other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bn + dd[None, :] * stride_bd, mask=ok, other=0.0).to(tl.float32)
        total += tl.sum(a * b, axis=1)
    return total


@triton.jit
def store_normalize_backward(grad_hat_ptr, stride_gn, src_ptr, stride_sn, stride_sd, out_ptr, stride_on,
                             rows, row_ok, inv, D, NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out = gradient w.r.t. the raw rows, given g = gradient w.r.t. the used rows (fp32 buffer).

    With normalisation ŷ = y·inv: out = (g − ŷ⟨g, ŷ⟩)·inv, or g·inv where the norm
    was clamped to eps (the clamp is then constant). Without it: out = g.
    The caller synchronises the program first if g was written by other threads.
    """
    if NORMALIZE:
        projection = rows_dot(grad_hat_ptr, stride_gn, src_ptr, stride_sn, stride_sd, rows, row_ok, D, BR, BD) * inv
        projection = tl.where(inv < CLAMPED_INV_NORM, projection, 0.0)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        ok = row_ok[:, None] & (dd < D)[None, :]
        g = tl.load(grad_hat_ptr + rows[:, None] * stride_gn + dd[None, :], mask=ok, other=0.0)
        if NORMALIZE:
            y = tl.load(src_ptr + rows[:, None] * stride_sn + dd[None, :] * stride_sd, mask=ok, other=0.0)
            y_hat = y.to(tl.float32) * inv[:, None]
            g = (g - y_hat * projection[:, None]) * inv[:, None]
        tl.store(out_ptr + rows[:, None] * stride_on + dd[None, :], to_dtype(g, out_ptr.dtype.element_ty), mask=ok)
