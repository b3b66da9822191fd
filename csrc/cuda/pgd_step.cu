// pgd_step CUDA kernel: grid-stride loop over packs of 16 bytes (float4 / 8 halves) when the
// three inputs and the output are 16-byte aligned, scalar otherwise; fp32 math; current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../pgd_step.h"
#include "common.cuh"

namespace vars_fast {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float step1(float x, float x0, float g, float a, float e) {
  const float s = (g > 0.f) ? 1.f : ((g < 0.f) ? -1.f : 0.f);
  float y = x + a * s;
  y = fminf(fmaxf(y, x0 - e), x0 + e);
  return fminf(fmaxf(y, 0.f), 1.f);
}

// out may alias xa (in-place): every element is read before it is written by the same thread.
template <typename T, int N>
__global__ void pgd_step_kernel(T* out, const T* xa, const T* x0, const T* g, const float* ap, const float* ep,
                                float alpha, float eps, int64_t n, int64_t per) {
  const int64_t packs = n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t i = p * N;
    const auto vx = *reinterpret_cast<const Pack<T, N>*>(xa + i);
    const auto vo = *reinterpret_cast<const Pack<T, N>*>(x0 + i);
    const auto vg = *reinterpret_cast<const Pack<T, N>*>(g + i);
    Pack<T, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // Per-sample lookups only when needed; a pack may straddle two samples.
      const int64_t b = (ap || ep) ? (i + k) / per : 0;
      const float a = ap ? ap[b] : alpha, e = ep ? ep[b] : eps;
      r.v[k] = static_cast<T>(step1(static_cast<float>(vx.v[k]), static_cast<float>(vo.v[k]), static_cast<float>(vg.v[k]), a, e));
    }
    *reinterpret_cast<Pack<T, N>*>(out + i) = r;
  }
  // Tail (fewer than N elements), handled by the first threads.
  const int64_t t = packs * N + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < n) {
    const int64_t b = (ap || ep) ? t / per : 0;
    out[t] = static_cast<T>(step1(static_cast<float>(xa[t]), static_cast<float>(x0[t]), static_cast<float>(g[t]),
                                  ap ? ap[b] : alpha, ep ? ep[b] : eps));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void launch(at::Tensor& out, const at::Tensor& xa, const at::Tensor& x0, const at::Tensor& g,
            const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t, double alpha, double eps) {
  const int64_t n = xa.numel();
  if (n == 0) return;
  const int64_t per = n / xa.size(0);
  const at::cuda::OptionalCUDAGuard guard(xa.device());
  auto a_c = alpha_t.has_value() ? alpha_t->contiguous() : at::Tensor();
  auto e_c = eps_t.has_value() ? eps_t->contiguous() : at::Tensor();
  const float* ap = a_c.defined() ? a_c.const_data_ptr<float>() : nullptr;
  const float* ep = e_c.defined() ? e_c.const_data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xa.scalar_type(), "vars_fast_pgd_step_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* pa = xa.const_data_ptr<scalar_t>();
    const scalar_t* p0 = x0.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const bool vec = aligned16(o) && aligned16(pa) && aligned16(p0) && aligned16(pg);
    const int64_t work = vec ? n / N : n;
    const int blocks = grid_stride_blocks(work, threads, 8);
    if (vec) {
      pgd_step_kernel<scalar_t, N><<<blocks, threads, 0, stream>>>(o, pa, p0, pg, ap, ep, alpha, eps, n, per);
    } else {
      pgd_step_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(o, pa, p0, pg, ap, ep, alpha, eps, n, per);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CUDA, m) {
  m.impl("pgd_step", &pgd_step_out_of_place<launch>);
  m.impl("pgd_step_", &pgd_step_in_place<launch>);
}

}  // namespace vars_fast
