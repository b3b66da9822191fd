// random_resize_pad CPU kernels (forward + backward w.r.t. x).
//
// (sample, channel) planes are split over at::parallel_for. Bilinear is separable: a
// horizontal pass (gathers through per-sample index/weight tables) interpolates the input rows
// that output rows reference, then a vertical blend of two such rows writes each output row.
// Index and weight tables follow F.interpolate exactly (align_corners=False, antialias=False;
// "nearest" = legacy floor(dst * in/out)), with the same opmath precision (fp32 for
// fp32/fp16/bf16, fp64 for fp64).
//
// fp32 bilinear on AVX-512 machines (the defence's path) has its own kernel, plane_f32 (AVX-512
// code in target("avx512f") functions, chosen at run time; the build itself targets AVX2):
// tables rebuilt only when the sample size changes, so shared by a sample's channels and by
// equal-sized samples; horizontal pass per 16 outputs as
// two permutes of a 32-float input window (AVX-512 gather where a block spans more than 32
// inputs, i.e. strong downscaling); the two horizontally interpolated rows an output row needs
// kept in a 2-row cache (each input row interpolated once per plane, in L1); output rows
// written in order. Everything else uses the generic planes (Vectorized vertical blend).
//
// Outputs (forward's out, backward's grad_x) come from empty_cpu_large (huge_page_alloc.h):
// large ones on transparent huge pages, where first-touch page faults otherwise cost as much
// as the interpolation itself; such fresh memory is already zero, so the padding is not written.
// Under vars_fast.ops.cpu_block_cache they are recycled blocks instead (no faults, not zero).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"
#include "huge_page_alloc.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define VARS_FAST_RRP_AVX512 1
#endif

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

using Mode = ResizeMode;

// Draws validated once on the host: each resized sample must fit in the canvas.
void check_draws(const at::Tensor& t, const at::Tensor& sizes, const at::Tensor& offsets, int64_t out_size) {
  check_resize_draws(t, sizes, offsets);
  const int64_t B = t.size(0);
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
                   int64_t left, Mode mode, bool zeroed, std::vector<at::opmath_type<scalar_t>>& tmp,
                   std::vector<at::opmath_type<scalar_t>>& row) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  if (!zeroed) {  // the zero padding (a fresh mapping already reads as zeros)
    std::fill(out, out + top * O, scalar_t(0));
    std::fill(out + (top + s) * O, out + O * O, scalar_t(0));
    for (int64_t r = 0; r < s; ++r) {
      scalar_t* o = out + (top + r) * O;
      std::fill(o, o + left, scalar_t(0));
      std::fill(o + left + s, o + O, scalar_t(0));
    }
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

#ifdef VARS_FAST_RRP_AVX512
bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// Per-sample tables of the fp32 bilinear kernel, reused across samples by one task.
// x axis in blocks of 16 output columns (padded with zero weights): block k reads the 32-float
// input window starting at base[k] through permutes (rel0/rel1 = index - base) when fits[k],
// else through gathers of the absolute indices abs0/abs1.
struct SampleTables {
  int64_t H = -1, W = -1, s = -1, nblk = 0;
  Axis<float> ay;
  std::vector<float> l0, l1;
  std::vector<int32_t> rel0, rel1, abs0, abs1, base;
  std::vector<uint8_t> fits;
  std::vector<float> rows;  // 2 cached horizontally interpolated rows, 16-padded
  int64_t row_id[2] = {-1, -1};

  void build(int64_t H_, int64_t W_, int64_t s_) {
    if (H_ == H && W_ == W && s_ == s) return;
    H = H_; W = W_; s = s_;
    ay = linear_axis<float>(H, s);
    const auto ax = linear_axis<float>(W, s);
    nblk = (s + 15) / 16;
    const int64_t n = nblk * 16;
    l0.assign(n, 0.f); l1.assign(n, 0.f);
    rel0.assign(n, 0); rel1.assign(n, 0); abs0.assign(n, 0); abs1.assign(n, 0);
    base.assign(nblk, 0); fits.assign(nblk, 0);
    for (int64_t k = 0; k < nblk; ++k) {
      const int64_t j0 = 16 * k, j1 = std::min<int64_t>(j0 + 16, s) - 1;
      const int64_t b = ax.i0[j0];
      base[k] = static_cast<int32_t>(b);
      fits[k] = ax.i1[j1] - b < 32;
      for (int64_t j = j0; j < j0 + 16; ++j) {
        const bool v = j < s;
        l0[j] = v ? ax.l0[j] : 0.f;
        l1[j] = v ? ax.l1[j] : 0.f;
        abs0[j] = static_cast<int32_t>(v ? ax.i0[j] : b);
        abs1[j] = static_cast<int32_t>(v ? ax.i1[j] : b);
        rel0[j] = abs0[j] - static_cast<int32_t>(b);
        rel1[j] = abs1[j] - static_cast<int32_t>(b);
      }
    }
    rows.assign(2 * n, 0.f);
  }
};

__attribute__((target("avx512f"))) inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// dst[0, 16 nblk) = horizontal interpolation of one input row (W floats). `ahead`: a row
// further down the plane (or nullptr) to prefetch while this one is interpolated, a line per
// block: the next rows' loads then come from cache rather than waiting on memory.
__attribute__((target("avx512f"))) void hrow_f32(const float* __restrict src, float* __restrict dst,
                                                 const SampleTables& t, const float* ahead) {
  const int64_t W = t.W, nblk = t.nblk;
  const float* __restrict l0 = t.l0.data();
  const float* __restrict l1 = t.l1.data();
  const int32_t* __restrict rel0 = t.rel0.data();
  const int32_t* __restrict rel1 = t.rel1.data();
  const int32_t* __restrict abs0 = t.abs0.data();
  const int32_t* __restrict abs1 = t.abs1.data();
  const int32_t* __restrict base = t.base.data();
  const uint8_t* __restrict fits = t.fits.data();
  for (int64_t k = 0; k < nblk; ++k) {
    const int64_t j = 16 * k;
    __m512 a, b;
    if (fits[k]) {
      const int64_t b0 = base[k], avail = W - b0;
      if (ahead != nullptr) __builtin_prefetch(ahead + b0, 0, 3);
      __m512 lo, hi;
      if (avail >= 32) {
        lo = _mm512_loadu_ps(src + b0);
        hi = _mm512_loadu_ps(src + b0 + 16);
      } else {  // masked loads never touch memory past the row
        lo = _mm512_maskz_loadu_ps(first_n(avail), src + b0);
        hi = avail > 16 ? _mm512_maskz_loadu_ps(first_n(avail - 16), src + b0 + 16) : _mm512_setzero_ps();
      }
      a = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(rel0 + j), hi);
      b = _mm512_permutex2var_ps(lo, _mm512_loadu_si512(rel1 + j), hi);
    } else {
      a = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, _mm512_loadu_si512(abs0 + j), src, 4);
      b = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, _mm512_loadu_si512(abs1 + j), src, 4);
    }
    _mm512_storeu_ps(dst + j, _mm512_fmadd_ps(a, _mm512_loadu_ps(l0 + j), _mm512_mul_ps(b, _mm512_loadu_ps(l1 + j))));
  }
}

// Input rows are prefetched this many rows ahead of the horizontal pass, so the next rows' loads
// overlap the current row's arithmetic; the cpp rows of
// benchmarks/results/cpu-intel-r-xeon-r-processor-2-50ghz-2-threads-rrp.md run with it.
constexpr int64_t kPrefetchRows = 2;

// One (sample, channel) plane: in [H, W] -> out [O, O], the resized image at (top, left).
__attribute__((target("avx512f"))) void plane_f32(const float* in, float* out, int64_t O, int64_t top, int64_t left,
                                                  bool zeroed, SampleTables& t) {
  const int64_t s = t.s, W = t.W, n = t.nblk * 16;
  float* cache[2] = {t.rows.data(), t.rows.data() + n};
  t.row_id[0] = t.row_id[1] = -1;
  if (!zeroed) std::memset(out, 0, sizeof(float) * top * O);
  for (int64_t r = 0; r < s; ++r) {
    const int64_t y0 = t.ay.i0[r], y1 = t.ay.i1[r];
    // Fetch rows y0 and y1 into the 2-row cache, never evicting the other one.
    const float* p[2];
    const int64_t want[2] = {y0, y1};
    for (int q = 0; q < 2; ++q) {
      const int64_t y = want[q];
      int slot = t.row_id[0] == y ? 0 : (t.row_id[1] == y ? 1 : -1);
      if (slot < 0) {
        const int64_t keep = want[1 - q];
        slot = t.row_id[0] == keep ? 1 : 0;
        const int64_t ya = y + kPrefetchRows;
        hrow_f32(in + y * W, cache[slot], t, ya < t.H ? in + ya * W : nullptr);
        t.row_id[slot] = y;
      }
      p[q] = cache[slot];
    }
    const __m512 w0 = _mm512_set1_ps(t.ay.l0[r]), w1 = _mm512_set1_ps(t.ay.l1[r]);
    float* o = out + (top + r) * O;
    if (!zeroed) std::memset(o, 0, sizeof(float) * left);
    o += left;
    int64_t j = 0;
    for (; j + 16 <= s; j += 16) {
      _mm512_storeu_ps(o + j, _mm512_fmadd_ps(_mm512_loadu_ps(p[0] + j), w0, _mm512_mul_ps(_mm512_loadu_ps(p[1] + j), w1)));
    }
    if (j < s) {
      _mm512_mask_storeu_ps(o + j, first_n(s - j),
                            _mm512_fmadd_ps(_mm512_loadu_ps(p[0] + j), w0, _mm512_mul_ps(_mm512_loadu_ps(p[1] + j), w1)));
    }
    if (!zeroed) std::memset(o + s, 0, sizeof(float) * (O - left - s));
  }
  if (!zeroed) std::memset(out + (top + s) * O, 0, sizeof(float) * (O - top - s) * O);
}
#endif  // VARS_FAST_RRP_AVX512

// Transpose of forward_plane for one plane: grad_out window -> grad_in [H, W] (opmath buffer).
template <typename scalar_t>
void backward_plane(const scalar_t* gout, at::opmath_type<scalar_t>* gin, int64_t H, int64_t W, int64_t O, int64_t s,
                    int64_t top, int64_t left, Mode mode, bool zeroed, std::vector<at::opmath_type<scalar_t>>& tmp) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  if (!zeroed) std::fill(gin, gin + H * W, opmath_t(0));
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
  const Mode mode = parse_resize_mode(mode_s);
  const auto x = x_in.contiguous();
  const auto sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = out_size;
  check_draws(x, sizes, offsets, O);
  bool zeroed = false;
  auto out = empty_cpu_large({B, C, O, O}, x.scalar_type(), &zeroed);
  if (out.numel() == 0) return out;
  const int64_t* sp = sizes.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  // About 64K output elements per task at least, so small calls stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, O * O));
#ifdef VARS_FAST_RRP_AVX512
  if (x.scalar_type() == at::kFloat && mode == Mode::Bilinear && W < (int64_t(1) << 31) && cpu_has_avx512()) {
    const float* xp = x.const_data_ptr<float>();
    float* outp = out.data_ptr<float>();
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      SampleTables t;  // rebuilt only when the size changes
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C;
        t.build(H, W, sp[b]);
        plane_f32(xp + p * H * W, outp + p * O * O, O, op[2 * b], op[2 * b + 1], zeroed, t);
      }
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vars_fast_random_resize_pad_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> tmp, row;  // per-task scratch, reused across planes
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / C;
        forward_plane<scalar_t>(xp + p * H * W, outp + p * O * O, H, W, O, sp[b], op[2 * b], op[2 * b + 1], mode,
                                zeroed, tmp, row);
      }
    });
  });
  return out;
}

at::Tensor random_resize_pad_backward_cpu(const at::Tensor& grad_in, const at::Tensor& sizes_in,
                                          const at::Tensor& offsets_in, int64_t H, int64_t W, c10::string_view mode_s) {
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(2) == grad_in.size(3),
              "vars_fast::random_resize_pad_backward: grad_out must be [B, C, O, O], got ", grad_in.sizes());
  const Mode mode = parse_resize_mode(mode_s);
  const auto g = grad_in.contiguous();
  const auto sizes = sizes_in.contiguous(), offsets = offsets_in.contiguous();
  const int64_t B = g.size(0), C = g.size(1), O = g.size(2);
  check_draws(g, sizes, offsets, O);
  bool zeroed = false;
  auto gx = empty_cpu_large({B, C, H, W}, g.scalar_type(), &zeroed);
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
        // A fresh mapping is already zero where grad_x is accumulated in place.
        backward_plane<scalar_t>(gp + p * O * O, dst, H, W, O, sp[b], op[2 * b], op[2 * b + 1], mode,
                                 zeroed && std::is_same_v<scalar_t, opmath_t>, tmp);
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
