// pgd_step CPU kernel: one pass over x_adv / x_orig / grad, at::parallel_for over flat chunks,
// at::vec::Vectorized<float> math (reduced types are widened to fp32 and narrowed on store).
// Contiguous inputs only: the Python dispatcher sends anything else to the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../pgd_step.h"

namespace vars_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

// One fp32 lane group: y = clamp01(clamp(x + a*sign(g), x0 - e, x0 + e)); same op order as the
// reference so fp32 results are bit-identical.
inline Vec step(Vec x, Vec x0, Vec g, Vec a, Vec e) {
  const Vec zero(0.f), one(1.f);
  // sign(g) in {-1, 0, 1}: comparison masks are all-ones bit patterns, "& one" turns them into 1.0f.
  Vec s = ((g > zero) & one) - ((g < zero) & one);
  Vec y = x + a * s;
  y = at::vec::minimum(at::vec::maximum(y, x0 - e), x0 + e);
  return at::vec::minimum(at::vec::maximum(y, zero), one);
}

inline float step1(float x, float x0, float g, float a, float e) {
  float s = (g > 0.f) ? 1.f : ((g < 0.f) ? -1.f : 0.f);
  float y = x + a * s;
  y = std::min(std::max(y, x0 - e), x0 + e);
  return std::min(std::max(y, 0.f), 1.f);
}

// Elements [i, j) of one sample with constant (a, e).
template <typename T>
void run_span(T* out, const T* xa, const T* x0, const T* g, int64_t i, int64_t j, float a, float e) {
  const Vec va(a), ve(e);
  int64_t k = i;
  if constexpr (std::is_same_v<T, float>) {
    for (; k + Vec::size() <= j; k += Vec::size()) {
      step(Vec::loadu(xa + k), Vec::loadu(x0 + k), Vec::loadu(g + k), va, ve).store(out + k);
    }
  } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    // Half / BFloat16: Vectorized<T> holds 2 * Vec::size() lanes; widen to two fp32 vectors.
    using VT = at::vec::Vectorized<T>;
    for (; k + VT::size() <= j; k += VT::size()) {
      auto [x_lo, x_hi] = at::vec::convert_to_float<T>(VT::loadu(xa + k));
      auto [o_lo, o_hi] = at::vec::convert_to_float<T>(VT::loadu(x0 + k));
      auto [g_lo, g_hi] = at::vec::convert_to_float<T>(VT::loadu(g + k));
      at::vec::convert_from_float<T>(step(x_lo, o_lo, g_lo, va, ve), step(x_hi, o_hi, g_hi, va, ve)).store(out + k);
    }
  }
  // Tail, and double (the reference does its math in fp32 for every dtype, so do we).
  for (; k < j; ++k) {
    out[k] = static_cast<T>(step1(static_cast<float>(xa[k]), static_cast<float>(x0[k]), static_cast<float>(g[k]), a, e));
  }
}

void pgd_step_into(at::Tensor& out, const at::Tensor& x_adv, const at::Tensor& x_orig, const at::Tensor& grad,
                   const std::optional<at::Tensor>& alpha_t, const std::optional<at::Tensor>& eps_t,
                   double alpha, double eps) {
  const int64_t n = x_adv.numel();
  if (n == 0) return;
  const int64_t B = x_adv.size(0), per = n / B;
  auto a_c = alpha_t.has_value() ? alpha_t->contiguous() : at::Tensor();
  auto e_c = eps_t.has_value() ? eps_t->contiguous() : at::Tensor();
  const float* ap = a_c.defined() ? a_c.data_ptr<float>() : nullptr;
  const float* ep = e_c.defined() ? e_c.data_ptr<float>() : nullptr;
  const float as = static_cast<float>(alpha), es = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_adv.scalar_type(), "vars_fast_pgd_step_cpu", [&] {
    const scalar_t* xa = x_adv.const_data_ptr<scalar_t>();
    const scalar_t* x0 = x_orig.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Grain of 256K elements (~4 MB of traffic): a single 3x224x224 image (150K) stays on one
    // thread, where the OpenMP fork/join would cost more than the pass itself (~0.5 ms on one
    // core, and far worse when the cores are oversubscribed); a 32-image batch uses them all.
    at::parallel_for(0, n, 1 << 18, [&](int64_t begin, int64_t end) {
      // Split [begin, end) at sample boundaries so each span has one (alpha, eps).
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / per;
        const int64_t j = std::min(end, (b + 1) * per);
        run_span<scalar_t>(o, xa, x0, g, i, j, ap ? ap[b] : as, ep ? ep[b] : es);
        i = j;
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CPU, m) {
  m.impl("pgd_step", &pgd_step_out_of_place<pgd_step_into>);
  m.impl("pgd_step_", &pgd_step_in_place<pgd_step_into>);
}

}  // namespace vars_fast
