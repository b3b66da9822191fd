// residual_epilogue CUDA kernels: out = act(w * (y - mean) * rstd + b) + residual, and backward.
//
// Same plan as the CPU kernels (csrc/cpu/residual_epilogue.cpp): per-(n,c) fp64 sums (one block
// per (n,c), strided loads so NCHW and channels_last share the kernel), O(N*C) coefficient
// algebra with ATen ops on the device, then one elementwise pass in memory order.
// Forward: sums of y, y^2 -> mean/rstd -> out. Backward: sums of g', g'(y - mean) -> dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

namespace vars_fast {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum of (a, b); the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads / 32], sb[kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  if (lane == 0) sa[w] = a, sb[w] = b;
  __syncthreads();
  if (w == 0) {
    a = lane < kThreads / 32 ? sa[lane] : 0.0;
    b = lane < kThreads / 32 ? sb[lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

// Block nc: forward (z == nullptr): s1 = sum x, s2 = sum x^2. Backward (z = grad):
// g' = z masked by the ReLU of A*x + B, s1 = sum g', s2 = sum g' * (x - mean).
template <typename T, typename acc_t>
__global__ void nc_sums_kernel(const T* __restrict__ x, const T* __restrict__ z, const acc_t* __restrict__ A,
                               const acc_t* __restrict__ B, const acc_t* __restrict__ mean, double* __restrict__ s1,
                               double* __restrict__ s2, int64_t C, int64_t HW, int64_t sN, int64_t sC, int64_t sHW,
                               bool relu) {
  const int64_t nc = blockIdx.x;
  const int64_t base = (nc / C) * sN + (nc % C) * sC;
  double a1 = 0, a2 = 0;
  if (z == nullptr) {
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const double v = static_cast<double>(x[base + i * sHW]);
      a1 += v;
      a2 += v * v;
    }
  } else {
    const acc_t a = A[nc], b = B[nc], m = mean[nc];
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(x[base + i * sHW]);
      acc_t g = static_cast<acc_t>(z[base + i * sHW]);
      if (relu && !(a * v + b > acc_t(0))) g = acc_t(0);
      a1 += static_cast<double>(g);
      a2 += static_cast<double>(g) * static_cast<double>(v - m);
    }
  }
  block_sum2(a1, a2);
  if (threadIdx.x == 0) s1[nc] = a1, s2[nc] = a2;
}

// Elementwise in memory order. Forward: out = act(A*x + B) (+ z). Backward: out = K1*g' + K2*x + K3.
template <typename T, typename acc_t>
__global__ void apply_kernel(const T* __restrict__ x, const T* __restrict__ z, T* __restrict__ out,
                             const acc_t* __restrict__ A, const acc_t* __restrict__ B, const acc_t* __restrict__ K1,
                             const acc_t* __restrict__ K2, const acc_t* __restrict__ K3, int64_t numel, int64_t C,
                             int64_t HW, bool cl, bool relu, bool backward) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t nc = cl ? (i / (HW * C)) * C + i % C : i / HW;
    const acc_t v = static_cast<acc_t>(x[i]);
    const acc_t h = A[nc] * v + B[nc];
    if (backward) {
      acc_t g = static_cast<acc_t>(z[i]);
      if (relu && !(h > acc_t(0))) g = acc_t(0);
      out[i] = static_cast<T>(K1[nc] * g + K2[nc] * v + K3[nc]);
    } else {
      const T o = static_cast<T>(relu ? (h > acc_t(0) ? h : acc_t(0)) : h);
      out[i] = z ? static_cast<T>(o + z[i]) : o;
    }
  }
}

struct Geo {
  at::Tensor y;
  bool cl;
  int64_t N, C, HW, sN, sC, sHW;
};

Geo geo_of(const at::Tensor& y_in) {
  TORCH_CHECK(y_in.dim() >= 2, "vars_fast::residual_epilogue: y must be [N, C, ...], got ", y_in.sizes());
  Geo g;
  g.cl = y_in.dim() == 4 && y_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !y_in.is_contiguous();
  g.y = g.cl ? y_in : y_in.contiguous();
  g.N = g.y.size(0);
  g.C = g.y.size(1);
  g.HW = (g.N * g.C) ? g.y.numel() / (g.N * g.C) : 0;
  g.sN = g.C * g.HW;
  g.sC = g.cl ? 1 : g.HW;
  g.sHW = g.cl ? g.C : 1;
  return g;
}

at::Tensor like(const at::Tensor& t, const Geo& g, const char* name) {
  TORCH_CHECK(t.sizes() == g.y.sizes() && t.scalar_type() == g.y.scalar_type(), "vars_fast::residual_epilogue: ",
              name, " ", t.sizes(), "/", t.scalar_type(), " must match y ", g.y.sizes(), "/", g.y.scalar_type());
  return g.cl ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// [N*C] per-(n,c) view of a per-statistics-group tensor ([C] for batch, [N, C] for instance).
at::Tensor per_nc(const at::Tensor& t, const Geo& g, bool batch) {
  return (batch ? t.view({1, g.C}).expand({g.N, g.C}) : t.view({g.N, g.C})).contiguous().view(-1);
}

std::pair<at::Tensor, at::Tensor> affine(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
                                         const Geo& g, at::ScalarType st) {
  auto opts = g.y.options().dtype(at::kDouble);
  at::Tensor wd = (w.has_value() && w->defined()) ? w->to(at::kDouble).view(-1) : at::ones({g.C}, opts);
  at::Tensor bd = (b.has_value() && b->defined()) ? b->to(at::kDouble).view(-1) : at::zeros({g.C}, opts);
  TORCH_CHECK(wd.numel() == g.C && bd.numel() == g.C, "vars_fast::residual_epilogue: weight/bias need C = ", g.C,
              " elements");
  return {wd, bd};
}

int blocks_for(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 8));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_epilogue_fwd_cuda(
    const at::Tensor& y_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, c10::string_view norm, bool relu, bool use_input_stats,
    double eps) {
  const bool batch = parse_norm(norm);
  const c10::cuda::CUDAGuard guard(y_in.device());
  Geo g = geo_of(y_in);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) r = like(*residual, g, "residual");
  const auto st = g.y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty_like(g.y);
  auto dopts = g.y.options().dtype(at::kDouble);
  at::Tensor mean, rstd;  // fp64 [C] or [N, C]
  auto stream = at::cuda::getCurrentCUDAStream();
  if (use_input_stats) {
    at::Tensor s = at::zeros({2, g.N * g.C}, dopts);
    if (g.y.numel()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.y.scalar_type(), "re_fwd_sums", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        nc_sums_kernel<scalar_t, acc_t><<<g.N * g.C, kThreads, 0, stream>>>(
            g.y.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, nullptr, s[0].data_ptr<double>(),
            s[1].data_ptr<double>(), g.C, g.HW, g.sN, g.sC, g.sHW, false);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    at::Tensor t1 = s[0].view({g.N, g.C}), t2 = s[1].view({g.N, g.C});
    if (batch) t1 = t1.sum(0), t2 = t2.sum(0);
    const double cnt = static_cast<double>(std::max<int64_t>(batch ? g.N * g.HW : g.HW, 1));
    mean = t1 / cnt;
    rstd = ((t2 / cnt - mean * mean).clamp_min(0) + eps).rsqrt();
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "vars_fast::residual_epilogue: batch-norm eval needs running_mean and running_var");
    mean = running_mean->to(at::kDouble).view(-1);
    rstd = (running_var->to(at::kDouble).view(-1) + eps).rsqrt();
  }
  auto [w, b] = affine(weight, bias, g, st);
  const at::Tensor wk = batch ? w : w.view({1, g.C}), bk = batch ? b : b.view({1, g.C});
  if (g.y.numel()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.y.scalar_type(), "re_fwd_apply", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto at_ = c10::CppTypeToScalarType<acc_t>::value;
      at::Tensor A = per_nc(wk * rstd, g, batch).to(at_), B = per_nc(bk - mean * wk * rstd, g, batch).to(at_);
      apply_kernel<scalar_t, acc_t><<<blocks_for(g.y.numel()), kThreads, 0, stream>>>(
          g.y.const_data_ptr<scalar_t>(), r.defined() ? r.const_data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), nullptr, nullptr, nullptr,
          g.y.numel(), g.C, g.HW, g.cl, relu, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, mean.to(st), rstd.to(st)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_epilogue_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& y_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    c10::string_view norm, bool relu, bool use_input_stats) {
  const bool batch = parse_norm(norm);
  const c10::cuda::CUDAGuard guard(y_in.device());
  Geo g = geo_of(y_in);
  const at::Tensor go = like(grad_out, g, "grad_out");
  const auto st = g.y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dy = at::empty_like(g.y);
  auto [w, b] = affine(weight, bias, g, st);
  const at::Tensor mean = mean_in.to(at::kDouble), rstd = rstd_in.to(at::kDouble);
  const at::Tensor wk = batch ? w : w.view({1, g.C}), bk = batch ? b : b.view({1, g.C});
  if (g.y.numel() == 0) return {dy, at::zeros({g.C}, w.options().dtype(st)), at::zeros({g.C}, w.options().dtype(st))};
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor s = at::zeros({2, g.N * g.C}, g.y.options().dtype(at::kDouble));
  at::Tensor t1, t2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.y.scalar_type(), "re_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto at_ = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor A = per_nc(wk * rstd, g, batch).to(at_), B = per_nc(bk - mean * wk * rstd, g, batch).to(at_);
    at::Tensor Mn = per_nc(mean, g, batch).to(at_);
    nc_sums_kernel<scalar_t, acc_t><<<g.N * g.C, kThreads, 0, stream>>>(
        g.y.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), A.const_data_ptr<acc_t>(),
        B.const_data_ptr<acc_t>(), Mn.const_data_ptr<acc_t>(), s[0].data_ptr<double>(), s[1].data_ptr<double>(), g.C,
        g.HW, g.sN, g.sC, g.sHW, relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    t1 = s[0].view({g.N, g.C});
    t2 = s[1].view({g.N, g.C});
    if (batch) t1 = t1.sum(0), t2 = t2.sum(0);
    const double cnt = static_cast<double>(batch ? g.N * g.HW : g.HW);
    const at::Tensor wr = wk * rstd;
    const at::Tensor c1 = use_input_stats ? t1 / cnt : at::zeros_like(wr);
    const at::Tensor c2 = use_input_stats ? t2 * rstd * rstd / cnt : at::zeros_like(wr);
    at::Tensor K1 = per_nc(wr, g, batch).to(at_), K2 = per_nc(-wr * c2, g, batch).to(at_),
               K3 = per_nc(wr * (mean * c2 - c1), g, batch).to(at_);
    apply_kernel<scalar_t, acc_t><<<blocks_for(g.y.numel()), kThreads, 0, stream>>>(
        g.y.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
        A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), K1.const_data_ptr<acc_t>(), K2.const_data_ptr<acc_t>(),
        K3.const_data_ptr<acc_t>(), g.y.numel(), g.C, g.HW, g.cl, relu, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor dw = t2 * rstd, db = t1;
  if (!batch) dw = dw.sum(0), db = db.sum(0);
  return {dy, dw.to(st), db.to(st)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CUDA, m) {
  m.impl("residual_epilogue", &residual_epilogue_fwd_cuda);
  m.impl("residual_epilogue_backward", &residual_epilogue_bwd_cuda);
}

}  // namespace vars_fast
