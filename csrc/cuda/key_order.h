// Pixels stably sorted by an integer key in [0, G) (other keys are dropped): the
// order in which the deterministic segmented reductions fold them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cuda/portable.cuh"

namespace protoseg::cuda {

struct KeyOrder {
  at::Tensor perm;        // [n] int64, pixel at each sorted position; the first starts[G] are valid
  at::Tensor sorted_key;  // [n] int64, key at each sorted position
  at::Tensor starts;      // [G + 1] int64, the positions of key g are [starts[g], starts[g + 1])
  at::Tensor counts;      // [G] int64, pixels per key
};

// A stable counting sort (ascending pixel index within a key), in four passes: ranks
// and histograms per tile of pixels, per-key prefix over the tiles, scan over keys,
// scatter. `keys` is a contiguous [n] int64 tensor on the kernel device.
KeyOrder sort_by_key(const at::Tensor& keys, int64_t groups, cudaStream_t stream);

}  // namespace protoseg::cuda
