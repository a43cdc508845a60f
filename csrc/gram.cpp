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

#include <cmath>

namespace hbk {

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

namespace {

// acc (ti, tj; row stride ld) += sum over the T x T sub-blocks of bufA * bufD
// (+ beta * bufD when T == 1, + bufS when T > 1 and the layer has a bias).
template <typename scalar_t>
void accumulate_tile_cpu(scalar_t* acc, int64_t ld, const scalar_t* bA, const scalar_t* bD,
                         const scalar_t* bS, int64_t ti, int64_t tj, int64_t T, scalar_t beta) {
  const int64_t row = tj * T;  // row length of bA / bD
  at::parallel_for(0, ti, 8, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) {
      scalar_t* out = acc + a * ld;
      if (T == 1) {
        const scalar_t* pa = bA + a * row;
        const scalar_t* pd = bD + a * row;
        for (int64_t b = 0; b < tj; ++b) out[b] += (pa[b] + beta) * pd[b];
        continue;
      }
      for (int64_t b = 0; b < tj; ++b) {
        scalar_t s = bS ? bS[a * tj + b] : scalar_t(0);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* pa = bA + (a * T + t) * row + b * T;
          const scalar_t* pd = bD + (a * T + t) * row + b * T;
          for (int64_t u = 0; u < T; ++u) s += pa[u] * pd[u];
        }
        out[b] += s;
      }
    }
  });
}

void accumulate_tile(at::Tensor& acc, const at::Tensor& bA, const at::Tensor& bD,
                     const at::Tensor* bS, int64_t T, double beta) {
  const int64_t ti = acc.size(0), tj = acc.size(1);
  if (!acc.is_cpu()) {  // device-generic fallback: same math with tensor ops
    auto prod = (bA.view({ti, T, tj, T}) * bD.view({ti, T, tj, T})).sum({1, 3});
    if (T == 1 && beta != 0.0) prod.add_(bD, beta);
    if (bS) prod.add_(*bS);
    acc.add_(prod);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "hbk::ghost_gram_tile", [&] {
    accumulate_tile_cpu<scalar_t>(acc.data_ptr<scalar_t>(), acc.stride(0),
                                  bA.data_ptr<scalar_t>(), bD.data_ptr<scalar_t>(),
                                  bS ? bS->data_ptr<scalar_t>() : nullptr, ti, tj, T,
                                  static_cast<scalar_t>(beta));
  });
}

}  // namespace

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
  // Samples per tile: each tile buffer holds (tile*T)^2 entries, at most ~1M (4-8 MB).
  const int64_t tile = std::clamp<int64_t>(1024 / Tmax, 1, 512);
  const int64_t side = tile * Tmax;
  auto bufA = at::empty({side * side}, opts);
  auto bufD = at::empty({side * side}, opts);
  auto bufS = at::empty({tile * tile}, opts);

  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t ti = std::min(tile, n - i0);
    for (int64_t j0 = i0; j0 < n; j0 += tile) {  // upper triangle of tiles only
      const int64_t tj = std::min(tile, n - j0);
      auto acc = K.narrow(0, i0, ti).narrow(1, j0, tj);
      for (const auto& L : layers) {
        const int64_t T = L.T;
        auto bA = bufA.narrow(0, 0, ti * T * tj * T).view({ti * T, tj * T});
        auto bD = bufD.narrow(0, 0, ti * T * tj * T).view({ti * T, tj * T});
        at::mm_out(bA, L.A2.narrow(0, i0 * T, ti * T), L.A2.narrow(0, j0 * T, tj * T).t());
        at::mm_out(bD, L.D2.narrow(0, i0 * T, ti * T), L.D2.narrow(0, j0 * T, tj * T).t());
        at::Tensor bS;
        const bool sum_bias = L.bias && T > 1;
        if (sum_bias) {
          bS = bufS.narrow(0, 0, ti * tj).view({ti, tj});
          at::mm_out(bS, L.Dsum.narrow(0, i0, ti), L.Dsum.narrow(0, j0, tj).t());
        }
        accumulate_tile(acc, bA, bD, sum_bias ? &bS : nullptr, T,
                        (L.bias && T == 1) ? 1.0 : 0.0);
      }
    }
  }
  mirror_upper_to_lower(K);
  return K;
}

}  // namespace hbk
