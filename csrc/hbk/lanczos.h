// Thick-restart Lanczos (Wu & Simon 2000) on ATen vectors, and plain Lanczos recurrences for
// stochastic Lanczos quadrature. The operator is any callable on (dim, b) blocks; the basis
// lives on the operator's device and only the small projected problem goes to the host
// (Eigen, float64, see dense.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace hbk {

/// The linear operator: takes a (dim, b) block X ((dim,) when b == 1), a read-only view of the
/// basis that the callee must neither modify nor keep, and returns A X with the same shape
/// (a (dim, 1) result is accepted for b == 1); the result is copied into the basis dtype and
/// device. Exceptions thrown here propagate unchanged out of the driver.
using BlockMatvec = std::function<at::Tensor(const at::Tensor&)>;

/// Progress report, given to the monitor after every operator call.
struct LanczosProgress {
  int64_t num_matvecs = 0;  // vectors multiplied so far
  int64_t num_converged = 0;  // locked (converged) wanted pairs
  int64_t num_restarts = 0;
};
/// Called after every operator call (progress bar, Ctrl-C check); may throw to stop the run.
using LanczosMonitor = std::function<void(const LanczosProgress&)>;

/// Which end of the spectrum is wanted.
enum class Which { LA, SA, LM };
Which parse_which(const std::string& which);  // "LA" | "SA" | "LM", ValueError otherwise

/// What became of the check for missed eigenvalues after convergence (LanczosOptions::verify).
enum class VerifyStatus : int {
  kNotConverged = 0,  // the wanted pairs did not all converge: nothing to check
  kChecked = 1,       // a probe found no further pair more wanted than the k-th
  kComplete = 2,      // the basis spans the whole space: the pairs are exact
  kOff = 3,           // verify == false
  kNoRoom = 4,        // ncv leaves no room next to the locked vectors for a probe
  kNoBudget = 5,      // max_matvecs was reached before the check was over
};

struct LanczosOptions {
  int64_t k = 1;             // wanted pairs, 1 <= k <= dim
  Which which = Which::LA;
  double tol = 1e-6;         // |beta_m s_mi| <= tol * max(|theta_i|, |theta_1|)
  int64_t ncv = 0;           // active basis size (excluding locked vectors' room); k < ncv <= dim
  int64_t max_matvecs = 0;   // budget of single-vector products
  int64_t block_size = 1;    // vectors per operator call
  bool store_products = true;  // keep A V (2x basis memory) for exact residuals, no extra calls
  uint64_t seed = 0;         // random vectors used when the Krylov space is exhausted
  // Gram-Schmidt against the basis: two full passes always (true), or (false) the local
  // recurrence terms first (a GEMM with the current and previous block, or with all kept
  // Ritz vectors after a restart), then one full pass, and a second one only when the full
  // pass cancels, |w'| < |w| / sqrt(2) (DGKS criterion).
  bool reorth_twice = false;
  // After all wanted pairs converged, lock them and probe the deflated operator from a fresh
  // random block (orthogonal to the locked vectors) for pairs more wanted than the k-th:
  // further copies of repeated eigenvalues, which one start vector cannot reach in exact
  // arithmetic, or any pair the first Krylov space missed. Found pairs are converged and
  // locked, and the probe repeats (at most k + 1 probes). A probe with no find ends after
  // max(10, r s1) products (the whole deflated space, if smaller), s1 being the products the
  // main phase needed for its first converged pair and r = min(1, 2 L / (L + log(1/tol))),
  // L = log(sqrt(dim)): the amplification of a random component (~1/sqrt(dim)) that a
  // missed pair needs to rise above the k-th value, relative to what convergence took. It
  // is not started (status kNoRoom / kNoBudget) when ncv - k < 2 b + 2 (ncv < dim) or
  // max_matvecs does not cover it.
  bool verify = true;
};

struct LanczosOutput {
  at::Tensor eigenvalues;    // (k,) float64 host, in wanted order (LA/LM descending, SA ascending)
  at::Tensor eigenvectors;   // (dim, k) basis dtype/device, orthonormal columns
  at::Tensor residuals;      // (k,) float64 host: |A y - theta y|, recomputed from A y
  at::Tensor converged;      // (k,) bool host
  int64_t num_matvecs = 0;   // single-vector products, including any residual recomputation
  int64_t num_restarts = 0;
  int64_t reorth_passes = 0;  // Gram-Schmidt passes against the basis (one or two per call)
  double matvec_seconds = 0;  // time inside the operator
  double total_seconds = 0;
  VerifyStatus verify_status = VerifyStatus::kNotConverged;
  int64_t num_probes = 0;     // probes started (see LanczosOptions::verify)
  int64_t probe_found = 0;    // probes that found a missed pair
  int64_t main_matvecs = 0;   // products until the wanted pairs first converged (all if never)
  // Profile of the time outside the operator (seconds): Gram-Schmidt and copies of each
  // call, projected eigensolves, restarts and probe starts, and the final Ritz vectors and
  // residuals.
  double orth_seconds = 0, solve_seconds = 0, restart_seconds = 0, finish_seconds = 0;
};

/// Thick-restart block Lanczos with locking and full reorthogonalisation.
///
/// Math: builds an orthonormal basis V of a (block) Krylov space of A, the Rayleigh quotient
///   T = V^T A V from the Gram-Schmidt coefficients, and Ritz pairs (theta, V s). A pair is
///   converged when the Lanczos residual |B_m s_m,i| (|beta_m s_mi| for b = 1) is at most
///   tol * max(|theta_i|, |theta_1|), theta_1 being the most wanted Ritz value. Converged
///   pairs are locked (kept in V, dropped from T); when the basis is full it restarts from
///   the wanted Ritz vectors (thick restart), keeping about half of the basis.
///   After all k pairs converged (opts.verify), a probe: the converged pairs are locked and a
///   fresh random block orthogonal to them starts a new Krylov space; a Ritz value there
///   more wanted than the k-th value (beyond 10 tol) is a missed pair (e.g. a further copy
///   of a repeated eigenvalue, which one start vector cannot reach in exact arithmetic): it
///   is converged and locked, the answer becomes the k most wanted locked pairs, and the
///   probe repeats. See LanczosOptions::verify for the probe's length.
///   Full reorthogonalisation: every new block is orthogonalised against the whole basis
///   (locked vectors included) by classical Gram-Schmidt as GEMMs, twice (reorth_twice) or
///   after the local recurrence terms with a second pass only when needed (reorth_twice).
/// Args:
///   op: the operator (see BlockMatvec).
///   start: (dim, b) or (dim,) start block, float32/float64, any device; fixes the basis
///     dtype and device. Need not be normalised; must not be zero.
///   opts: see LanczosOptions.
///   monitor: optional, see LanczosMonitor.
/// Returns: LanczosOutput; pairs not converged within max_matvecs have converged == false.
/// Complexity per operator call of b vectors: the call, plus 2 or 4 (b x m x dim) GEMMs for one
///   or two Gram-Schmidt passes against the m basis vectors; per restart one (m x m x dim) GEMM
///   and an O(m^3) host eigensolve.
/// Memory: (ncv + b) x dim basis, twice that with store_products.
LanczosOutput thick_restart_lanczos(const BlockMatvec& op, const at::Tensor& start,
                                    const LanczosOptions& opts,
                                    const LanczosMonitor& monitor = nullptr);

/// Independent plain Lanczos recurrences, one per column of `start`, all advanced with one
/// operator call per step (stochastic Lanczos quadrature).
///
/// Args:
///   op: the operator, called on (dim, b) blocks.
///   start: (dim, b) start vectors (normalised here), float32/float64.
///   steps: Lanczos steps m per recurrence (each column stops early, with beta = 0, when its
///     Krylov space is exhausted).
/// Returns: (alpha, beta) as float64 host tensors of shape (b, m) and (b, m - 1); the
///   tridiagonal matrix of column j has diagonal alpha[j] and off-diagonal beta[j].
/// Complexity: m operator calls plus 4 m^2 b dim flops of full reorthogonalisation (each
///   column against its own basis). Memory: b x m x dim.
std::pair<at::Tensor, at::Tensor> lanczos_tridiagonal(const BlockMatvec& op,
                                                      const at::Tensor& start, int64_t steps,
                                                      const LanczosMonitor& monitor = nullptr);

}  // namespace hbk
