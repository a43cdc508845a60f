// Shared checks and small helpers for the kernels (ATen core only; no Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace hbk {

// Second line of defence: the Python wrappers validate first with friendlier messages.
inline void check_floating(const at::Tensor& t, const char* fn, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn,
                   ": expected ", arg, " to be float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* fn, const char* arg) {
  TORCH_CHECK_VALUE(t.dim() == dim, fn, ": expected ", arg, " to have ", dim,
                    " dimensions, got shape ", t.sizes());
}

inline void check_same_kind(const at::Tensor& a, const at::Tensor& b, const char* fn,
                            const char* arg) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), fn, ": expected ", arg, " to have dtype ",
                   a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK_TYPE(a.device() == b.device(), fn, ": expected ", arg, " on device ", a.device(),
                   ", got ", b.device());
}

// Rows per block so that one block of `row_elems` elements of `elem_size` bytes fills about
// `target_bytes` (clamped to [lo, hi]).
inline int64_t rows_per_block(int64_t row_elems, int64_t elem_size, int64_t target_bytes,
                              int64_t lo, int64_t hi) {
  const int64_t row_bytes = std::max<int64_t>(1, row_elems * elem_size);
  return std::clamp<int64_t>(target_bytes / row_bytes, lo, hi);
}

// Copy the upper triangle of the square matrix K onto its lower triangle, tile by tile.
void mirror_upper_to_lower(at::Tensor& K);

}  // namespace hbk
