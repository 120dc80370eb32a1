// The kernels of update_prototypes (docs/spec.md §3.5): segmented sums of the (normalised) pixels
// of each prototype, and the momentum step.
//
// prototype_sums sorts the contributing pixels by prototype with a stable counting sort,
// then each prototype adds its pixels in ascending pixel order: a fixed summation order,
// whatever the thread count, with no per-thread [C·K, D] buffers.
#include <vector>

#include "common/math.h"
#include "cpu/checks.h"
#include "cpu/columns.h"
#include "cpu/kernels.h"

namespace protoseg::cpu {
namespace {

constexpr const char* kSums = "protoseg_kernels::prototype_sums";
constexpr const char* kMomentum = "protoseg_kernels::momentum_update";

// Pixels grouped by key, ascending within a group: pixels of key j are
// order[offsets[j] .. offsets[j + 1]). Keys outside [0, num_keys) are left out.
struct PixelsByKey {
  std::vector<int64_t> offsets, order;

  PixelsByKey(const int64_t* key, int64_t rows, int64_t num_keys) : offsets(num_keys + 1, 0) {
    for (int64_t i = 0; i < rows; ++i) {
      if (index_in_range(key[i], num_keys)) ++offsets[key[i] + 1];
    }
    for (int64_t j = 0; j < num_keys; ++j) offsets[j + 1] += offsets[j];
    order.resize(offsets[num_keys]);
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < rows; ++i) {
      if (index_in_range(key[i], num_keys)) order[cursor[key[i]]++] = i;
    }
  }

  int64_t count(int64_t j) const { return offsets[j + 1] - offsets[j]; }
};

template <typename scalar_t, typename acc_t>
void prototype_sums_impl(const at::Tensor& x, const PixelsByKey& groups, int64_t num_keys, bool normalize,
                         at::Tensor& sums) {
  const int64_t d = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  acc_t* out = sums.data_ptr<acc_t>();
  const int64_t average = groups.order.size() / std::max<int64_t>(1, num_keys) + 1;
  at::parallel_for(0, num_keys, row_grain(d * average), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    acc_t sum_sq;
    for (int64_t j = begin; j < end; ++j) {
      acc_t* total = out + j * d;
      std::fill(total, total + d, acc_t(0));
      for (int64_t r = groups.offsets[j]; r < groups.offsets[j + 1]; ++r) {
        load_rows(x_data + groups.order[r] * d, 1, d, normalize, row.data(), &sum_sq);
        for (int64_t e = 0; e < d; ++e) total[e] += row[e];
      }
    }
  });
}

// new_j = normalize(γ·P̂_j + (1 − γ)·normalize(s_j)) where count_j > 0, else P̂_j.
template <typename scalar_t, typename acc_t>
void momentum_update_impl(const at::Tensor& prototypes, const at::Tensor& sums, const at::Tensor& counts,
                          double momentum, bool normalize, at::Tensor& out) {
  const int64_t d = prototypes.size(2), num_keys = prototypes.size(0) * prototypes.size(1);
  const scalar_t* p_data = prototypes.const_data_ptr<scalar_t>();
  const acc_t* s_data = sums.const_data_ptr<acc_t>();
  const int64_t* n_data = counts.const_data_ptr<int64_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const acc_t gamma = static_cast<acc_t>(momentum);
  at::parallel_for(0, num_keys, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    acc_t sum_sq;
    for (int64_t j = begin; j < end; ++j) {
      load_rows(p_data + j * d, 1, d, normalize, row.data(), &sum_sq);
      if (n_data[j] > 0) {
        const acc_t* s = s_data + j * d;
        const acc_t inv_s = inverse_norm(sum_of_squares(s, d));
        for (int64_t e = 0; e < d; ++e) row[e] = momentum_blend(row[e], s[e], inv_s, gamma);
        const acc_t inv = inverse_norm(sum_of_squares(row.data(), d));
        for (int64_t e = 0; e < d; ++e) row[e] *= inv;
      }
      for (int64_t e = 0; e < d; ++e) dst[j * d + e] = static_cast<scalar_t>(row[e]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_sums(const at::Tensor& x_in, const at::Tensor& key_in,
                                                  int64_t num_prototypes, bool normalize) {
  TORCH_CHECK(x_in.dim() == 2, kSums, ": x must be [N, D], got ", x_in.sizes());
  TORCH_CHECK(num_prototypes >= 0, kSums, ": num_prototypes must be >= 0, got ", num_prototypes);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor key = checked_index(kSums, "key", key_in, x.size(0));
  const PixelsByKey groups(key.const_data_ptr<int64_t>(), x.size(0), num_prototypes);
  at::Tensor counts = at::empty({num_prototypes}, key.options());
  int64_t* count_out = counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < num_prototypes; ++j) count_out[j] = groups.count(j);
  at::Tensor sums = at::empty({num_prototypes, x.size(1)}, x.options().dtype(compute_dtype(x.scalar_type())));
  PROTOSEG_DISPATCH_FLOATING(x.scalar_type(), kSums, [&] {
    prototype_sums_impl<scalar_t, acc_t>(x, groups, num_prototypes, normalize, sums);
  });
  return {sums, counts};
}

at::Tensor momentum_update(const at::Tensor& prototypes_in, const at::Tensor& sums_in, const at::Tensor& counts_in,
                           double momentum, bool normalize) {
  TORCH_CHECK(prototypes_in.dim() == 3, kMomentum, ": prototypes must be [C, K, D], got ", prototypes_in.sizes());
  const at::Tensor prototypes = prototypes_in.contiguous();
  const int64_t num_keys = prototypes.size(0) * prototypes.size(1), d = prototypes.size(2);
  TORCH_CHECK(sums_in.numel() == num_keys * d, kMomentum, ": sums must be [C·K, D] = [", num_keys, ", ", d,
              "], got ", sums_in.sizes());
  const at::Tensor counts = checked_index(kMomentum, "counts", counts_in.reshape(-1), num_keys);
  const auto acc_dtype = compute_dtype(prototypes.scalar_type());
  const at::Tensor sums = sums_in.to(acc_dtype).contiguous();
  at::Tensor out = at::empty_like(prototypes);
  PROTOSEG_DISPATCH_FLOATING(prototypes.scalar_type(), kMomentum, [&] {
    momentum_update_impl<scalar_t, acc_t>(prototypes, sums, counts, momentum, normalize, out);
  });
  return out;
}

}  // namespace protoseg::cpu

PROTOSEG_CPU_KERNELS(m) {
  using namespace protoseg::cpu;
  PROTOSEG_KERNEL(m, prototype_sums);
  PROTOSEG_KERNEL(m, momentum_update);
}
