// residual_epilogue CPU kernels: out = act(w * (y - mean) * rstd + b) + residual, and its backward.
//
// Two passes each way over [N, C, HW] data in NCHW or channels_last (NHWC) memory:
//   forward:  per-(n,c) sums of y and y^2 (fp64 accumulators: one pass, no cancellation
//             worries), then one fused apply pass (norm + affine + ReLU + residual add);
//   backward: per-(n,c) sums of g' and g'*(y - mean) (g' = grad masked by the recomputed ReLU),
//             then one pass dy = k1*g' + k2*y + k3 with per-(n,c) constants.
// Batch norm reuses the per-(n,c) sums and folds them over n. The eager reference needs about
// 14 passes for forward + backward (instance_norm, relu, add and their backwards); this is 4.
// Inner loops run over contiguous memory (HW in NCHW, C in NHWC) with `omp simd`.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace vars_fast {
namespace {

// Work per parallel_for task: ~32K elements, so small tensors (and gradcheck's) stay on one
// thread instead of paying an OpenMP fork per call.
constexpr int64_t kGrainElems = 32768;

struct Geo {
  int64_t N, C, HW;
  bool cl;  // channels_last: element (n, c, i) lives at (n*HW + i)*C + c, else (n*C + c)*HW + i
};

// y in the layout the kernels handle: NCHW-contiguous or (4-D) channels_last; anything else
// is copied to NCHW once.
at::Tensor canonical(const at::Tensor& y) {
  if (y.dim() == 4 && y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous()) return y;
  return y.contiguous();
}

Geo geo_of(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2, "vars_fast::residual_epilogue: y must be [N, C, ...], got ", y.sizes());
  const int64_t N = y.size(0), C = y.size(1);
  const int64_t HW = N * C > 0 ? y.numel() / (N * C) : 0;
  return {N, C, HW, !y.is_contiguous()};
}

// `t` in the same memory layout as the canonical y (grad_out / residual may come in another).
at::Tensor like(const at::Tensor& t, const at::Tensor& y, const Geo& g, const char* name) {
  TORCH_CHECK(t.sizes() == y.sizes(), "vars_fast::residual_epilogue: ", name, " ", t.sizes(),
              " must match y ", y.sizes());
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), "vars_fast::residual_epilogue: ", name, " dtype ",
              t.scalar_type(), " must match y dtype ", y.scalar_type());
  return g.cl ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// Per-(n,c) sums of f(n*C+c, x[...], z[...]) -> (s1, s2) in fp64, for all N*C pairs. f returns
// a pair of R: R = double for the forward moments (sum x^2 - mean^2 needs it), R = the compute
// type for the backward sums, which are centred (no cancellation) and carry the ReLU mask:
// a float mask next to double accumulators keeps gcc from vectorising the loop,
// so those accumulate in R over chunks of kChunk elements and fold into fp64 per chunk.
// z may be null (then x is passed twice, which keeps the loop branch-free).
constexpr int64_t kChunk = 256;  // short chunks: fp32 partial sums stay ~fp64-accurate

template <typename R, typename T, typename F>
void nc_sums(const Geo& g, const T* x, const T* z, double* s1, double* s2, const F& f) {
  if (!g.cl) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const T* xp = x + nc * g.HW;
        const T* zp = (z ? z : x) + nc * g.HW;
        double a1 = 0, a2 = 0;
        for (int64_t i0 = 0; i0 < g.HW; i0 += kChunk) {
          const int64_t i1 = std::min(g.HW, i0 + kChunk);
          R c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t i = i0; i < i1; ++i) {
            auto r = f(nc, xp[i], zp[i]);
            c1 += r.first;
            c2 += r.second;
          }
          a1 += c1;
          a2 += c2;
        }
        s1[nc] = a1;
        s2[nc] = a2;
      }
    });
  } else {
    // One task per sample: rows of C channels, accumulated into C-wide vectors, folded into
    // fp64 every kChunk / C rows.
    at::parallel_for(0, g.N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.HW * g.C, 1)), [&](int64_t b, int64_t e) {
      std::vector<R> c1(g.C), c2(g.C);
      std::vector<double> a1(g.C), a2(g.C);
      const int64_t rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(g.C, 1));
      for (int64_t n = b; n < e; ++n) {
        std::fill(a1.begin(), a1.end(), 0.0);
        std::fill(a2.begin(), a2.end(), 0.0);
        for (int64_t i0 = 0; i0 < g.HW; i0 += rows) {
          std::fill(c1.begin(), c1.end(), R(0));
          std::fill(c2.begin(), c2.end(), R(0));
          R* p1 = c1.data();
          R* p2 = c2.data();
          for (int64_t i = i0; i < std::min(g.HW, i0 + rows); ++i) {
            const T* xp = x + (n * g.HW + i) * g.C;
            const T* zp = (z ? z : x) + (n * g.HW + i) * g.C;
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) {
              auto r = f(n * g.C + c, xp[c], zp[c]);
              p1[c] += r.first;
              p2[c] += r.second;
            }
          }
          for (int64_t c = 0; c < g.C; ++c) a1[c] += p1[c], a2[c] += p2[c];
        }
        for (int64_t c = 0; c < g.C; ++c) {
          s1[n * g.C + c] = a1[c];
          s2[n * g.C + c] = a2[c];
        }
      }
    });
  }
}

// out[...] = f(n*C+c, x[...], z[...]) for every element (z may be null).
template <typename T, typename F>
void nc_map(const Geo& g, T* out, const T* x, const T* z, const F& f) {
  const T* zz = z ? z : x;  // no z: read x twice, keeps the loops branch-free
  if (!g.cl) {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t o = nc * g.HW;
#pragma omp simd
        for (int64_t i = 0; i < g.HW; ++i) out[o + i] = f(nc, x[o + i], zz[o + i]);
      }
    });
  } else {
    at::parallel_for(0, g.N * g.HW, std::max<int64_t>(64, kGrainElems / std::max<int64_t>(g.C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / g.HW, o = r * g.C;
#pragma omp simd
        for (int64_t c = 0; c < g.C; ++c) out[o + c] = f(n * g.C + c, x[o + c], zz[o + c]);
      }
    });
  }
}

// g if h > 0 else 0. fp32 through an integer bit mask: a float select here compiles to a
// branch (gcc "control flow in loop"), which mispredicts on random signs.
inline float relu_mask(float g, float h) {
  return std::bit_cast<float>(std::bit_cast<int32_t>(g) & -static_cast<int32_t>(h > 0.0f));
}
inline double relu_mask(double g, double h) { return h > 0.0 ? g : 0.0; }

// Calls f(std::true_type{}) or f(std::false_type{}): flags become compile-time constants, so
// the inner loops carry no runtime branch (a runtime `relu` flag keeps gcc from vectorising
// the ReLU backward).
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

template <typename acc_t>
std::pair<std::vector<acc_t>, std::vector<acc_t>> affine(const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias, int64_t C) {
  std::vector<acc_t> w(C, acc_t(1)), b(C, acc_t(0));
  for (auto [src, dst] : {std::pair{&weight, &w}, std::pair{&bias, &b}}) {
    if (src->has_value() && (*src)->defined()) {
      TORCH_CHECK((*src)->numel() == C, "vars_fast::residual_epilogue: weight/bias must have C = ", C,
                  " elements, got ", (*src)->sizes());
      auto t = (*src)->detach().to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
      std::copy(t.template data_ptr<acc_t>(), t.template data_ptr<acc_t>() + C, dst->begin());
    }
  }
  return {w, b};
}

// NCHW instance norm, the denoiser's case: each (n, c) plane (64 KB at 128x128) is reduced and
// then written while it is still in L2, so y (and grad) come from DRAM once per direction
// instead of twice: 3 + 4 passes instead of 4 + 5 (residual add included).
template <typename scalar_t, bool RELU, bool RES>
void instance_fwd_fused(const Geo& g, const scalar_t* y, const scalar_t* r, scalar_t* out, const double* w,
                        const double* b, double eps, at::opmath_type<scalar_t>* mp, at::opmath_type<scalar_t>* rp) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.HW, 1)), [&](int64_t b0, int64_t e0) {
    for (int64_t nc = b0; nc < e0; ++nc) {
      const scalar_t* yp = y + nc * g.HW;
      double a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = 0; i < g.HW; ++i) {
        const double v = static_cast<double>(yp[i]);
        a1 += v;
        a2 += v * v;
      }
      const double m = a1 / g.HW, rstd = 1.0 / std::sqrt(std::max(a2 / g.HW - m * m, 0.0) + eps);
      mp[nc] = static_cast<acc_t>(m);
      rp[nc] = static_cast<acc_t>(rstd);
      const int64_t c = nc % g.C;
      const acc_t A = static_cast<acc_t>(w[c] * rstd), B = static_cast<acc_t>(b[c] - m * w[c] * rstd);
      scalar_t* op = out + nc * g.HW;
      const scalar_t* rq = RES ? r + nc * g.HW : yp;
#pragma omp simd
      for (int64_t i = 0; i < g.HW; ++i) {
        acc_t h = A * static_cast<acc_t>(yp[i]) + B;
        if constexpr (RELU) h = h > acc_t(0) ? h : acc_t(0);
        if constexpr (RES) op[i] = static_cast<scalar_t>(static_cast<scalar_t>(h) + rq[i]);
        else op[i] = static_cast<scalar_t>(h);
      }
    }
  });
}

// channels_last instance norm (the screener's and the evaluation's NHWC denoiser), one sample
// per task: the sample's moments, then its apply pass while the sample (HW x C, 256 KB at
// 64 px x 16 ch) is still in L2. The same arithmetic, in the same order, as nc_sums (R = double)
// followed by nc_map, so the output is bit-identical to the unfused channels_last path; only
// the memory traffic and the task split differ. Needs N >= the thread count to use every core
// (the caller falls back to the unfused path otherwise).
// CC: C as a compile-time constant (0: read g.C): with only C = 16 elements per row, a runtime
// trip count cost a vector-loop setup per row that took longer than the row's arithmetic.
// The channels_last rows of benchmarks/results/cpu-intel-r-xeon-r-processor-2-50ghz-2-threads-
// residual-epilogue.md compare it with the eager and compiled reference.
template <typename scalar_t, bool RELU, bool RES, int CC>
void instance_fwd_fused_cl(const Geo& g, const scalar_t* y, const scalar_t* r, scalar_t* out,
                           const at::opmath_type<scalar_t>* w, const at::opmath_type<scalar_t>* b, double eps,
                           at::opmath_type<scalar_t>* mp, at::opmath_type<scalar_t>* rp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = CC ? CC : g.C, HW = g.HW;
  at::parallel_for(0, g.N, 1, [&](int64_t b0, int64_t e0) {
    std::vector<double> c1(C), c2(C), a1(C), a2(C);
    std::vector<acc_t> A(C), B(C);
    const int64_t rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
    for (int64_t n = b0; n < e0; ++n) {
      const scalar_t* ys = y + n * HW * C;
      std::fill(a1.begin(), a1.end(), 0.0);
      std::fill(a2.begin(), a2.end(), 0.0);
      double* p1 = c1.data();
      double* p2 = c2.data();
      for (int64_t i0 = 0; i0 < HW; i0 += rows) {
        std::fill(c1.begin(), c1.end(), 0.0);
        std::fill(c2.begin(), c2.end(), 0.0);
        for (int64_t i = i0; i < std::min(HW, i0 + rows); ++i) {
          const scalar_t* xp = ys + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(xp[c]);
            p1[c] += d;
            p2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) a1[c] += p1[c], a2[c] += p2[c];
      }
      for (int64_t c = 0; c < C; ++c) {
        const double m = a1[c] / static_cast<double>(HW);
        const double var = std::max(a2[c] / static_cast<double>(HW) - m * m, 0.0);
        mp[n * C + c] = static_cast<acc_t>(m);
        rp[n * C + c] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
        A[c] = w[c] * rp[n * C + c];
        B[c] = b[c] - mp[n * C + c] * w[c] * rp[n * C + c];
      }
      const acc_t* Ap = A.data();
      const acc_t* Bp = B.data();
      scalar_t* os = out + n * HW * C;
      const scalar_t* rs = RES ? r + n * HW * C : ys;
      for (int64_t i = 0; i < HW; ++i) {
        const scalar_t* xp = ys + i * C;
        const scalar_t* rq = rs + i * C;
        scalar_t* op = os + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          acc_t h = Ap[c] * static_cast<acc_t>(xp[c]) + Bp[c];
          if constexpr (RELU) h = h > acc_t(0) ? h : acc_t(0);
          if constexpr (RES) op[c] = static_cast<scalar_t>(static_cast<scalar_t>(h) + rq[c]);
          else op[c] = static_cast<scalar_t>(h);
        }
      }
    }
  });
}

// Backward of the above, plane by plane: sums of g' and g'(y - mean), then dy, with the plane's
// y and grad still in L2. Writes the per-plane sums (for dw, db) to t1, t2.
template <typename scalar_t, bool RELU>
void instance_bwd_fused(const Geo& g, const scalar_t* y, const scalar_t* go, scalar_t* dy, const double* w,
                        const double* b, const at::opmath_type<scalar_t>* mp, const at::opmath_type<scalar_t>* rp,
                        double* t1, double* t2) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(g.HW, 1)), [&](int64_t b0, int64_t e0) {
    for (int64_t nc = b0; nc < e0; ++nc) {
      const int64_t c = nc % g.C;
      const double rstd = rp[nc], m = mp[nc];
      const acc_t A = static_cast<acc_t>(w[c] * rstd), B = static_cast<acc_t>(b[c] - m * w[c] * rstd);
      const acc_t M = static_cast<acc_t>(m);
      const scalar_t* yp = y + nc * g.HW;
      const scalar_t* gp = go + nc * g.HW;
      double a1 = 0, a2 = 0;
      for (int64_t i0 = 0; i0 < g.HW; i0 += kChunk) {
        const int64_t i1 = std::min(g.HW, i0 + kChunk);
        acc_t c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t x = static_cast<acc_t>(yp[i]);
          acc_t gg = static_cast<acc_t>(gp[i]);
          if constexpr (RELU) gg = relu_mask(gg, A * x + B);
          c1 += gg;
          c2 += gg * (x - M);
        }
        a1 += c1;
        a2 += c2;
      }
      t1[nc] = a1;
      t2[nc] = a2;
      const double wr = w[c] * rstd, c1m = a1 / g.HW, c2m = a2 * rstd * rstd / g.HW;
      const acc_t K1 = static_cast<acc_t>(wr), K2 = static_cast<acc_t>(-wr * c2m),
                  K3 = static_cast<acc_t>(wr * (m * c2m - c1m));
      scalar_t* dp = dy + nc * g.HW;
#pragma omp simd
      for (int64_t i = 0; i < g.HW; ++i) {
        const acc_t x = static_cast<acc_t>(yp[i]);
        acc_t gg = static_cast<acc_t>(gp[i]);
        if constexpr (RELU) gg = relu_mask(gg, A * x + B);
        dp[i] = static_cast<scalar_t>(K1 * gg + K2 * x + K3);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_epilogue_fwd_cpu(
    const at::Tensor& y_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, c10::string_view norm, bool relu, bool use_input_stats,
    double eps) {
  const bool batch = parse_norm(norm);
  TORCH_CHECK(batch || use_input_stats, "vars_fast::residual_epilogue: instance norm always uses input stats");
  const at::Tensor y = canonical(y_in);
  const Geo g = geo_of(y);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) r = like(*residual, y, g, "residual");
  const auto stat_type = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t S = batch ? g.C : g.N * g.C;  // number of statistics groups
  at::Tensor mean = batch ? at::empty({g.C}, y.options().dtype(stat_type))
                          : at::empty({g.N, g.C}, y.options().dtype(stat_type));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor out = at::empty_like(y);  // keeps y's memory format
  if (y.numel() == 0) return {out, mean.zero_(), rstd.fill_(1)};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_epilogue_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    if (!batch && !g.cl) {
      auto [wd, bd] = affine<double>(weight, bias, g.C);
      const scalar_t* rsp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
      with_flag(relu, [&](auto relu_c) {
        with_flag(rsp != nullptr, [&](auto res_c) {
          instance_fwd_fused<scalar_t, decltype(relu_c)::value, decltype(res_c)::value>(
              g, yp, rsp, out.data_ptr<scalar_t>(), wd.data(), bd.data(), eps, mp, rp);
        });
      });
      return;
    }
    if (!batch && g.cl && g.N >= at::get_num_threads()) {
      auto [wa, ba] = affine<acc_t>(weight, bias, g.C);
      const scalar_t* rsp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
      with_flag(relu, [&](auto relu_c) {
        with_flag(rsp != nullptr, [&](auto res_c) {
          constexpr bool R = decltype(relu_c)::value, S = decltype(res_c)::value;
          scalar_t* o = out.data_ptr<scalar_t>();
          switch (g.C) {
            case 16: instance_fwd_fused_cl<scalar_t, R, S, 16>(g, yp, rsp, o, wa.data(), ba.data(), eps, mp, rp); break;
            case 32: instance_fwd_fused_cl<scalar_t, R, S, 32>(g, yp, rsp, o, wa.data(), ba.data(), eps, mp, rp); break;
            case 64: instance_fwd_fused_cl<scalar_t, R, S, 64>(g, yp, rsp, o, wa.data(), ba.data(), eps, mp, rp); break;
            default: instance_fwd_fused_cl<scalar_t, R, S, 0>(g, yp, rsp, o, wa.data(), ba.data(), eps, mp, rp);
          }
        });
      });
      return;
    }
    if (use_input_stats) {
      std::vector<double> s1(g.N * g.C), s2(g.N * g.C);
      nc_sums<double, scalar_t>(g, yp, nullptr, s1.data(), s2.data(), [](int64_t, scalar_t v, scalar_t) {
        const double d = static_cast<double>(v);
        return std::pair<double, double>{d, d * d};
      });
      const double cnt = static_cast<double>(batch ? g.N * g.HW : g.HW);
      for (int64_t k = 0; k < S; ++k) {
        double a = 0, b = 0;
        if (batch) {
          for (int64_t n = 0; n < g.N; ++n) a += s1[n * g.C + k], b += s2[n * g.C + k];
        } else {
          a = s1[k], b = s2[k];
        }
        const double m = a / cnt, var = std::max(b / cnt - m * m, 0.0);
        mp[k] = static_cast<acc_t>(m);
        rp[k] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
      }
    } else {
      TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                  "vars_fast::residual_epilogue: batch-norm eval needs running_mean and running_var");
      auto rm = running_mean->detach().to(at::kCPU, stat_type).contiguous();
      auto rv = running_var->detach().to(at::kCPU, stat_type).contiguous();
      TORCH_CHECK(rm.numel() == g.C && rv.numel() == g.C, "vars_fast::residual_epilogue: running stats need C = ",
                  g.C, " elements");
      for (int64_t k = 0; k < g.C; ++k) {
        mp[k] = rm.data_ptr<acc_t>()[k];
        rp[k] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(rv.data_ptr<acc_t>()[k]) + eps));
      }
    }
    // Per-(n,c) scale/shift: h = A*y + B.
    auto [w, b] = affine<acc_t>(weight, bias, g.C);
    std::vector<acc_t> A(g.N * g.C), B(g.N * g.C);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t k = batch ? c : n * g.C + c;
        A[n * g.C + c] = w[c] * rp[k];
        B[n * g.C + c] = b[c] - mp[k] * w[c] * rp[k];
      }
    }
    const acc_t* Ap = A.data();
    const acc_t* Bp = B.data();
    const scalar_t* rsp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    with_flag(relu, [&](auto relu_c) {
      with_flag(rsp != nullptr, [&](auto res_c) {
        nc_map<scalar_t>(g, op, yp, rsp, [=](int64_t nc, scalar_t v, scalar_t res) {
          acc_t h = Ap[nc] * static_cast<acc_t>(v) + Bp[nc];
          if constexpr (decltype(relu_c)::value) h = h > acc_t(0) ? h : acc_t(0);
          // Round h to the output type before the add, as the eager reference does.
          if constexpr (decltype(res_c)::value) return static_cast<scalar_t>(static_cast<scalar_t>(h) + res);
          return static_cast<scalar_t>(h);
        });
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_epilogue_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& y_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, c10::string_view norm,
    bool relu, bool use_input_stats) {
  const bool batch = parse_norm(norm);
  const at::Tensor y = canonical(y_in);
  const Geo g = geo_of(y);
  const at::Tensor go = like(grad_out, y, g, "grad_out");
  const auto stat_type = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dy = at::empty_like(y);
  at::Tensor dw = at::zeros({g.C}, y.options().dtype(stat_type));
  at::Tensor db = at::zeros({g.C}, y.options().dtype(stat_type));
  if (y.numel() == 0) return {dy, dw, db};
  const at::Tensor m_c = mean.to(stat_type).contiguous(), r_c = rstd.to(stat_type).contiguous();
  TORCH_CHECK(m_c.numel() == (batch ? g.C : g.N * g.C), "vars_fast::residual_epilogue_bwd: mean has ",
              m_c.numel(), " elements, expected ", (batch ? g.C : g.N * g.C));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_epilogue_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* mp = m_c.const_data_ptr<acc_t>();
    const acc_t* rp = r_c.const_data_ptr<acc_t>();
    const int64_t NC = g.N * g.C;
    if (!batch && !g.cl && use_input_stats) {
      auto [wd, bd] = affine<double>(weight, bias, g.C);
      std::vector<double> t1(NC), t2(NC);
      with_flag(relu, [&](auto relu_c) {
        instance_bwd_fused<scalar_t, decltype(relu_c)::value>(g, y.const_data_ptr<scalar_t>(),
                                                              go.const_data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                                                              wd.data(), bd.data(), mp, rp, t1.data(), t2.data());
      });
      acc_t* dwp = dw.data_ptr<acc_t>();
      acc_t* dbp = db.data_ptr<acc_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        double sw = 0, sb = 0;
        for (int64_t n = 0; n < g.N; ++n) sw += t2[n * g.C + c] * rp[n * g.C + c], sb += t1[n * g.C + c];
        dwp[c] = static_cast<acc_t>(sw);
        dbp[c] = static_cast<acc_t>(sb);
      }
      return;
    }
    auto [w, b] = affine<acc_t>(weight, bias, g.C);
    std::vector<acc_t> A(NC), B(NC), M(NC);  // h = A*y + B (for the ReLU mask), M = mean of (n,c)
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t k = batch ? c : n * g.C + c;
        A[n * g.C + c] = w[c] * rp[k];
        B[n * g.C + c] = b[c] - mp[k] * w[c] * rp[k];
        M[n * g.C + c] = mp[k];
      }
    }
    const acc_t *Ap = A.data(), *Bp = B.data(), *Mp = M.data();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    // Pass 1: S1 = sum g', S2 = sum g' * (y - mean) per (n, c).
    std::vector<double> s1(NC), s2(NC);
    with_flag(relu, [&](auto relu_c) {
      nc_sums<acc_t, scalar_t>(g, yp, gp, s1.data(), s2.data(), [=](int64_t nc, scalar_t v, scalar_t gv) {
        const acc_t x = static_cast<acc_t>(v);
        acc_t gg = static_cast<acc_t>(gv);
        if constexpr (decltype(relu_c)::value) gg = relu_mask(gg, Ap[nc] * x + Bp[nc]);
        return std::pair<acc_t, acc_t>{gg, gg * (x - Mp[nc])};
      });
    });
    // Fold to the statistics groups; dw = sum g' * xhat, db = sum g'.
    const int64_t S = batch ? g.C : NC;
    std::vector<double> T1(S, 0.0), T2(S, 0.0);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t k = batch ? c : n * g.C + c;
        T1[k] += s1[n * g.C + c];
        T2[k] += s2[n * g.C + c];
      }
    }
    acc_t* dwp = dw.data_ptr<acc_t>();
    acc_t* dbp = db.data_ptr<acc_t>();
    for (int64_t k = 0; k < S; ++k) {
      const int64_t c = batch ? k : k % g.C;
      dwp[c] += static_cast<acc_t>(T2[k] * rp[k]);
      dbp[c] += static_cast<acc_t>(T1[k]);
    }
    // Pass 2: dy = w*rstd * (g' - T1/cnt - xhat * T2*rstd/cnt) = k1*g' + k2*y + k3.
    const double cnt = static_cast<double>(batch ? g.N * g.HW : g.HW);
    std::vector<acc_t> K1(NC), K2(NC), K3(NC);
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t nc = n * g.C + c, k = batch ? c : nc;
        const double wr = static_cast<double>(w[c]) * rp[k];
        const double t1 = use_input_stats ? T1[k] / cnt : 0.0;
        const double t2 = use_input_stats ? T2[k] * rp[k] * rp[k] / cnt : 0.0;  // per unit of (y - mean)
        K1[nc] = static_cast<acc_t>(wr);
        K2[nc] = static_cast<acc_t>(-wr * t2);
        K3[nc] = static_cast<acc_t>(wr * (mp[k] * t2 - t1));
      }
    }
    const acc_t *K1p = K1.data(), *K2p = K2.data(), *K3p = K3.data();
    with_flag(relu, [&](auto relu_c) {
      nc_map<scalar_t>(g, dy.data_ptr<scalar_t>(), yp, gp, [=](int64_t nc, scalar_t v, scalar_t gv) {
        const acc_t x = static_cast<acc_t>(v);
        acc_t gg = static_cast<acc_t>(gv);
        if constexpr (decltype(relu_c)::value) gg = relu_mask(gg, Ap[nc] * x + Bp[nc]);
        return static_cast<scalar_t>(K1p[nc] * gg + K2p[nc] * x + K3p[nc]);
      });
    });
  });
  return {dy, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CPU, m) {
  m.impl("residual_epilogue", &residual_epilogue_fwd_cpu);
  m.impl("residual_epilogue_backward", &residual_epilogue_bwd_cpu);
}

}  // namespace vars_fast
