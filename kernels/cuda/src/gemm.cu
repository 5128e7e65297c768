#include "shoal/kernels/cuda/gemm.hpp"

#include "check.cuh"
#include "device_common.cuh"
#include "shoal/kernels/cuda/context.hpp"

#include <memory>
#include <string>

namespace shoal::kernels::cuda {

namespace {
struct desc_deleter {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using desc_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, desc_deleter>;
using layout_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, desc_deleter>;
using pref_ptr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, desc_deleter>;

layout_ptr make_layout(cudaDataType_t type, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  SHOAL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<std::uint64_t>(rows),
                                                static_cast<std::uint64_t>(cols), ld));
  return layout_ptr(layout);
}
}  // namespace

void gemm(context& ctx, const gemm_params& p) {
  if (p.m <= 0 || p.n <= 0) return;
  SHOAL_CUDA_REQUIRE(p.x && p.w && p.y && p.k > 0,
                     "gemm needs x, w, y and k > 0, got k " + std::to_string(p.k));
  const std::int64_t x_stride = p.x_stride ? p.x_stride : p.k;
  const std::int64_t y_stride = p.y_stride ? p.y_stride : p.n;
  const cudaDataType_t y_type = p.output == gemm_output::f32 ? CUDA_R_32F : CUDA_R_16BF;
  // cuBLAS is column-major: row-major y[m][n] = x W^T is column-major y^T (n x m) = W x^T, with
  // W (row-major [n][k]) read as the transpose of a column-major k x n matrix.
  cublasLtMatmulDesc_t raw_desc = nullptr;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const desc_ptr desc(raw_desc);
  const cublasOperation_t trans = CUBLAS_OP_T, no_trans = CUBLAS_OP_N;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &trans,
                                                    sizeof(trans)));
  SHOAL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                                    &no_trans, sizeof(no_trans)));
  const layout_ptr a = make_layout(CUDA_R_16BF, p.k, p.n, p.k);
  const layout_ptr b = make_layout(CUDA_R_16BF, p.k, p.m, x_stride);
  const layout_ptr c = make_layout(y_type, p.n, p.m, y_stride);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const pref_ptr pref(raw_pref);
  const std::size_t workspace = ctx.lt_workspace_bytes();
  SHOAL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
  const auto lt = static_cast<cublasLtHandle_t>(ctx.cublas_lt());
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  SHOAL_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc.get(), a.get(), b.get(), c.get(),
                                                    c.get(), pref.get(), 1, &heuristic, &found));
  SHOAL_CUDA_REQUIRE(found > 0, "cuBLASLt has no algorithm for a bf16 GEMM of m " +
                                    std::to_string(p.m) + " n " + std::to_string(p.n) + " k " +
                                    std::to_string(p.k));
  // TODO(perf): cache descriptors and the chosen algorithm per shape; building them costs a
  // few microseconds per call, visible at decode batch 1.
  SHOAL_CUBLAS_CHECK(cublasLtMatmul(lt, desc.get(), &p.alpha, p.w, a.get(), p.x, b.get(), &p.beta,
                                    p.y, c.get(), p.y, c.get(), &heuristic.algo,
                                    ctx.lt_workspace(), workspace,
                                    detail::as_stream(ctx.stream())));
}

}  // namespace shoal::kernels::cuda
