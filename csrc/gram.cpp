// Dense and factored ("ghost") Gram matrices of per-sample gradients.
#include "hbk/gram.h"
#include "hbk/common.h"
#include "hbk/factors.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

namespace hbk {
namespace {
// Entries per GEMM buffer of the ghost Gram (two buffers: 2 x 16 MB in float32).
constexpr int64_t kBufferElems = 4 << 20;
}  // namespace

void mirror_upper_to_lower(at::Tensor& K) {
  const int64_t n = K.size(0);
  if (!K.is_cpu()) {  // device-generic fallback
    K.copy_(K.triu() + K.triu(1).t());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "hbk::mirror_upper_to_lower", [&] {
    scalar_t* k = K.data_ptr<scalar_t>();
    constexpr int64_t tile = 64;  // a 64 x 64 source tile stays in L1/L2 while transposed
    const int64_t ntiles = (n + tile - 1) / tile;
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ti = begin; ti < end; ++ti) {
        const int64_t i0 = ti * tile, i1 = std::min(n, i0 + tile);
        for (int64_t j0 = 0; j0 <= i0; j0 += tile) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t j1 = std::min(i, j0 + tile);
            for (int64_t j = j0; j < j1; ++j) k[i * n + j] = k[j * n + i];
          }
        }
      }
    });
  });
}

at::Tensor gram(const at::Tensor& grads) {
  static const char* fn = "hbk::gram";
  check_dim(grads, 2, fn, "grads");
  check_floating(grads, fn, "grads");
  const int64_t n = grads.size(0), p = grads.size(1);
  auto K = at::empty({n, n}, grads.options());
  if (n == 0) return K;
  if (p == 0) return K.zero_();
  // Block rows of the upper triangle: block i computes K[i, i:] = G_i G[i:]^T. About 16
  // blocks keeps the redundant work on diagonal blocks near 1/32 of the full product.
  const int64_t block = std::max<int64_t>(256, (n + 15) / 16);
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t bi = std::min(block, n - i0);
    auto out = K.narrow(0, i0, bi).narrow(1, i0, n - i0);
    at::mm_out(out, grads.narrow(0, i0, bi), grads.narrow(0, i0, n - i0).t());
  }
  mirror_upper_to_lower(K);
  return K;
}

at::Tensor ghost_gram(at::TensorList inputs, at::TensorList output_grads,
                      const c10::List<bool>& has_bias) {
  static const char* fn = "hbk::ghost_gram";
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias.vec());
  const int64_t n = layers.front().n;
  const auto opts = layers.front().A.options();
  auto K = at::zeros({n, n}, opts);
  if (n == 0) return K;

  int64_t Tmax = 1;
  for (const auto& L : layers) Tmax = std::max(Tmax, L.T);
  // Work on block rows of the upper triangle, K[i0:i0+ti, j0:j0+tj], with two GEMM buffers of
  // (ti*T) x (tj*T) entries each: few large GEMMs, and no per-layer n x n temporary.
  const int64_t tile_rows = std::clamp<int64_t>(kBufferElems / (Tmax * Tmax * n), 1, 512);
  const int64_t tile_cols = std::clamp<int64_t>(kBufferElems / (Tmax * Tmax * tile_rows), 1, n);
  auto bufA = at::empty({tile_rows * Tmax * tile_cols * Tmax}, opts);
  auto bufD = at::empty_like(bufA);

  for (int64_t i0 = 0; i0 < n; i0 += tile_rows) {
    const int64_t ti = std::min(tile_rows, n - i0);
    for (int64_t j0 = i0; j0 < n; j0 += tile_cols) {
      const int64_t tj = std::min(tile_cols, n - j0);
      auto acc = K.narrow(0, i0, ti).narrow(1, j0, tj);
      for (const auto& L : layers) {
        const int64_t T = L.T;
        auto bA = bufA.narrow(0, 0, ti * T * tj * T).view({ti * T, tj * T});
        auto bD = bufD.narrow(0, 0, ti * T * tj * T).view({ti * T, tj * T});
        at::mm_out(bA, L.A2.narrow(0, i0 * T, ti * T), L.A2.narrow(0, j0 * T, tj * T).t());
        at::mm_out(bD, L.D2.narrow(0, i0 * T, ti * T), L.D2.narrow(0, j0 * T, tj * T).t());
        if (T == 1) {  // acc += (a_i.a_j + b) (d_i.d_j)
          if (L.bias) bA.add_(1.0);
          acc.addcmul_(bA, bD);
          continue;
        }
        // acc += sum over the T x T sub-block of each sample pair, + (sum_t d).(sum_s d).
        acc.add_(bA.mul_(bD).view({ti, T, tj, T}).sum({1, 3}));
        if (L.bias) acc.addmm_(L.Dsum.narrow(0, i0, ti), L.Dsum.narrow(0, j0, tj).t());
      }
    }
  }
  mirror_upper_to_lower(K);
  return K;
}

}  // namespace hbk
