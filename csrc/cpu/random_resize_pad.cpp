// random_resize_pad CPU kernels (forward + backward w.r.t. x).
//
// Each (sample, channel) plane is one task of at::parallel_for. Bilinear is separable: a
// horizontal pass (gathers through per-sample index/weight tables) fills tmp[H, s] for the
// input rows actually referenced, then a vertical blend of two tmp rows per output row runs
// on at::vec::Vectorized (map2). Index and weight tables follow F.interpolate exactly
// (align_corners=False, antialias=False; "nearest" = legacy floor(dst * in/out)), with the
// same opmath precision (fp32 for fp32/fp16/bf16, fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace vars_fast {
namespace {

template <typename opmath_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<opmath_t> l0, l1;
};

// Source indices and weights of a linear resize in -> out (ATen's compute_source_index_and_lambda).
template <typename opmath_t>
Axis<opmath_t> linear_axis(int64_t in, int64_t out) {
  Axis<opmath_t> a;
  a.i0.resize(out); a.i1.resize(out); a.l0.resize(out); a.l1.resize(out);
  const opmath_t scale = static_cast<opmath_t>(in) / out;
  for (int64_t j = 0; j < out; ++j) {
    if (in == out) {  // same size: a copy, as in ATen
      a.i0[j] = a.i1[j] = j; a.l0[j] = 1; a.l1[j] = 0;
      continue;
    }
    opmath_t src = scale * (j + static_cast<opmath_t>(0.5)) - static_cast<opmath_t>(0.5);
    if (src < 0) src = 0;
    const int64_t k = std::min<int64_t>(static_cast<int64_t>(std::floor(src)), in - 1);
    const opmath_t lam = std::min(std::max(src - static_cast<opmath_t>(k), static_cast<opmath_t>(0)), static_cast<opmath_t>(1));
    a.i0[j] = k;
    a.i1[j] = k + (k < in - 1 ? 1 : 0);
    a.l1[j] = lam;
    a.l0[j] = static_cast<opmath_t>(1) - lam;
  }
  return a;
}

// ATen's nearest_idx (mode="nearest", scales not given): float scale, floor, clamp.
std::vector<int64_t> nearest_axis(int64_t in, int64_t out) {
  std::vector<int64_t> idx(out);
  const float scale = static_cast<float>(in) / out;
  for (int64_t j = 0; j < out; ++j) {
    if (out == in) idx[j] = j;
    else if (out == 2 * in) idx[j] = j >> 1;
    else idx[j] = std::min<int64_t>(static_cast<int64_t>(std::floor(j * scale)), in - 1);
  }
  return idx;
}

enum class Mode { Bilinear, Nearest };

Mode parse_mode(c10::string_view mode) {
  if (mode == "bilinear") return Mode::Bilinear;
  if (mode == "nearest") return Mode::Nearest;
  TORCH_CHECK(false, "vars_fast::random_resize_pad: mode must be 'bilinear' or 'nearest', got '", std::string(mode), "'");
}

// Draws validated once on the host: each resized sample must fit in the canvas.
void check_draws(const at::Tensor& sizes, const at::Tensor& offsets, int64_t B, int64_t out_size) {
  TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == B && sizes.scalar_type() == at::kLong,
              "vars_fast::random_resize_pad: sizes must be int64 [B=", B, "], got ", sizes.sizes(), " ", sizes.scalar_type());
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == B && offsets.size(1) == 2 && offsets.scalar_type() == at::kLong,
              "vars_fast::random_resize_pad: offsets must be int64 [B=", B, ", 2], got ", offsets.sizes(), " ", offsets.scalar_type());
  auto s = sizes.accessor<int64_t, 1>();
  auto o = offsets.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(s[b] >= 1 && o[b][0] >= 0 && o[b][1] >= 0 && o[b][0] + s[b] <= out_size && o[b][1] + s[b] <= out_size,
                "vars_fast::random_resize_pad: sample ", b, " (size ", s[b], ", offset (", o[b][0], ", ", o[b][1],
                ")) does not fit an output of ", out_size, "x", out_size);
  }
}

template <typename scalar_t>
void forward_plane(const scalar_t* in, scalar_t* out, int64_t H, int64_t W, int64_t O, int64_t s, int64_t top,
                   int64_t left, Mode mode, std::vector<at::opmath_type<scalar_t>>& tmp,
                   std::vector<at::opmath_type<scalar_t>>& row) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  std::fill(out, out + top * O, scalar_t(0));
  std::fill(out + (top + s) * O, out + O * O, scalar_t(0));
  for (int64_t r = 0; r < s; ++r) {
    scalar_t* o = out + (top + r) * O;
    std::fill(o, o + left, scalar_t(0));
    std::fill(o + left + s, o + O, scalar_t(0));
  }
  if (mode == Mode::Nearest) {
    const auto iy = nearest_axis(H, s), ix = nearest_axis(W, s);
    for (int64_t r = 0; r < s; ++r) {
      const scalar_t* src = in + iy[r] * W;
      scalar_t* o = out + (top + r) * O + left;
      for (int64_t j = 0; j < s; ++j) o[j] = src[ix[j]];
    }
    return;
  }
  const auto ay = linear_axis<opmath_t>(H, s), ax = linear_axis<opmath_t>(W, s);
  // Horizontal pass, only for the input rows some output row reads.
  tmp.resize(H * s);
  std::vector<char> used(H, 0);
  for (int64_t r = 0; r < s; ++r) used[ay.i0[r]] = used[ay.i1[r]] = 1;
  for (int64_t y = 0; y < H; ++y) {
    if (!used[y]) continue;
    const scalar_t* src = in + y * W;
    opmath_t* t = tmp.data() + y * s;
    for (int64_t j = 0; j < s; ++j) {
      t[j] = ax.l0[j] * static_cast<opmath_t>(src[ax.i0[j]]) + ax.l1[j] * static_cast<opmath_t>(src[ax.i1[j]]);
    }
  }
  // Vertical blend, vectorised.
  row.resize(s);
  for (int64_t r = 0; r < s; ++r) {
    const opmath_t w0 = ay.l0[r], w1 = ay.l1[r];
    scalar_t* o = out + (top + r) * O + left;
    opmath_t* dst = std::is_same_v<scalar_t, opmath_t> ? reinterpret_cast<opmath_t*>(o) : row.data();
    at::vec::map2<opmath_t>([w0, w1](Vec a, Vec b) { return a * Vec(w0) + b * Vec(w1); }, dst,
                            tmp.data() + ay.i0[r] * s, tmp.data() + ay.i1[r] * s, s);
    if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
      for (int64_t j = 0; j < s; ++j) o[j] = static_cast<scalar_t>(row[j]);
    }
  }
}

// Transpose of forward_plane for one plane: grad_out window -> grad_in [H, W] (opmath buffer).
template <typename scalar_t>
void backward_plane(const scalar_t* gout, at::opmath_type<scalar_t>* gin, int64_t H, int64_t W, int64_t O, int64_t s,
                    int64_t top, int64_t left, Mode mode, std::vector<at::opmath_type<scalar_t>>& tmp) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  std::fill(gin, gin + H * W, opmath_t(0));
  if (mode == Mode::Nearest) {
    const auto iy = nearest_axis(H, s), ix = nearest_axis(W, s);
    for (int64_t r = 0; r < s; ++r) {
      const scalar_t* g = gout + (top + r) * O + left;
      opmath_t* dst = gin + iy[r] * W;
      for (int64_t j = 0; j < s; ++j) dst[ix[j]] += static_cast<opmath_t>(g[j]);
    }
    return;
  }
  const auto ay = linear_axis<opmath_t>(H, s), ax = linear_axis<opmath_t>(W, s);
  // Vertical transpose: tmp[y, :] += w * grad_out row, vectorised axpy.
  tmp.assign(H * s, opmath_t(0));
  std::vector<opmath_t> g32(s);
  for (int64_t r = 0; r < s; ++r) {
    const scalar_t* g = gout + (top + r) * O + left;
    for (int64_t j = 0; j < s; ++j) g32[j] = static_cast<opmath_t>(g[j]);
    for (int k = 0; k < 2; ++k) {
      const opmath_t w = k ? ay.l1[r] : ay.l0[r];
      if (w == 0) continue;
      opmath_t* t = tmp.data() + (k ? ay.i1[r] : ay.i0[r]) * s;
      at::vec::map2<opmath_t>([w](Vec acc, Vec gv) { return acc + gv * Vec(w); }, t, t, g32.data(), s);
    }
  }
  // Horizontal transpose: scatter each tmp row into its input row.
  for (int64_t y = 0; y < H; ++y) {
    const opmath_t* t = tmp.data() + y * s;
    opmath_t* dst = gin + y * W;
    for (int64_t j = 0; j < s; ++j) {
      dst[ax.i0[j]] += ax.l0[j] * t[j];
      dst[ax.i1[j]] += ax.l1[j] * t[j];
    }
  }
}

at::Tensor random_resize_pad_cpu(const at::Tensor& x_in, const at::Tensor& sizes_in, const at::Tensor& offsets_in,
                                 int64_t out_size, c10::string_view mode_s) {
  TORCH_CHECK(x_in.dim() == 4, "vars_fast::random_resize_pad: x must be [B, C, H, W], got ", x_in.sizes());
  const Mode mode = parse_mode(mode_s);
  const auto x = x_in.contiguous();
  const auto sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = out_size;
  check_draws(sizes, offsets, B, O);
  auto out = at::empty({B, C, O, O}, x.options());
  if (out.numel() == 0) return out;
  const int64_t* sp = sizes.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vars_fast_random_resize_pad_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> tmp, row;  // per-task scratch, reused across planes
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C;
        forward_plane<scalar_t>(xp + p * H * W, outp + p * O * O, H, W, O, sp[b], op[2 * b], op[2 * b + 1], mode, tmp, row);
      }
    });
  });
  return out;
}

at::Tensor random_resize_pad_backward_cpu(const at::Tensor& grad_in, const at::Tensor& sizes_in,
                                          const at::Tensor& offsets_in, int64_t H, int64_t W, c10::string_view mode_s) {
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(2) == grad_in.size(3),
              "vars_fast::random_resize_pad_backward: grad_out must be [B, C, O, O], got ", grad_in.sizes());
  const Mode mode = parse_mode(mode_s);
  const auto g = grad_in.contiguous();
  const auto sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t B = g.size(0), C = g.size(1), O = g.size(2);
  check_draws(sizes, offsets, B, O);
  auto gx = at::empty({B, C, H, W}, g.options());
  if (gx.numel() == 0) return gx;
  const int64_t* sp = sizes.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "vars_fast_random_resize_pad_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> tmp, acc;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C;
        // Accumulate in opmath (fp32 for half types), round once when storing.
        opmath_t* dst = std::is_same_v<scalar_t, opmath_t> ? reinterpret_cast<opmath_t*>(gxp + p * H * W)
                                                           : (acc.resize(H * W), acc.data());
        backward_plane<scalar_t>(gp + p * O * O, dst, H, W, O, sp[b], op[2 * b], op[2 * b + 1], mode, tmp);
        if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
          for (int64_t i = 0; i < H * W; ++i) gxp[p * H * W + i] = static_cast<scalar_t>(acc[i]);
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CPU, m) {
  m.impl("random_resize_pad", &random_resize_pad_cpu);
  m.impl("random_resize_pad_backward", &random_resize_pad_backward_cpu);
}

}  // namespace vars_fast
