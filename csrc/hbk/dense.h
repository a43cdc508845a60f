// Small dense symmetric eigenproblems on the host (Eigen, float64).
#pragma once

#include <vector>

namespace hbk {

/// Eigen-decomposition of a small symmetric matrix.
///
/// Args:
///   a: m x m row-major symmetric matrix (only the lower triangle is read), float64.
///   m: its order.
/// Outputs:
///   eigenvalues: m values, ascending.
///   eigenvectors: m x m row-major, column j belongs to eigenvalues[j].
/// Complexity: O(m^3). Memory: O(m^2).
void symmetric_eig(const std::vector<double>& a, int m, std::vector<double>& eigenvalues,
                   std::vector<double>& eigenvectors);

}  // namespace hbk
