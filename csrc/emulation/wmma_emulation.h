// Host emulation of the warp matrix functions of <mma.h> (`nvcuda::wmma`), for the
// tensor-core paths of csrc/cuda (docs/spec.md §6). Included by cuda_emulation.h.
//
// A fragment holds its lane's share of a 16×16 (or 16×8 / 8×16) matrix: lane l owns
// elements l·E .. l·E + E − 1 of the matrix in row-major order (E = rows·cols / 32).
// CUDA leaves the element-to-lane mapping unspecified, so a kernel may only touch
// fragments through the functions below or element-wise over all of `x[]`; any mapping
// is a faithful one, and this one keeps the arithmetic per lane what a GPU's is.
//
// Every function is a warp collective (all 32 lanes, converged, the same arguments)
// and counts as one for the divergence check. Refused as on a GPU, or where CUDA
// calls the behaviour undefined: a pointer not 256-bit aligned, a leading dimension
// that is not a multiple of 16 bytes or shorter than the stored row, lanes passing
// different pointers or leading dimensions.
//
// Arithmetic: products of fp16 / bf16 / tf32 inputs are exact in fp32 and are summed
// in fp32 in k order onto the accumulator, one rounding per addition (a tensor core
// sums its k products with less rounding: results agree to fp32 accuracy, not
// bitwise). tf32 operands keep 10 mantissa bits: `__float_to_tf32` rounds to nearest
// (ties away from zero, as cvt.rna); a value not converted is truncated by mma_sync,
// as the hardware ignores the low 13 bits.
#pragma once

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

// The element a fragment stores for the type named in its template.
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

// The matrix a fragment of use `Use` holds for the shape M×N×K.
template <typename Use, int M, int N, int K>
struct Extent;
template <int M, int N, int K>
struct Extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// What the tensor core reads of a tf32 operand: the upper 19 bits.
inline float truncate_to_tf32(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits &= 0xffffe000u;  // inf and NaN stay as they are
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T>
float operand_value(typename Storage<T>::type v) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    return truncate_to_tf32(v);
  } else {
    return to_float(v);
  }
}

// Lanes of a warp must pass the same pointer and leading dimension: one exchange with
// lane 0 (the collective's barrier) checks both.
inline void check_uniform(const void* pointer, unsigned ldm, const char* what) {
  using namespace protoseg::emulation;
  const std::uint64_t mine = std::uint64_t(reinterpret_cast<std::uintptr_t>(pointer)) ^ (std::uint64_t(ldm) << 48);
  if (exchange(mine, 0) != mine) {
    throw KernelError(std::string(what) + ": the lanes of a warp passed different pointers or leading dimensions, "
                                   "or not all of them called it (a divergent warp collective)");
  }
}

template <typename Element>
void check_memory(const void* pointer, unsigned ldm, int row_length, const char* what) {
  using protoseg::emulation::KernelError;
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0) {
    throw KernelError(std::string(what) + ": the pointer must be 256-bit aligned");
  }
  if ((ldm * sizeof(Element)) % 16 != 0) {
    throw KernelError(std::string(what) + ": ldm must be a multiple of 16 bytes");
  }
  if (int(ldm) < row_length) throw KernelError(std::string(what) + ": ldm is shorter than a stored row");
  check_uniform(pointer, ldm, what);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
 public:
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::Extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / protoseg::emulation::kWarpSize;
  element_type x[num_elements];

  // Matrix position (r, c) of this lane's element i.
  static int row_of(int i) { return (protoseg::emulation::lane_id() * num_elements + i) / cols; }
  static int col_of(int i) { return (protoseg::emulation::lane_id() * num_elements + i) % cols; }
};

inline float __float_to_tf32(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) {
    bits = (bits + 0x1000u) & 0xffffe000u;  // round to nearest, ties away from zero
  }
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const typename fragment<Use, M, N, K, T, Layout>::element_type& v) {
  __syncwarp();  // a collective: counted for the divergence check, with its barrier
  for (auto& e : f.x) e = v;
}

// matrix_a / matrix_b: the layout is part of the fragment's type.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const typename fragment<Use, M, N, K, T, Layout>::element_type* p,
                      unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load names its memory layout");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  detail::check_memory<typename Frag::element_type>(p, ldm, row ? Frag::cols : Frag::rows, "wmma::load_matrix_sync");
  for (int i = 0; i < Frag::num_elements; ++i) {
    const int r = Frag::row_of(i), c = Frag::col_of(i);
    f.x[i] = row ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r];
  }
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  const bool row = layout == mem_row_major;
  detail::check_memory<T>(p, ldm, row ? Frag::cols : Frag::rows, "wmma::load_matrix_sync");
  for (int i = 0; i < Frag::num_elements; ++i) {
    const int r = Frag::row_of(i), c = Frag::col_of(i);
    f.x[i] = row ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r];
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  const bool row = layout == mem_row_major;
  detail::check_memory<T>(p, ldm, row ? Frag::cols : Frag::rows, "wmma::store_matrix_sync");
  for (int i = 0; i < Frag::num_elements; ++i) {
    const int r = Frag::row_of(i), c = Frag::col_of(i);
    (row ? p[std::size_t(r) * ldm + c] : p[std::size_t(c) * ldm + r]) = f.x[i];
  }
}

// d = a·b + c. The lanes publish their shares of a and b in the warp's matrix buffer
// (two banks used alternately, like the shuffle slots), then each computes its own
// elements of d.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using namespace protoseg::emulation;
  using A = fragment<matrix_a, M, N, K, T, LayoutA>;
  using B = fragment<matrix_b, M, N, K, T, LayoutB>;
  using D = fragment<accumulator, M, N, K, float>;
  static_assert(M * K + K * N <= kMatrixSlots, "fragment shape larger than the emulated matrix buffer");
  auto& bank = next_matrix_bank();
  float* a_full = bank.data();          // [M][K]
  float* b_full = bank.data() + M * K;  // [K][N]
  for (int i = 0; i < A::num_elements; ++i) a_full[A::row_of(i) * K + A::col_of(i)] = detail::operand_value<T>(a.x[i]);
  for (int i = 0; i < B::num_elements; ++i) b_full[B::row_of(i) * N + B::col_of(i)] = detail::operand_value<T>(b.x[i]);
  current_warp().barrier.arrive_and_wait();  // every lane has published its share
  float out[D::num_elements];
  for (int i = 0; i < D::num_elements; ++i) {
    const int r = D::row_of(i), col = D::col_of(i);
    float sum = c.x[i];
    for (int k = 0; k < K; ++k) sum += a_full[r * K + k] * b_full[k * N + col];
    out[i] = sum;
  }
  for (int i = 0; i < D::num_elements; ++i) d.x[i] = out[i];  // d may be c
}

}  // namespace nvcuda::wmma
