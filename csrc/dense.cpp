// The only translation unit that includes Eigen.
#include "hbk/dense.h"

#include <Eigen/Dense>

#include <stdexcept>

namespace hbk {

void symmetric_eig(const std::vector<double>& a, int m, std::vector<double>& eigenvalues,
                   std::vector<double>& eigenvectors) {
  using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const RowMat> A(a.data(), m, m);
  Eigen::SelfAdjointEigenSolver<RowMat> solver(A);
  if (solver.info() != Eigen::Success) throw std::runtime_error("hbk::symmetric_eig: Eigen did not converge");
  eigenvalues.assign(solver.eigenvalues().data(), solver.eigenvalues().data() + m);
  eigenvectors.resize(static_cast<size_t>(m) * m);
  Eigen::Map<RowMat>(eigenvectors.data(), m, m) = solver.eigenvectors();
}

}  // namespace hbk
