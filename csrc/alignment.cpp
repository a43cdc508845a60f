// Cosine alignment of per-sample gradients with many vectors: dense (blocked, fused norms)
// and factored per layer (never forming the (n, p) gradient matrix).
#include "hbk/alignment.h"
#include "hbk/common.h"
#include "hbk/factors.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace hbk {
namespace {

constexpr int64_t kBlockBytes = 16 << 20;  // a copied row block of a non-row-contiguous G
// Bound on per-block temporaries (elements): large enough that the GEMMs run at full rate.
constexpr int64_t kTempElems = 16 << 20;

// 1/x, or 0 where x == 0 (the documented zero-norm convention); NaN stays NaN.
at::Tensor safe_inverse(const at::Tensor& x) {
  return at::where(x == 0, at::zeros({}, x.options()), x.reciprocal());
}

// 1/sqrt(x), or 0 where x == 0; NaN stays NaN.
at::Tensor safe_rsqrt(const at::Tensor& sq) {
  return at::where(sq == 0, at::zeros({}, sq.options()), sq.rsqrt());
}

// Squared norms must not be negative: a ValueError naming the argument and the first entry.
void check_nonnegative(const at::Tensor& t, const char* fn, const char* arg) {
  const auto neg = t < 0;
  if (!neg.any().item<bool>()) return;
  const int64_t i = neg.to(at::kByte).argmax().item<int64_t>();
  TORCH_CHECK_VALUE(false, fn, ": expected ", arg, " >= 0 (squared norms), got ",
                    t[i].item<double>(), " at index ", i);
}

// C[i, j] *= rg[i] * rv[j] in place.
void scale_rows_cols_(at::Tensor& C, const at::Tensor& rg, const at::Tensor& rv) {
  if (!C.is_cpu() || !C.is_contiguous()) {
    C.mul_(rg.unsqueeze(1)).mul_(rv.unsqueeze(0));
    return;
  }
  const int64_t n = C.size(0), k = C.size(1);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "hbk::scale_rows_cols_", [&] {
    scalar_t* c = C.data_ptr<scalar_t>();
    const auto g = rg.contiguous();
    const auto v = rv.contiguous();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < k; ++j) c[i * k + j] *= pg[i] * pv[j];
    });
  });
}

// The vector slices of one layer: W_l (d_out, d_in, k) and, where the layer has a bias, w_l.
struct LayerVectors {
  const at::Tensor* W = nullptr;
  const at::Tensor* wb = nullptr;  // null for a layer without bias
};

// Checks every layer's slices against its factors (shapes, dtype, device) and returns k.
int64_t check_layer_vectors(const char* fn, const std::vector<LayerFactors>& layers,
                            const std::vector<LayerVectors>& vecs) {
  const at::Tensor& W0 = *vecs.front().W;
  TORCH_CHECK_VALUE(W0.dim() == 3, fn,
                    ": expected weight_vectors[0] of shape (d_out, d_in, k), got ", W0.sizes());
  const int64_t k = W0.size(2);
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    const at::Tensor& W = *vecs[l].W;
    check_same_kind(L.A, W, fn, "weight_vectors");
    TORCH_CHECK_VALUE(W.dim() == 3 && W.size(0) == L.d_out && W.size(1) == L.d_in &&
                          W.size(2) == k,
                      fn, ": expected weight_vectors[", l, "] of shape (", L.d_out, ", ",
                      L.d_in, ", ", k, "), got ", W.sizes());
    if (!L.bias) continue;
    const at::Tensor& wb = *vecs[l].wb;
    check_same_kind(L.A, wb, fn, "bias_vectors");
    TORCH_CHECK_VALUE(wb.dim() == 2 && wb.size(0) == L.d_out && wb.size(1) == k, fn,
                      ": expected the bias vectors of layer ", l, " of shape (", L.d_out, ", ",
                      k, "), got ", wb.sizes());
  }
  return k;
}

// out (n, k) += <g_i, v_j> restricted to layer L.
void add_layer_dots(at::Tensor& out, const LayerFactors& L, const LayerVectors& v) {
  const int64_t n = L.n, k = out.size(1);
  const at::Tensor& W = *v.W;
  if (L.bias) out.addmm_(L.Dsum, *v.wb);
  // <g_i, W> = sum_t d_it^T W a_it. Contract W with the wider factor first (one GEMM),
  // then with the narrower one (a batched GEMV); the temporary is (rows, T, narrow, k).
  const bool contract_inputs_first = L.d_out <= L.d_in;
  const int64_t narrow = contract_inputs_first ? L.d_out : L.d_in;
  const at::Tensor Wmat = contract_inputs_first
                              ? W.permute({1, 0, 2}).reshape({L.d_in, L.d_out * k})
                              : W.reshape({L.d_out, L.d_in * k});
  const at::Tensor& wide = contract_inputs_first ? L.A2 : L.D2;
  const at::Tensor& thin = contract_inputs_first ? L.D : L.A;
  const int64_t rows =
      std::clamp<int64_t>(kTempElems / std::max<int64_t>(1, L.T * narrow * k), 1, n);
  // One buffer per layer, reused by every block (fresh large allocations page-fault).
  auto buf = at::empty({rows * L.T * narrow * k}, out.options());
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t bi = std::min(rows, n - i0);
    auto M = buf.narrow(0, 0, bi * L.T * narrow * k).view({bi * L.T, narrow * k});
    at::mm_out(M, wide.narrow(0, i0 * L.T, bi * L.T), Wmat);
    auto lhs = thin.narrow(0, i0, bi).reshape({bi, 1, L.T * narrow});
    auto acc = out.narrow(0, i0, bi).unsqueeze(1);  // (bi, 1, k)
    acc.add_(at::bmm(lhs, M.view({bi, L.T * narrow, k})));
  }
}

// out (n,) += |g_i|^2 restricted to layer L.
void add_layer_sq_norms(at::Tensor& out, const LayerFactors& L) {
  const int64_t n = L.n;
  if (L.T == 1) {  // (|a|^2 + b) |d|^2
    auto a2 = L.A2.square().sum(1);
    if (L.bias) a2.add_(1.0);
    out.add_(a2.mul_(L.D2.square().sum(1)));
    return;
  }
  // sum_{t,s} (a_t . a_s)(d_t . d_s) = |sum_t d_t a_t^T|_F^2 per sample, in row blocks of
  // (T x T) Gram matrices. Clamped at 0: rounding can leave a tiny negative sum for a
  // near-zero gradient (clamp keeps NaN).
  const int64_t rows = std::clamp<int64_t>(kTempElems / (L.T * L.T), 1, n);
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t bi = std::min(rows, n - i0);
    auto Ai = L.A.narrow(0, i0, bi);
    auto Di = L.D.narrow(0, i0, bi);
    auto aa = at::bmm(Ai, Ai.transpose(1, 2));
    auto dd = at::bmm(Di, Di.transpose(1, 2));
    out.narrow(0, i0, bi).add_(aa.mul_(dd).sum({1, 2}).clamp_min_(0));
  }
  if (L.bias) out.add_(L.Dsum.square().sum(1));
}

// Per-layer slices from the ghost_dots form (one optional bias slice per layer).
std::vector<LayerVectors> vectors_from_optional(
    const char* fn, size_t layers, at::TensorList weight_vectors,
    const c10::List<std::optional<at::Tensor>>& bias_vectors, std::vector<at::Tensor>& keep,
    std::vector<bool>& has_bias) {
  TORCH_CHECK_VALUE(weight_vectors.size() == layers && bias_vectors.size() == layers, fn,
                    ": expected one weight_vectors and one bias_vectors entry per layer (",
                    layers, "), got ", weight_vectors.size(), " and ", bias_vectors.size());
  keep.assign(layers, at::Tensor());
  std::vector<LayerVectors> vecs(layers);
  for (size_t l = 0; l < layers; ++l) {
    const auto wb = bias_vectors.get(l);
    has_bias.push_back(wb.has_value());
    vecs[l].W = &weight_vectors[l];
    if (wb.has_value()) {
      keep[l] = *wb;
      vecs[l].wb = &keep[l];
    }
  }
  return vecs;
}

// The fused kernel: dots (n, k) and squared norms (n,), one validation and one set of factor
// views, each layer's dots and norms computed back to back (its factors still in cache).
std::tuple<at::Tensor, at::Tensor> products(const char* fn,
                                            const std::vector<LayerFactors>& layers,
                                            const std::vector<LayerVectors>& vecs) {
  const int64_t k = check_layer_vectors(fn, layers, vecs);
  const int64_t n = layers.front().n;
  auto dots = at::zeros({n, k}, layers.front().A.options());
  auto sq = at::zeros({n}, layers.front().A.options());
  if (n == 0) return {dots, sq};
  for (size_t l = 0; l < layers.size(); ++l) {
    if (k > 0) add_layer_dots(dots, layers[l], vecs[l]);
    add_layer_sq_norms(sq, layers[l]);
  }
  return {dots, sq};
}

// |v_j|^2 over all the given weight and bias slices.
at::Tensor vector_sq_norms(const std::vector<LayerFactors>& layers,
                           const std::vector<LayerVectors>& vecs, int64_t k) {
  at::Tensor vsq = at::zeros({k}, layers.front().A.options());
  for (size_t l = 0; l < layers.size(); ++l) {
    vsq.add_(vecs[l].W->square().sum({0, 1}));
    if (vecs[l].wb != nullptr) vsq.add_(vecs[l].wb->square().sum(0));
  }
  return vsq;
}

}  // namespace

at::Tensor cosine_from_dots(const at::Tensor& dots, const at::Tensor& grad_sq_norms,
                            const at::Tensor& vector_sq_norms) {
  static const char* fn = "hbk::cosine_from_dots";
  check_dim(dots, 2, fn, "dots");
  check_floating(dots, fn, "dots");
  check_same_kind(dots, grad_sq_norms, fn, "grad_sq_norms");
  check_same_kind(dots, vector_sq_norms, fn, "vector_sq_norms");
  TORCH_CHECK_VALUE(grad_sq_norms.dim() == 1 && grad_sq_norms.size(0) == dots.size(0), fn,
                    ": expected grad_sq_norms of shape (", dots.size(0), "), got ",
                    grad_sq_norms.sizes());
  TORCH_CHECK_VALUE(vector_sq_norms.dim() == 1 && vector_sq_norms.size(0) == dots.size(1), fn,
                    ": expected vector_sq_norms of shape (", dots.size(1), "), got ",
                    vector_sq_norms.sizes());
  check_nonnegative(grad_sq_norms, fn, "grad_sq_norms");
  check_nonnegative(vector_sq_norms, fn, "vector_sq_norms");
  auto C = dots.contiguous().clone();
  scale_rows_cols_(C, safe_rsqrt(grad_sq_norms), safe_rsqrt(vector_sq_norms));
  return C;
}

at::Tensor cosine_alignment(const at::Tensor& grads, const at::Tensor& vectors) {
  static const char* fn = "hbk::cosine_alignment";
  check_dim(grads, 2, fn, "grads");
  check_dim(vectors, 2, fn, "vectors");
  check_floating(grads, fn, "grads");
  check_same_kind(grads, vectors, fn, "vectors");
  const int64_t n = grads.size(0), p = grads.size(1), k = vectors.size(1);
  TORCH_CHECK_VALUE(vectors.size(0) == p, fn, ": expected vectors of shape (", p,
                    ", k), got ", vectors.sizes());
  auto C = at::empty({n, k}, grads.options());
  if (n == 0 || k == 0) return C;
  if (p == 0) return C.zero_();

  auto gnorm = at::empty({n}, grads.options());
  if (grads.stride(1) == 1 || grads.stride(0) == 1) {
    // A BLAS layout (rows or columns contiguous): one GEMM over all rows and one norm pass, no
    // copy and no temporary. (Measured here:
    // row blocks small enough to stay in cache make MKL's GEMM slower than the second read of
    // G that they save.)
    at::linalg_vector_norm_out(gnorm, grads, 2, 1);
    at::mm_out(C, grads, vectors);
  } else {
    // Otherwise copy one block of rows at a time (bounded memory), norms while it is cached.
    const int64_t block = rows_per_block(p, grads.element_size(), kBlockBytes, 16, n);
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t bi = std::min(block, n - i0);
      auto Gi = grads.narrow(0, i0, bi).contiguous();
      auto gi = gnorm.narrow(0, i0, bi);
      at::linalg_vector_norm_out(gi, Gi, 2, 1);
      auto Ci = C.narrow(0, i0, bi);
      at::mm_out(Ci, Gi, vectors);
    }
  }
  scale_rows_cols_(C, safe_inverse(gnorm), safe_inverse(at::linalg_vector_norm(vectors, 2, 0)));
  return C;
}

at::Tensor ghost_dots(at::TensorList inputs, at::TensorList output_grads,
                      at::TensorList weight_vectors,
                      const c10::List<std::optional<at::Tensor>>& bias_vectors) {
  static const char* fn = "hbk::ghost_dots";
  std::vector<at::Tensor> keep;
  std::vector<bool> has_bias;
  const auto vecs =
      vectors_from_optional(fn, inputs.size(), weight_vectors, bias_vectors, keep, has_bias);
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias);
  const int64_t k = check_layer_vectors(fn, layers, vecs);
  auto out = at::zeros({layers.front().n, k}, layers.front().A.options());
  if (out.numel() == 0) return out;
  for (size_t l = 0; l < layers.size(); ++l) add_layer_dots(out, layers[l], vecs[l]);
  return out;
}

at::Tensor ghost_sq_norms(at::TensorList inputs, at::TensorList output_grads,
                          const c10::List<bool>& has_bias) {
  static const char* fn = "hbk::ghost_sq_norms";
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias.vec());
  auto out = at::zeros({layers.front().n}, layers.front().A.options());
  if (out.numel() == 0) return out;
  for (const auto& L : layers) add_layer_sq_norms(out, L);
  return out;
}

std::tuple<at::Tensor, at::Tensor> ghost_products(at::TensorList inputs,
                                                  at::TensorList output_grads,
                                                  const c10::List<bool>& has_bias,
                                                  at::TensorList weight_vectors,
                                                  at::TensorList bias_vectors) {
  static const char* fn = "hbk::ghost_products";
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias.vec());
  int64_t nbias = 0;
  for (const auto& L : layers) nbias += L.bias ? 1 : 0;
  TORCH_CHECK_VALUE(weight_vectors.size() == layers.size(), fn,
                    ": expected one weight_vectors entry per layer (", layers.size(), "), got ",
                    weight_vectors.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(bias_vectors.size()) == nbias, fn,
                    ": expected one bias_vectors entry per layer with a bias (", nbias,
                    "), got ", bias_vectors.size());
  std::vector<LayerVectors> vecs(layers.size());
  for (size_t l = 0, b = 0; l < layers.size(); ++l) {
    vecs[l].W = &weight_vectors[l];
    if (layers[l].bias) vecs[l].wb = &bias_vectors[b++];
  }
  return products(fn, layers, vecs);
}

at::Tensor ghost_alignment(at::TensorList inputs, at::TensorList output_grads,
                           at::TensorList weight_vectors,
                           const c10::List<std::optional<at::Tensor>>& bias_vectors) {
  static const char* fn = "hbk::ghost_alignment";
  std::vector<at::Tensor> keep;
  std::vector<bool> has_bias;
  const auto vecs =
      vectors_from_optional(fn, inputs.size(), weight_vectors, bias_vectors, keep, has_bias);
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias);
  auto [dots, gsq] = products(fn, layers, vecs);
  if (dots.numel() == 0) return dots;
  scale_rows_cols_(dots, safe_rsqrt(gsq), safe_rsqrt(vector_sq_norms(layers, vecs, dots.size(1))));
  return dots;
}

}  // namespace hbk
