"""Device helpers shared by the Triton kernels of every op.

The similarity S = x̂·P̂ᵀ is never stored: kernels compute it one tile at a time,
[BN pixels] × [a tile of prototype columns], by ``dot_tile`` (fp32 accumulation over
D in chunks) and scale it by the row inverse norms, so normalisation costs two
multiplies per element instead of a normalised copy of x.

A column tile is a set of flat prototype indices j = c·K + k, in one of two layouts
(``column_tile``):

* flat: KS·BC consecutive j, for ops that treat all C·K prototypes alike;
* class: BC consecutive classes × KS consecutive prototype slots, so that
  ``tl.reshape(tile, (BN, KS, BC))`` groups the columns of one class along axis 1
  (the per-class reductions of ``class_scores``). K need not be a power of two:
  slots k ≥ K are masked.

Offsets are int64 (N·D and N·C·K exceed 2³¹); masked-off lanes never form an
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
def row_inverse_norms(ptr, stride_r, stride_d, rows, row_ok, D, BR: tl.constexpr, BD: tl.constexpr):
    """1 / max(‖row‖₂, eps) for the rows ``rows`` of a [R, D] matrix, in fp32."""
    sum_sq = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        v = tl.load(ptr + rows[:, None] * stride_r + dd[None, :] * stride_d,
                    mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(v * v, axis=1)
    return 1.0 / tl.maximum(tl.sqrt_rn(sum_sq), NORM_EPS)


@triton.jit
def load_inverse_norms(inv_ptr, idx, ok, NORMALIZE: tl.constexpr):
    """Precomputed inverse norms at ``idx`` (1 where not normalising, 0 where masked)."""
    if NORMALIZE:
        inv = tl.load(inv_ptr + idx, mask=ok, other=0.0)
    else:
        inv = tl.where(ok, 1.0, 0.0)
    return inv


@triton.jit
def column_tile(t, C, K, FLAT: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    """Prototype columns of tile ``t``: (flat index j int64, class c int64, slot k int32, valid)."""
    r = tl.arange(0, KS * BC)
    if FLAT:
        j = (t * (KS * BC) + r).to(tl.int64)
        valid = j < C.to(tl.int64) * K
        c = j // K
        k = (j - c * K).to(tl.int32)
    else:
        class_blocks = tl.cdiv(C, BC)
        c = ((t % class_blocks) * BC + r % BC).to(tl.int64)
        k = (t // class_blocks) * KS + r // BC
        valid = (c < C) & (k < K)
        j = c * K + k
    return j, c, k, valid


@triton.jit
def num_column_tiles(C, K, FLAT: tl.constexpr, KS: tl.constexpr, BC: tl.constexpr):
    if FLAT:
        n = tl.cdiv(C * K, KS * BC)
    else:
        n = tl.cdiv(C, BC) * tl.cdiv(K, KS)
    return n


@triton.jit
def dot_tile(x_ptr, stride_xn, stride_xd, rows, row_ok, p_ptr, stride_pj, stride_pd, cols, col_ok, D,
             BN: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
             PRECISION: tl.constexpr):
    """[BN, BP] raw dot products ⟨x_row, P_col⟩ over all D (fp32 accumulation); 0 where masked."""
    acc = tl.zeros([BN, BP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD).to(tl.int64)
        d_ok = dd < D
        a = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :] * stride_xd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(p_ptr + cols[None, :] * stride_pj + dd[:, None] * stride_pd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def logsumexp_merge(m_a, sum_a, m_b, sum_b):
    """Merge two (max, Σ exp(· − max)) pairs; an empty pair is (-inf, 0)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, sum_a * tl.exp(m_a - m_safe) + sum_b * tl.exp(m_b - m_safe)


@triton.jit
def logsumexp_rows(z, axis: tl.constexpr):
    """(max, Σ exp(z − max)) along ``axis``; (-inf, 0) for an all -inf line."""
    m = tl.max(z, axis=axis)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
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
    """log Σ exp from a (max, sum) pair; -inf when empty (total is then 0, else >= 1)."""
    return tl.where(total > 0, m + natural_log(tl.where(total > 0, total, 1.0)), float("-inf"))


@triton.jit
def first_argmax(z, idx, SIZE: tl.constexpr, axis: tl.constexpr):
    """(max, smallest ``idx`` reaching it) along ``axis``; the index is always in [0, SIZE)."""
    m = tl.max(z, axis=axis)
    first = tl.min(tl.where(z == tl.expand_dims(m, axis), idx, SIZE), axis=axis)
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
