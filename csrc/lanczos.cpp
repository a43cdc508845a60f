// Thick-restart block Lanczos (Wu & Simon) with locking and full reorthogonalisation, and
// the plain Lanczos recurrences of stochastic Lanczos quadrature. See hbk/lanczos.h.
//
// Layout: the basis is stored by rows, Q (rows, dim), so that vector j is the contiguous row
// Q[j] and Gram-Schmidt against the first r vectors is two GEMMs with Q[:r]. Rows
// [0, nl) hold the locked Ritz vectors, [nl, nl + na) the active basis, and the next
// `pending` rows the block that the next operator call expands. The projected matrix of
// the active basis, T = V^T A V, is kept on the host in float64 (filled from the
// Gram-Schmidt coefficients) and solved with Eigen (dense.cpp).
#include "hbk/lanczos.h"
#include "hbk/dense.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

namespace hbk {

Which parse_which(const std::string& which) {
  if (which == "LA") return Which::LA;
  if (which == "SA") return Which::SA;
  if (which == "LM") return Which::LM;
  TORCH_CHECK_VALUE(false, "hbk.lanczos: expected which to be one of 'LA', 'SA', 'LM', got '",
                    which, "'");
}

namespace {

constexpr int64_t PROBE_MIN = 10;

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double machine_eps(at::ScalarType t) {
  return t == at::kFloat ? static_cast<double>(std::numeric_limits<float>::epsilon())
                         : std::numeric_limits<double>::epsilon();
}

// A (rows x cols) float64 host tensor holding `values` (row-major), converted to `like`.
at::Tensor host_matrix(const std::vector<double>& values, int64_t rows, int64_t cols,
                       const at::Tensor& like) {
  auto host = at::from_blob(const_cast<double*>(values.data()), {rows, cols},
                            at::TensorOptions().dtype(at::kDouble))
                  .clone();
  return host.to(like.options());
}

// Copy a (r x c) tensor (any dtype/device) into a row-major float64 host vector.
std::vector<double> to_host(const at::Tensor& t) {
  auto h = t.detach().to(at::TensorOptions().dtype(at::kDouble).device(at::kCPU)).contiguous();
  const double* p = h.data_ptr<double>();
  return std::vector<double>(p, p + h.numel());
}

// Ranks Ritz values by how much they are wanted (the first is the most wanted).
std::vector<int64_t> wanted_order(const std::vector<double>& theta, Which which) {
  std::vector<int64_t> idx(theta.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    switch (which) {
      case Which::LA: return theta[a] > theta[b];
      case Which::SA: return theta[a] < theta[b];
      case Which::LM: return std::abs(theta[a]) > std::abs(theta[b]);
    }
    return false;
  });
  return idx;
}

// Calls the operator on a (dim, b) block given by rows [r0, r0 + b) of Q and returns
// A X as a fresh (b, dim) row block (detached, basis dtype/device).
at::Tensor apply_rows(const BlockMatvec& op, const at::Tensor& Q, int64_t r0, int64_t b,
                      int64_t dim, double& seconds, at::Tensor out = at::Tensor()) {
  at::Tensor x = Q.narrow(0, r0, b);  // a view of the basis: the callee must not modify it
  at::Tensor arg = b == 1 ? x.view({dim}) : x.t();
  auto t0 = Clock::now();
  at::Tensor y = op(arg);
  seconds += seconds_between(t0, Clock::now());
  TORCH_CHECK_VALUE(y.defined(), "hbk.lanczos: expected matvec to return a tensor, got None");
  const bool ok = (y.dim() == 2 && y.size(0) == dim && y.size(1) == b) ||
                  (b == 1 && y.dim() == 1 && y.size(0) == dim);
  TORCH_CHECK_VALUE(ok, "hbk.lanczos: expected matvec to return a tensor of shape (", dim,
                    b == 1 ? ",) or (" : ", ", b == 1 ? std::to_string(dim) + ", 1" : std::to_string(b),
                    "), got ", y.sizes());
  TORCH_CHECK_TYPE(y.is_floating_point(),
                   "hbk.lanczos: expected matvec to return a floating-point tensor, got ",
                   y.scalar_type());
  TORCH_CHECK_TYPE(y.device() == Q.device(),
                   "hbk.lanczos: expected matvec to return a tensor on the basis device ",
                   Q.device(), ", got one on ", y.device());
  if (!out.defined()) out = at::empty({b, dim}, Q.options());
  out.copy_(y.detach().reshape({dim, b}).t());
  return out;
}

// Classical Gram-Schmidt of the rows of W against the rows of B (both (., dim)) as GEMMs;
// returns the accumulated coefficients (rows(B), rows(W)). The second pass runs when
// `eta` >= 1 (always) or when the first pass cancelled most of some row, |w'| < eta |w|
// (the Daniel-Gragg-Kaufman-Stewart criterion; "twice is enough").
at::Tensor cgs2(at::Tensor& W, const at::Tensor& B, double eta = 2.0, int64_t* passes = nullptr,
                std::vector<double>* norms = nullptr) {
  auto row_norms = [&] { return to_host(at::linalg_vector_norm(W, 2, {1}, false, at::kDouble)); };
  std::vector<double> before, after;
  if (eta < 1.0) before = row_norms();
  at::Tensor h = at::mm(B, W.t());
  W.addmm_(h.t(), B, 1.0, -1.0);
  if (passes) ++*passes;
  if (eta < 1.0) {
    after = row_norms();
    for (size_t i = 0; i < after.size(); ++i)
      if (!(after[i] >= eta * before[i])) eta = 2.0;
  }
  if (eta >= 1.0) {
    at::Tensor h2 = at::mm(B, W.t());
    W.addmm_(h2.t(), B, 1.0, -1.0);
    h.add_(h2);
    if (passes) ++*passes;
    after.clear();
  }
  if (norms) *norms = after.empty() ? row_norms() : after;
  return h;
}

class RandomVectors {
 public:
  explicit RandomVectors(uint64_t seed) : gen_(seed) {}
  at::Tensor next(int64_t dim, const at::TensorOptions& opts) {
    std::normal_distribution<double> normal;
    std::vector<double> v(static_cast<size_t>(dim));
    for (auto& x : v) x = normal(gen_);
    return host_matrix(v, 1, dim, at::empty({0}, opts));
  }

 private:
  std::mt19937_64 gen_;
};

class ThickRestartLanczos {
 public:
  ThickRestartLanczos(const BlockMatvec& op, const at::Tensor& start, const LanczosOptions& o,
                      const LanczosMonitor& monitor)
      : op_(op), opts_(o), monitor_(monitor), rng_(o.seed) {
    TORCH_CHECK_TYPE(start.scalar_type() == at::kFloat || start.scalar_type() == at::kDouble,
                     "hbk.lanczos: expected a float32 or float64 start block, got ",
                     start.scalar_type());
    TORCH_CHECK_VALUE(start.dim() == 1 || start.dim() == 2,
                      "hbk.lanczos: expected a (dim,) or (dim, b) start block, got shape ",
                      start.sizes());
    dim_ = start.size(0);
    b_ = o.block_size;
    const at::Tensor s = start.dim() == 1 ? start.view({dim_, 1}) : start;
    TORCH_CHECK_VALUE(s.size(1) == b_, "hbk.lanczos: expected a start block with ", b_,
                      " columns (block_size), got ", s.size(1));
    TORCH_CHECK_VALUE(o.k >= 1 && o.k <= dim_, "hbk.lanczos: expected 1 <= k <= dim = ", dim_,
                      ", got k = ", o.k);
    TORCH_CHECK_VALUE(b_ >= 1 && b_ <= dim_, "hbk.lanczos: expected 1 <= block_size <= dim, got ",
                      b_);
    TORCH_CHECK_VALUE(o.ncv <= dim_ && (o.ncv == dim_ || o.ncv >= o.k + b_),
                      "hbk.lanczos: expected k + block_size <= ncv <= dim (or ncv = dim), got ncv = ",
                      o.ncv, " (k = ", o.k, ", block_size = ", b_, ", dim = ", dim_, ")");
    TORCH_CHECK_VALUE(o.tol > 0 && std::isfinite(o.tol), "hbk.lanczos: expected tol > 0, got ",
                      o.tol);
    TORCH_CHECK_VALUE(o.max_matvecs >= b_, "hbk.lanczos: expected max_matvecs >= block_size, got ",
                      o.max_matvecs);
    rows_ = std::min(o.ncv + b_, dim_);
    auto opts = s.options();
    Q_ = at::empty({rows_, dim_}, opts);  // rows are written before they are read
    if (o.store_products) P_ = at::empty({rows_, dim_}, opts);
    Wbuf_ = at::empty({b_, dim_}, opts);
    eta_ = o.reorth_twice ? 2.0 : M_SQRT1_2;
    eps_ = machine_eps(s.scalar_type());
    T_.assign(static_cast<size_t>(rows_ * rows_), 0.0);
    // The start block, orthonormalised (random replacements for dependent columns).
    at::Tensor W = at::empty({b_, dim_}, opts);
    W.copy_(s.detach().t());
    at::Tensor norms = at::linalg_vector_norm(W, 2, {1}, false, at::kDouble).cpu();
    double nmax = 0;
    for (int64_t c = 0; c < b_; ++c) nmax = std::max(nmax, norms.data_ptr<double>()[c]);
    TORCH_CHECK_VALUE(nmax > 0 && std::isfinite(nmax),
                      "hbk.lanczos: expected a nonzero, finite start vector (v0), got norm ", nmax);
    orthonormalise_block(W, 0, nmax);
  }

  LanczosOutput run() {
    auto t0 = Clock::now();
    bool done = false;
    while (!done) {
      if (num_mv_ + pending_ > opts_.max_matvecs) {  // budget spent
        if (probing_) status_ = VerifyStatus::kNoBudget;
        break;
      }
      expand();
      if (monitor_) monitor_(LanczosProgress{num_mv_, std::min(nl_, opts_.k), restarts_});
      const bool full = pending_ == 0 || nl_ + na_ + b_ > opts_.ncv;
      const bool budget = num_mv_ + pending_ > opts_.max_matvecs;
      if (!(full || budget || na_ % check_every() == 0)) continue;
      solve_projected();
      if (probing_) {
        const int64_t top = order_[0];
        if (clearly_before(theta_[top], threshold_)) {
          // A pair more wanted than the k-th locked one, missed so far (a further copy of a
          // repeated eigenvalue, or one that the first Krylov space did not reach): converge
          // it in this space as in the main phase, then probe again.
          probing_ = false;
          ++probe_found_;
        } else {
          if (pending_ == 0 || num_mv_ - probe_start_ >= probe_budget_) {
            status_ = VerifyStatus::kChecked;
            done = true;
          } else if (budget) {
            status_ = VerifyStatus::kNoBudget;
            done = true;
          } else if (full && !restart()) {
            status_ = VerifyStatus::kNoRoom;
            done = true;
          }
          continue;
        }
      }
      if (first_pair_ < 0 && (nl_ > 0 || is_converged(order_[0]))) first_pair_ = num_mv_;
      if (all_wanted_converged()) {
        if (first_converged_ < 0) first_converged_ = num_mv_;
        if (!start_probe()) done = true;
      } else if (pending_ == 0) {
        // Complete basis: the Ritz pairs are exact up to rounding; nothing more to add.
        done = true;
      } else if (full && !budget) {
        if (!restart()) done = true;
      }
    }
    if (!probing_ && !have_solution_ && na_ > 0) solve_projected();
    auto tf = Clock::now();
    LanczosOutput out = finish();
    out.finish_seconds = seconds_between(tf, Clock::now());
    out.total_seconds = seconds_between(t0, Clock::now());
    return out;
  }

 private:
  // Convergence checks cost an O(na^3) host eigensolve; check about 4 times per basis fill
  // in the main phase and after every call while probing (a probe's basis is small).
  int64_t check_every() const {
    if (probing_) return b_;
    return std::max<int64_t>(b_, (opts_.ncv / 4 / b_) * b_);
  }

  // Whether value a is more wanted than b.
  bool before(double a, double b) const {
    switch (opts_.which) {
      case Which::LA: return a > b;
      case Which::SA: return a < b;
      case Which::LM: return std::abs(a) > std::abs(b);
    }
    return false;
  }

  // Whether a is more wanted than b by more than the tolerance (so not a rounding effect of
  // the deflation, whose dropped couplings are bounded by the locked pairs' residuals).
  bool clearly_before(double a, double b) const {
    const double slack = 10.0 * opts_.tol * std::max(std::abs(b), theta1_);
    switch (opts_.which) {
      case Which::LA: return a > b + slack;
      case Which::SA: return a < b - slack;
      case Which::LM: return std::abs(a) > std::abs(b) + slack;
    }
    return false;
  }

  std::vector<double> sorted_locked() const {
    std::vector<double> v(lock_vals_);
    std::stable_sort(v.begin(), v.end(), [&](double a, double b) { return before(a, b); });
    return v;
  }

  // The active Ritz indices among the k most wanted of the locked and active Ritz values, in
  // wanted order (ties go to the locked values).
  std::vector<int64_t> wanted_active() const {
    const auto lk = sorted_locked();
    std::vector<int64_t> out;
    size_t il = 0, ia = 0;
    for (int64_t t = 0; t < opts_.k; ++t) {
      const bool have_a = ia < order_.size(), have_l = il < lk.size();
      if (have_a && (!have_l || before(theta_[order_[ia]], lk[il]))) {
        out.push_back(order_[ia++]);
      } else if (have_l) {
        ++il;
      } else {
        break;
      }
    }
    return out;
  }

  // Orthonormalises the rows of W (b x dim, already orthogonal to Q[0:r0]) into the pending
  // rows Q[r0:r0+made]; fills coupling_ (made x b, row-major) with W^T = Qn^T coupling.
  // Columns that are numerically dependent get a random replacement with a zero coupling
  // row, as long as the basis has room.
  void orthonormalise_block(at::Tensor& W, int64_t r0, double scale,
                            const std::vector<double>* norms = nullptr) {
    const int64_t room = rows_ - r0;
    const int64_t bw = W.size(0);
    const int64_t target = std::min(b_, room);
    coupling_.assign(static_cast<size_t>(std::max<int64_t>(target, 1) * bw), 0.0);
    const double thresh = 100.0 * eps_ * std::max(scale, std::numeric_limits<double>::min());
    int64_t made = 0;
    for (int64_t c = 0; c < bw; ++c) {
      at::Tensor w = W.narrow(0, c, 1);
      if (made > 0) {
        at::Tensor h = cgs2(w, Q_.narrow(0, r0, made));
        auto hh = to_host(h);
        for (int64_t r = 0; r < made; ++r) coupling_[r * bw + c] = hh[r];
      }
      // The norm is known for a column that no Gram-Schmidt changed since it was measured.
      const double rho = made == 0 && norms
                             ? (*norms)[static_cast<size_t>(c)]
                             : at::linalg_vector_norm(w, 2, {}, false, at::kDouble).item<double>();
      if (rho > thresh && made < target) {
        at::Tensor dst = Q_.narrow(0, r0 + made, 1);
        at::mul_out(dst, w, 1.0 / rho);
        coupling_[made * bw + c] = rho;
        ++made;
      }
    }
    // Random replacements (zero coupling) keep the block full while there is room.
    while (made < target) {
      Q_.narrow(0, r0 + made, 1).copy_(random_orthogonal(r0 + made));
      ++made;
    }
    pending_ = made;
    coupling_rows_ = made;
    coupling_cols_ = bw;
  }

  // A random unit row orthogonal to Q[0:r].
  at::Tensor random_orthogonal(int64_t r) {
    at::Tensor w = rng_.next(dim_, Q_.options());
    if (r > 0) cgs2(w, Q_.narrow(0, 0, r));
    const double rho = at::linalg_vector_norm(w, 2, {}, false, at::kDouble).item<double>();
    TORCH_CHECK(rho > 0.5 * std::sqrt(eps_), "hbk.lanczos: could not extend the basis");
    return w.mul_(1.0 / rho);
  }

  double& T(int64_t i, int64_t j) { return T_[static_cast<size_t>(i * rows_ + j)]; }

  // One operator call on the pending block, Gram-Schmidt against the whole basis, and the new
  // columns of T.
  void expand() {
    const int64_t r0 = nl_ + na_, bb = pending_;
    const double mv_before = matvec_seconds_;
    auto t0 = Clock::now();
    // The product goes into a buffer kept for the whole run (no allocation per call).
    at::Tensor W = apply_rows(op_, Q_, r0, bb, dim_, matvec_seconds_, Wbuf_.narrow(0, 0, bb));
    num_mv_ += bb;
    if (P_.defined()) P_.narrow(0, r0, bb).copy_(W);
    // Selective mode: first remove the local recurrence terms (this block and the previous
    // one, or every kept Ritz vector right after a restart) with a small GEMM, so that the
    // full pass sees only rounding-level components; the DGKS test then rarely asks for
    // the second full pass. Mode "twice": two full passes.
    std::vector<double> h(static_cast<size_t>((r0 + bb) * bb), 0.0);
    if (eta_ < 1.0) {
      const int64_t l0 = just_restarted_ ? nl_ : std::max(nl_, r0 - last_block_);
      at::Tensor L = Q_.narrow(0, l0, r0 + bb - l0);
      at::Tensor hl = at::mm(L, W.t());
      W.addmm_(hl.t(), L, 1.0, -1.0);
      auto hh = to_host(hl);
      std::copy(hh.begin(), hh.end(), h.begin() + l0 * bb);
    }
    std::vector<double> after;
    {
      auto hh = to_host(cgs2(W, Q_.narrow(0, 0, r0 + bb), eta_, &passes_, &after));
      for (size_t i = 0; i < hh.size(); ++i) h[i] += hh[i];
    }
    // |A q| of each column, by Pythagoras from all coefficients and the final norm (NaN or
    // inf in the product propagate to both): the finiteness check and the scale of the
    // dependence threshold, without another pass over W.
    {
      for (int64_t c = 0; c < bb; ++c) {
        double s2 = after[c] * after[c];
        for (int64_t i = 0; i < r0 + bb; ++i) s2 += h[i * bb + c] * h[i * bb + c];
        TORCH_CHECK_VALUE(std::isfinite(s2),
                          "hbk.lanczos: expected matvec to return finite values, got NaN or inf");
        anorm_ = std::max(anorm_, std::sqrt(s2));
      }
    }
    just_restarted_ = false;
    // Column block of T for the active rows; coefficients against locked rows are dropped
    // (they are bounded by the locked pairs' residuals, i.e. by the tolerance).
    for (int64_t c = 0; c < bb; ++c) {
      for (int64_t i = 0; i < na_ + bb; ++i) T(i, na_ + c) = h[(nl_ + i) * bb + c];
    }
    for (int64_t c = 0; c < bb; ++c) {
      for (int64_t i = 0; i < na_; ++i) T(na_ + c, i) = T(i, na_ + c);
      for (int64_t c2 = 0; c2 < c; ++c2) {
        const double s = 0.5 * (T(na_ + c, na_ + c2) + T(na_ + c2, na_ + c));
        T(na_ + c, na_ + c2) = T(na_ + c2, na_ + c) = s;
      }
    }
    na_ += bb;
    last_block_ = bb;
    pending_ = 0;
    have_solution_ = false;
    orthonormalise_block(W, nl_ + na_, anorm_, &after);
    // The coupling of the new pending block to the block just expanded (sub-diagonal of T).
    for (int64_t r = 0; r < coupling_rows_; ++r)
      for (int64_t c = 0; c < bb; ++c) {
        if (na_ + r < rows_) T(na_ + r, na_ - bb + c) = coupling_[r * bb + c];
      }
    orth_seconds_ += seconds_between(t0, Clock::now()) - (matvec_seconds_ - mv_before);
  }

  // Eigen-decomposition of the active T; Lanczos residual estimates of every Ritz pair.
  void solve_projected() {
    auto t0 = Clock::now();
    const int64_t m = na_;
    std::vector<double> a(static_cast<size_t>(m * m));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) a[i * m + j] = 0.5 * (T(i, j) + T(j, i));
    symmetric_eig(a, static_cast<int>(m), theta_, S_);
    est_.assign(static_cast<size_t>(m), 0.0);
    for (int64_t i = 0; i < m; ++i) {
      double s2 = 0;
      for (int64_t r = 0; r < coupling_rows_; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < last_block_; ++c)
          acc += coupling_[r * coupling_cols_ + c] * S_[(m - last_block_ + c) * m + i];
        s2 += acc * acc;
      }
      est_[i] = std::sqrt(s2);
    }
    order_ = wanted_order(theta_, opts_.which);
    // theta_1: the most wanted Ritz value among the locked and the active ones.
    std::vector<double> all(lock_vals_);
    if (m > 0) all.push_back(theta_[order_[0]]);
    theta1_ = all.empty() ? 0.0 : std::abs(all[wanted_order(all, opts_.which)[0]]);
    have_solution_ = true;
    solve_seconds_ += seconds_between(t0, Clock::now());
  }

  bool is_converged(int64_t i) const {
    return est_[i] <= opts_.tol * std::max(std::abs(theta_[i]), theta1_);
  }

  // Whether the k most wanted of the locked and active Ritz values are all converged.
  bool all_wanted_converged() const {
    if (nl_ + na_ < opts_.k) return false;
    for (int64_t i : wanted_active())
      if (!is_converged(i)) return false;
    return true;
  }

  // Ritz vectors (rows) for the active Ritz indices `sel`: S[:, sel]^T X for X = Q or P rows.
  at::Tensor ritz_rows(const at::Tensor& X, const std::vector<int64_t>& sel) {
    const int64_t m = na_, s = static_cast<int64_t>(sel.size());
    std::vector<double> st(static_cast<size_t>(s * m));
    for (int64_t j = 0; j < s; ++j)
      for (int64_t i = 0; i < m; ++i) st[j * m + i] = S_[i * m + sel[j]];
    return at::mm(host_matrix(st, s, m, X), X.narrow(0, nl_, m));
  }

  // Moves the Ritz vectors `sel` (lock first, then keep) to the rows after the locked ones;
  // the first `nlock` become locked.
  void compress(const std::vector<int64_t>& sel, int64_t nlock) {
    const int64_t ns = static_cast<int64_t>(sel.size()), m = na_;
    if (ns > 0) {
      std::vector<double> st(static_cast<size_t>(ns * m));
      for (int64_t j = 0; j < ns; ++j)
        for (int64_t i = 0; i < m; ++i) st[j * m + i] = S_[i * m + sel[j]];
      const at::Tensor S = host_matrix(st, ns, m, Q_);
      rotate_rows(Q_, S);
      if (P_.defined()) rotate_rows(P_, S);
    }
    for (int64_t j = 0; j < nlock; ++j) lock_vals_.push_back(theta_[sel[j]]);
  }

  // X[nl : nl + ns] = S X[nl : nl + na] for S (ns, na), in place, by column chunks through a
  // small buffer kept for the run: no basis-sized allocation (and its page faults) per
  // restart, and each chunk of the active rows is read from memory once.
  void rotate_rows(at::Tensor& X, const at::Tensor& S) {
    constexpr int64_t kChunk = 2048;
    const int64_t ns = S.size(0), m = S.size(1), cw_max = std::min(kChunk, dim_);
    if (!Rbuf_.defined()) Rbuf_ = at::empty({rows_ * cw_max}, X.options());
    for (int64_t c0 = 0; c0 < dim_; c0 += cw_max) {
      const int64_t cw = std::min(cw_max, dim_ - c0);
      at::Tensor dst = Rbuf_.narrow(0, 0, ns * cw).view({ns, cw});
      at::mm_out(dst, S, X.narrow(0, nl_, m).narrow(1, c0, cw));
      X.narrow(0, nl_, ns).narrow(1, c0, cw).copy_(dst);
    }
  }

  // Thick restart: lock the converged wanted pairs, keep about half of the basis of the most
  // wanted unconverged Ritz vectors, and continue from the pending block. Returns false when
  // the locked vectors leave no room to continue.
  bool restart() {
    auto t0 = Clock::now();
    std::vector<int64_t> lock, keep;
    const auto wanted = probing_ ? std::vector<int64_t>{} : wanted_active();
    for (int64_t i : wanted)
      if (is_converged(i)) lock.push_back(i);
    const int64_t nl_new = nl_ + static_cast<int64_t>(lock.size());
    const int64_t room = opts_.ncv - nl_new;  // active capacity after the restart
    const int64_t still =
        probing_ ? 1 : static_cast<int64_t>(wanted.size()) - static_cast<int64_t>(lock.size());
    int64_t nkeep = std::max(still, still + (room - still) / 2);
    nkeep = std::min(nkeep, room - b_);
    if (nkeep < 0 || (nkeep == 0 && still > 0 && room < 2 * b_)) return false;
    for (int64_t j = 0; j < na_ && static_cast<int64_t>(keep.size()) < nkeep; ++j) {
      const int64_t i = order_[j];
      if (std::find(lock.begin(), lock.end(), i) == lock.end()) keep.push_back(i);
    }
    std::vector<int64_t> sel(lock);
    sel.insert(sel.end(), keep.begin(), keep.end());
    const int64_t ns = static_cast<int64_t>(sel.size());
    at::Tensor pending = Q_.narrow(0, nl_ + na_, pending_).clone();
    compress(sel, static_cast<int64_t>(lock.size()));
    Q_.narrow(0, nl_ + ns, pending_).copy_(pending);
    // New active T: diag(theta_keep) with the arrow coupling to the pending block.
    const int64_t nk = static_cast<int64_t>(keep.size()), m = na_;
    std::vector<double> Tn(static_cast<size_t>(rows_ * rows_), 0.0);
    for (int64_t j = 0; j < nk; ++j) {
      Tn[j * rows_ + j] = theta_[keep[j]];
      for (int64_t r = 0; r < coupling_rows_; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < last_block_; ++c)
          acc += coupling_[r * coupling_cols_ + c] * S_[(m - last_block_ + c) * m + keep[j]];
        Tn[(nk + r) * rows_ + j] = Tn[j * rows_ + nk + r] = acc;
      }
    }
    T_.swap(Tn);
    nl_ = nl_new;
    na_ = nk;
    ++restarts_;
    have_solution_ = false;
    just_restarted_ = true;
    restart_seconds_ += seconds_between(t0, Clock::now());
    return true;
  }

  // All wanted pairs have converged: lock them and, unless verification is off or there is
  // no room, start a probe, a fresh Krylov space from random vectors orthogonal to the
  // locked ones. A single start vector reaches one direction of each eigenspace (in exact
  // arithmetic), so a repeated eigenvalue's further copies, or any wanted eigenvalue that
  // the first space missed, show up as Ritz values of the probe more wanted than the k-th
  // locked value. Returns false when the run is over.
  bool start_probe() {
    const auto wanted = wanted_active();
    const int64_t nl_new = nl_ + static_cast<int64_t>(wanted.size());
    if (!opts_.verify) {
      status_ = VerifyStatus::kOff;
      return false;
    }
    if (nl_new >= dim_ || pending_ == 0) {  // nothing outside the basis: the pairs are exact
      status_ = VerifyStatus::kComplete;
      return false;
    }
    // Locked pairs pushed out of the k most wanted by an earlier probe's finds are dropped
    // below (they rank after the threshold, so finding them again is no detection).
    const int64_t nl_probe = std::min(nl_new, opts_.k);
    if (opts_.ncv != dim_ && opts_.ncv - nl_probe < 2 * b_ + 2) {
      status_ = VerifyStatus::kNoRoom;
      return false;
    }
    // Length of a probe. A random start has a component of about 1/sqrt(dim) along a missed
    // eigenvector; the main phase amplified such a component to convergence (angle, i.e.
    // relative residual, ~ tol) in first_pair_ products. A missed pair competes with fewer
    // wanted pairs in the probe and only has to rise above the threshold (angle O(1)): the
    // Chebyshev amplification needed is the log(sqrt(dim)) part of the log(sqrt(dim) / tol)
    // that the main phase paid, given here twice over.
    const double L = 0.5 * std::log(static_cast<double>(dim_));
    const double ratio = std::min(1.0, 2.0 * L / (L + std::log(1.0 / opts_.tol)));
    const int64_t s1 = first_pair_ > 0 ? first_pair_ : first_converged_;
    probe_budget_ = std::max<int64_t>(PROBE_MIN * b_,
                                      static_cast<int64_t>(std::ceil(ratio * s1 / b_)) * b_);
    if (num_mv_ + probe_budget_ > opts_.max_matvecs || num_probes_ > opts_.k) {
      status_ = VerifyStatus::kNoBudget;
      return false;
    }
    auto t0 = Clock::now();
    compress(wanted, static_cast<int64_t>(wanted.size()));
    nl_ = nl_new;
    if (nl_ > opts_.k) {
      std::vector<int64_t> idx(static_cast<size_t>(nl_));
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(),
                       [&](int64_t a, int64_t b) { return before(lock_vals_[a], lock_vals_[b]); });
      idx.resize(static_cast<size_t>(opts_.k));
      std::sort(idx.begin(), idx.end());
      at::Tensor ii = at::from_blob(idx.data(), {opts_.k}, at::TensorOptions().dtype(at::kLong))
                          .clone()
                          .to(Q_.device());
      Q_.narrow(0, 0, opts_.k).copy_(Q_.index_select(0, ii));
      if (P_.defined()) P_.narrow(0, 0, opts_.k).copy_(P_.index_select(0, ii));
      std::vector<double> vals;
      for (int64_t i : idx) vals.push_back(lock_vals_[i]);
      lock_vals_.swap(vals);
      nl_ = opts_.k;
    }
    na_ = 0;
    std::fill(T_.begin(), T_.end(), 0.0);
    at::Tensor W = at::empty({b_, dim_}, Q_.options());
    for (int64_t c = 0; c < b_; ++c) W.narrow(0, c, 1).copy_(random_orthogonal(nl_));
    orthonormalise_block(W, nl_, 1.0);
    last_block_ = 0;
    threshold_ = sorted_locked()[static_cast<size_t>(opts_.k - 1)];
    probing_ = true;
    probe_start_ = num_mv_;
    ++num_probes_;
    order_.clear();
    have_solution_ = false;
    just_restarted_ = true;
    restart_seconds_ += seconds_between(t0, Clock::now());
    return true;
  }

  LanczosOutput finish() {
    // Candidates: the locked pairs, then (unless a probe was cut short) the most wanted
    // active Ritz pairs; the answer is the k most wanted of them.
    struct Cand {
      double val;
      int64_t row;   // locked row, or -1
      int64_t ritz;  // active Ritz index, or -1
      char ok;
    };
    std::vector<Cand> cands;
    for (int64_t j = 0; j < nl_; ++j) cands.push_back({lock_vals_[j], j, -1, 1});
    if (!probing_ && have_solution_) {
      for (int64_t t = 0; t < std::min<int64_t>(opts_.k, na_); ++t) {
        const int64_t i = order_[t];
        cands.push_back({theta_[i], -1, i, static_cast<char>(is_converged(i) ? 1 : 0)});
      }
    }
    std::stable_sort(cands.begin(), cands.end(),
                     [&](const Cand& a, const Cand& b) { return before(a.val, b.val); });
    if (static_cast<int64_t>(cands.size()) > opts_.k) cands.resize(static_cast<size_t>(opts_.k));
    std::vector<int64_t> lrows, asel;
    std::vector<double> vals;
    std::vector<char> est_ok;
    for (const auto& c : cands)
      if (c.row >= 0) lrows.push_back(c.row);
    for (const auto& c : cands)
      if (c.ritz >= 0) asel.push_back(c.ritz);
    for (const auto& c : cands)
      if (c.row >= 0) vals.push_back(c.val), est_ok.push_back(c.ok);
    for (const auto& c : cands)
      if (c.ritz >= 0) vals.push_back(c.val), est_ok.push_back(c.ok);
    const int64_t kk = static_cast<int64_t>(vals.size());
    auto index = [&](const std::vector<int64_t>& v) {
      return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())},
                           at::TensorOptions().dtype(at::kLong))
          .clone()
          .to(Q_.device());
    };
    at::Tensor li = index(lrows);
    at::Tensor Y = Q_.index_select(0, li);
    at::Tensor AY = P_.defined() ? P_.index_select(0, li) : at::Tensor();
    if (!asel.empty()) {
      Y = at::cat({Y, ritz_rows(Q_, asel)}, 0);
      if (P_.defined()) AY = at::cat({AY, ritz_rows(P_, asel)}, 0);
    }
    if (!P_.defined()) {  // residuals need A Y: extra operator calls, counted
      AY = at::empty({kk, dim_}, Y.options());
      at::Tensor Yc = Y.contiguous();
      for (int64_t r0 = 0; r0 < kk; r0 += b_) {
        const int64_t bb = std::min(b_, kk - r0);
        AY.narrow(0, r0, bb).copy_(apply_rows(op_, Yc, r0, bb, dim_, matvec_seconds_));
        num_mv_ += bb;
      }
    }
    // Final order: wanted order of the values.
    auto ord = wanted_order(vals, opts_.which);
    std::vector<int64_t> perm(ord.begin(), ord.end());
    at::Tensor idx = index(perm);
    Y = Y.index_select(0, idx);
    AY = AY.index_select(0, idx);
    std::vector<double> sv(static_cast<size_t>(kk));
    for (int64_t j = 0; j < kk; ++j) sv[j] = vals[perm[j]];
    at::Tensor theta_dev = host_matrix(sv, kk, 1, Y);
    at::Tensor R = AY - theta_dev * Y;
    at::Tensor res = at::linalg_vector_norm(R, 2, {1}, false, at::kDouble).cpu();
    LanczosOutput out;
    out.eigenvalues = at::from_blob(sv.data(), {kk}, at::TensorOptions().dtype(at::kDouble)).clone();
    out.eigenvectors = Y.t();
    out.residuals = res;
    out.converged = at::zeros({kk}, at::TensorOptions().dtype(at::kBool));
    const double ref = kk > 0 ? std::abs(sv[0]) : 0.0;
    const double* rp = res.data_ptr<double>();
    bool* cp = out.converged.data_ptr<bool>();
    for (int64_t j = 0; j < kk; ++j)
      cp[j] = est_ok[perm[j]] && rp[j] <= opts_.tol * std::max(std::abs(sv[j]), ref);
    out.num_matvecs = num_mv_;
    out.num_restarts = restarts_;
    out.reorth_passes = passes_;
    out.matvec_seconds = matvec_seconds_;
    out.verify_status = status_;
    out.num_probes = num_probes_;
    out.probe_found = probe_found_;
    out.main_matvecs = first_converged_ >= 0 ? first_converged_ : num_mv_;
    out.orth_seconds = orth_seconds_;
    out.solve_seconds = solve_seconds_;
    out.restart_seconds = restart_seconds_;
    return out;
  }

  const BlockMatvec& op_;
  LanczosOptions opts_;
  const LanczosMonitor& monitor_;
  RandomVectors rng_;
  int64_t dim_ = 0, b_ = 1, rows_ = 0;
  at::Tensor Q_, P_, Wbuf_, Rbuf_;
  double eps_ = 0, anorm_ = 0, eta_ = 2.0;
  int64_t passes_ = 0;
  std::vector<double> T_;                    // rows_ x rows_, active block at the top left
  std::vector<double> coupling_;             // coupling_rows_ x coupling_cols_
  int64_t coupling_rows_ = 0, coupling_cols_ = 0, last_block_ = 0;
  int64_t nl_ = 0, na_ = 0, pending_ = 0;
  std::vector<double> lock_vals_;
  std::vector<double> theta_, S_, est_;
  std::vector<int64_t> order_;
  double theta1_ = 0;
  bool have_solution_ = false, just_restarted_ = false;
  int64_t num_mv_ = 0, restarts_ = 0;
  double matvec_seconds_ = 0, orth_seconds_ = 0, solve_seconds_ = 0, restart_seconds_ = 0;
  // Verification of the converged set (see start_probe).
  bool probing_ = false;
  double threshold_ = 0;  // the k-th most wanted locked value while probing
  int64_t probe_start_ = 0, probe_budget_ = 0, num_probes_ = 0, probe_found_ = 0;
  int64_t first_converged_ = -1;  // products when all k first converged
  int64_t first_pair_ = -1;       // products when the most wanted pair first converged
  VerifyStatus status_ = VerifyStatus::kNotConverged;
};

}  // namespace

LanczosOutput thick_restart_lanczos(const BlockMatvec& op, const at::Tensor& start,
                                    const LanczosOptions& opts, const LanczosMonitor& monitor) {
  ThickRestartLanczos driver(op, start, opts, monitor);
  return driver.run();
}

std::pair<at::Tensor, at::Tensor> lanczos_tridiagonal(const BlockMatvec& op,
                                                      const at::Tensor& start, int64_t steps,
                                                      const LanczosMonitor& monitor) {
  TORCH_CHECK_TYPE(start.scalar_type() == at::kFloat || start.scalar_type() == at::kDouble,
                   "hbk.spectral_density: expected float32 or float64 probes, got ",
                   start.scalar_type());
  TORCH_CHECK_VALUE(start.dim() == 2, "hbk.spectral_density: expected (dim, b) probes, got ",
                    start.sizes());
  const int64_t dim = start.size(0), b = start.size(1);
  TORCH_CHECK_VALUE(steps >= 1 && steps <= dim,
                    "hbk.spectral_density: expected 1 <= lanczos_steps <= dim = ", dim, ", got ",
                    steps);
  auto opts = start.options();
  const double eps = machine_eps(start.scalar_type());
  at::Tensor Qb = at::zeros({b, steps, dim}, opts);  // column j's basis in Qb[j]
  at::Tensor q = start.detach().t().contiguous();    // (b, dim)
  at::Tensor n0 = at::linalg_vector_norm(q, 2, {1}, true);
  TORCH_CHECK_VALUE(n0.min().item<double>() > 0, "hbk.spectral_density: expected nonzero probes");
  Qb.select(1, 0).copy_(q / n0);
  std::vector<double> alpha(static_cast<size_t>(b * steps), 0.0);
  std::vector<double> beta(static_cast<size_t>(b * std::max<int64_t>(steps - 1, 0)), 0.0);
  RandomVectors rng(0x5eed);
  double mv_seconds = 0, anorm = 0;
  for (int64_t j = 0; j < steps; ++j) {
    at::Tensor X = Qb.select(1, j).contiguous();  // (b, dim)
    at::Tensor W = apply_rows(op, X, 0, b, dim, mv_seconds);
    anorm = std::max(anorm,
                     at::linalg_vector_norm(W, 2, {1}, false, at::kDouble).max().item<double>());
    auto a = to_host((X * W).sum(1, false, at::kDouble));
    for (int64_t c = 0; c < b; ++c) alpha[c * steps + j] = a[c];
    if (monitor) monitor(LanczosProgress{(j + 1) * b, 0, 0});
    if (j + 1 == steps) break;
    // Full reorthogonalisation of each column against its own basis (batched GEMVs).
    at::Tensor B = Qb.narrow(1, 0, j + 1);  // (b, j+1, dim)
    at::Tensor w = W.unsqueeze(2);          // (b, dim, 1)
    for (int pass = 0; pass < 2; ++pass) {
      at::Tensor h = at::bmm(B, w);  // (b, j+1, 1)
      w.sub_(at::bmm(B.transpose(1, 2), h));
    }
    auto nrm = to_host(at::linalg_vector_norm(W, 2, {1}, false, at::kDouble));
    for (int64_t c = 0; c < b; ++c) {
      at::Tensor wc = W.select(0, c);
      if (nrm[c] > 100.0 * eps * anorm) {
        beta[c * (steps - 1) + j] = nrm[c];
        Qb.select(0, c).select(0, j + 1).copy_(wc / nrm[c]);
      } else {
        // Invariant subspace: continue with a random orthogonal vector and beta = 0, which
        // decouples the rest of the tridiagonal matrix (zero quadrature weight).
        at::Tensor r = rng.next(dim, opts).view({dim, 1});
        at::Tensor Bc = Qb.select(0, c).narrow(0, 0, j + 1);
        for (int pass = 0; pass < 2; ++pass) r.sub_(at::mm(Bc.t(), at::mm(Bc, r)));
        const double rn = at::linalg_vector_norm(r, 2, {}, false, at::kDouble).item<double>();
        Qb.select(0, c).select(0, j + 1).copy_(r.view({dim}) / rn);
      }
    }
  }
  auto A = at::from_blob(alpha.data(), {b, steps}, at::TensorOptions().dtype(at::kDouble)).clone();
  auto Bt = at::from_blob(beta.data(), {b, std::max<int64_t>(steps - 1, 0)},
                          at::TensorOptions().dtype(at::kDouble))
                .clone();
  return {A, Bt};
}

}  // namespace hbk
