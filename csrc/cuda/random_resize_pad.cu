// random_resize_pad CUDA kernels. Forward: one thread per output pixel (grid-stride), direct
// bilinear / nearest gather with F.interpolate's index rules in opmath precision. Backward:
// one thread per output pixel scattering with atomicAdd into an opmath buffer (fp32, or fp64
// for fp64), cast to the input dtype afterwards. All on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "common.cuh"

namespace vars_fast {
namespace {

template <typename acc_t>
struct Src {
  int64_t i0, i1;
  acc_t l1;
};

// ATen area_pixel_compute_source_index (align_corners=False) + guard_index_and_lambda.
template <typename acc_t>
__device__ __forceinline__ Src<acc_t> src_linear(int64_t dst, int64_t in, int64_t s) {
  const acc_t scale = static_cast<acc_t>(in) / s;
  acc_t src = scale * (dst + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  src = src < 0 ? acc_t(0) : src;
  const int64_t k = min(static_cast<int64_t>(floor(src)), in - 1);
  acc_t lam = src - static_cast<acc_t>(k);
  lam = lam < 0 ? acc_t(0) : (lam > 1 ? acc_t(1) : lam);
  return {k, k + (k < in - 1 ? 1 : 0), lam};
}

__device__ __forceinline__ int64_t src_nearest(int64_t dst, int64_t in, int64_t s) {
  const float scale = static_cast<float>(in) / s;
  return min(static_cast<int64_t>(floorf(dst * scale)), in - 1);
}

// Output pixel idx -> plane, (r, j) inside the resized window, or false when in the padding.
__device__ __forceinline__ bool window(int64_t idx, int64_t C, int64_t O, const int64_t* sizes,
                                       const int64_t* offsets, int64_t& plane, int64_t& s, int64_t& r, int64_t& j) {
  plane = idx / (O * O);
  const int64_t pix = idx % (O * O), b = plane / C;
  s = sizes[b];
  r = pix / O - offsets[2 * b];
  j = pix % O - offsets[2 * b + 1];
  return r >= 0 && r < s && j >= 0 && j < s;
}

template <typename T, bool BILINEAR>
__global__ void fwd_kernel(const T* __restrict__ x, T* __restrict__ out, const int64_t* __restrict__ sizes,
                           const int64_t* __restrict__ offsets, int64_t total, int64_t C, int64_t H, int64_t W, int64_t O) {
  using acc_t = at::opmath_type<T>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t plane, s, r, j;
    acc_t v = 0;
    if (window(idx, C, O, sizes, offsets, plane, s, r, j)) {
      const T* src = x + plane * H * W;
      if constexpr (BILINEAR) {
        const auto y = src_linear<acc_t>(r, H, s), xx = src_linear<acc_t>(j, W, s);
        const acc_t lx0 = acc_t(1) - xx.l1, ly0 = acc_t(1) - y.l1;
        const acc_t t = lx0 * static_cast<acc_t>(src[y.i0 * W + xx.i0]) + xx.l1 * static_cast<acc_t>(src[y.i0 * W + xx.i1]);
        const acc_t b = lx0 * static_cast<acc_t>(src[y.i1 * W + xx.i0]) + xx.l1 * static_cast<acc_t>(src[y.i1 * W + xx.i1]);
        v = ly0 * t + y.l1 * b;
      } else {
        v = static_cast<acc_t>(src[src_nearest(r, H, s) * W + src_nearest(j, W, s)]);
      }
    }
    out[idx] = static_cast<T>(v);
  }
}

template <typename T, bool BILINEAR>
__global__ void bwd_kernel(const T* __restrict__ g, at::opmath_type<T>* __restrict__ acc, const int64_t* __restrict__ sizes,
                           const int64_t* __restrict__ offsets, int64_t total, int64_t C, int64_t H, int64_t W, int64_t O) {
  using acc_t = at::opmath_type<T>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t plane, s, r, j;
    if (!window(idx, C, O, sizes, offsets, plane, s, r, j)) continue;
    const acc_t gv = static_cast<acc_t>(g[idx]);
    acc_t* dst = acc + plane * H * W;
    if constexpr (BILINEAR) {
      const auto y = src_linear<acc_t>(r, H, s), xx = src_linear<acc_t>(j, W, s);
      const acc_t lx0 = acc_t(1) - xx.l1, ly0 = acc_t(1) - y.l1;
      atomicAdd(dst + y.i0 * W + xx.i0, gv * ly0 * lx0);
      atomicAdd(dst + y.i0 * W + xx.i1, gv * ly0 * xx.l1);
      atomicAdd(dst + y.i1 * W + xx.i0, gv * y.l1 * lx0);
      atomicAdd(dst + y.i1 * W + xx.i1, gv * y.l1 * xx.l1);
    } else {
      atomicAdd(dst + src_nearest(r, H, s) * W + src_nearest(j, W, s), gv);
    }
  }
}

at::Tensor rrp_cuda(const at::Tensor& x_in, const at::Tensor& sizes_in, const at::Tensor& offsets_in, int64_t O,
                    c10::string_view mode) {
  TORCH_CHECK(x_in.dim() == 4, "vars_fast::random_resize_pad: x must be [B, C, H, W], got ", x_in.sizes());
  const bool bilinear = parse_resize_mode(mode) == ResizeMode::Bilinear;
  const at::cuda::OptionalCUDAGuard guard(x_in.device());
  auto x = x_in.contiguous(), sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  check_resize_draws(x, sizes, offsets);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::empty({B, C, O, O}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vars_fast_rrp_cuda", [&] {
    auto args = std::make_tuple(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                sizes.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), total, C, H, W, O);
    if (bilinear) std::apply([&](auto... a) { fwd_kernel<scalar_t, true><<<grid_stride_blocks(total, threads, 16), threads, 0, stream>>>(a...); }, args);
    else std::apply([&](auto... a) { fwd_kernel<scalar_t, false><<<grid_stride_blocks(total, threads, 16), threads, 0, stream>>>(a...); }, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor rrp_backward_cuda(const at::Tensor& g_in, const at::Tensor& sizes_in, const at::Tensor& offsets_in,
                             int64_t H, int64_t W, c10::string_view mode) {
  TORCH_CHECK(g_in.dim() == 4 && g_in.size(2) == g_in.size(3),
              "vars_fast::random_resize_pad_backward: grad_out must be [B, C, O, O], got ", g_in.sizes());
  const bool bilinear = parse_resize_mode(mode) == ResizeMode::Bilinear;
  const at::cuda::OptionalCUDAGuard guard(g_in.device());
  auto g = g_in.contiguous(), sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  check_resize_draws(g, sizes, offsets);
  const int64_t B = g.size(0), C = g.size(1), O = g.size(2);
  const auto acc_type = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = at::zeros({B, C, H, W}, g.options().dtype(acc_type));
  const int64_t total = g.numel();
  if (total == 0 || acc.numel() == 0) return acc.to(g.scalar_type());
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "vars_fast_rrp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto args = std::make_tuple(g.const_data_ptr<scalar_t>(), acc.mutable_data_ptr<acc_t>(),
                                sizes.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), total, C, H, W, O);
    if (bilinear) std::apply([&](auto... a) { bwd_kernel<scalar_t, true><<<grid_stride_blocks(total, threads, 16), threads, 0, stream>>>(a...); }, args);
    else std::apply([&](auto... a) { bwd_kernel<scalar_t, false><<<grid_stride_blocks(total, threads, 16), threads, 0, stream>>>(a...); }, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return acc.to(g.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CUDA, m) {
  m.impl("random_resize_pad", &rrp_cuda);
  m.impl("random_resize_pad_backward", &rrp_backward_cuda);
}

}  // namespace vars_fast
