// Launch helpers shared by the CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace vars_fast {

// SMs of the current device, for grid sizing. (Not at::cuda::getCurrentDeviceProperties: its
// header pulls cuBLAS/cuSPARSE headers that a minimal CUDA toolkit does not ship.)
inline int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Blocks for a grid-stride loop over `work` items: one item per thread while that needs fewer
// than `blocks_per_sm` blocks on every SM, otherwise that many (each thread then loops).
inline int grid_stride_blocks(int64_t work, int threads, int blocks_per_sm) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, cap)));
}

}  // namespace vars_fast
