// info_nce CPU kernels: tiled InfoNCE over cosine logits, flash-attention style.
//
// Memory is O((N + M) * d): the normalised embeddings, one [BN, BM] logit tile per thread and,
// in the backward, one [M, d] candidate-gradient accumulator per thread. No N x M buffer.
//   forward : for a block of BN anchors, loop over BM-candidate tiles: S = za_blk @ zc_tile^T
//             (BLAS), then a masked online log-sum-exp per row (running max m, running sum l).
//   backward: recompute each tile, dS = g/tau * (softmax - onehot(pos)) on the valid set,
//             dza_blk += dS @ zc_tile, dzc_tile += dS^T @ za_blk (BLAS), then the normalisation
//             backward. One extra GEMM against the eager path (4 instead of 3), paid for by
//             never materialising, masking, exponentiating and scattering N x M matrices.
// Validity of candidate k for anchor a (see vars_fast/ops/info_nce.py):
//   k == pos[a] || cg[k] == -1 || (cg[k] >= 0 && cg[k] == ag[a]).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common.h"

namespace vars_fast {
namespace {

constexpr int64_t kBN = 128;  // anchors per task
constexpr int64_t kBM = 256;  // candidates per tile: a 128 KB fp32 logit tile stays in L2

// Multi-versioned hot loops: the extension is built for baseline x86-64, but these row loops
// do one exp per logit, so let the loader pick an AVX2/AVX-512 clone where the CPU has one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VF_CLONES
#endif

// exp(x) for x <= ~0 (Cephes expf polynomial, ~2 ulp), branch-free so `omp simd` vectorises it:
// the clamp is an integer max and the underflow a bit mask (a float clamp compiled to a branch
// under IEEE semantics and kept the loop scalar, seen with perf). Rounding of x*log2(e) uses
// truncation of (t - 0.5), exact for the t <= 0.5 we feed it.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const int32_t live = -static_cast<int32_t>(x >= -87.0f);  // below: exp underflows, return 0
  int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  ni = ni > -126 ? ni : -126;
  const float n = static_cast<float>(ni);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float e = p * std::bit_cast<float>((ni + 127) << 23);
  return std::bit_cast<float>(std::bit_cast<int32_t>(e) & live);
}
inline double exp_nonpos(double x) { return std::exp(x); }

// Row kernels. k runs over one tile row of bm candidates; cg is the tile's candidate groups,
// gq the anchor's group (-3: none), p the positive's column in this tile (-1 if elsewhere).
// Valid: k == p || cg[k] == -1 || cg[k] == gq.
//
// fp32: the validity is an all-ones/zero int mask applied with bit operations. `ok ? x : y`
// on a bool next to float math leaves gcc with "control flow in loop" for some clones (scalar
// code, seen with perf); the bit form vectorises in every clone.
__attribute__((always_inline)) inline int32_t valid_mask(int32_t c, int32_t gq, int k, int p) {
  return -static_cast<int32_t>((c == -1) | (c == gq) | (k == p));
}
__attribute__((always_inline)) inline float keep(float x, int32_t mask) {
  return std::bit_cast<float>(std::bit_cast<int32_t>(x) & mask);
}

VF_CLONES void fwd_row(const float* s, int bm, const int32_t* cg, int32_t gq, int p, float inv_tau, float& m,
                       float& l) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int32_t ninf_bits = std::bit_cast<int32_t>(ninf);
  float tmax = ninf;
#pragma omp simd reduction(max : tmax)
  for (int k = 0; k < bm; ++k) {
    const int32_t ok = valid_mask(cg[k], gq, k, p);
    const float v = std::bit_cast<float>((std::bit_cast<int32_t>(s[k]) & ok) | (ninf_bits & ~ok));
    tmax = std::max(tmax, v);
  }
  if (tmax == ninf) return;  // nothing valid in this tile
  tmax *= inv_tau;           // inv_tau > 0: scaling commutes with max
  const float mn = std::max(tmax, m);
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int k = 0; k < bm; ++k) acc += keep(exp_nonpos(s[k] * inv_tau - mn), valid_mask(cg[k], gq, k, p));
  l = (m == ninf ? 0.0f : l * std::exp(m - mn)) + acc;
  m = mn;
}

// dS[k] = coef * (p_k - [k == p]), p_k = exp(s[k] * inv_tau - lse) on valid candidates.
VF_CLONES void bwd_row(float* s, int bm, const int32_t* cg, int32_t gq, int p, float inv_tau, float lse, float coef) {
#pragma omp simd
  for (int k = 0; k < bm; ++k) s[k] = keep(coef * exp_nonpos(s[k] * inv_tau - lse), valid_mask(cg[k], gq, k, p));
  if (p >= 0) s[p] -= coef;
}

// fp64 (gradcheck): plain loops.
void fwd_row(const double* s, int bm, const int32_t* cg, int32_t gq, int p, double inv_tau, double& m, double& l) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double tmax = ninf;
  for (int k = 0; k < bm; ++k) {
    if (valid_mask(cg[k], gq, k, p)) tmax = std::max(tmax, s[k] * inv_tau);
  }
  if (tmax == ninf) return;
  const double mn = std::max(tmax, m);
  double acc = 0;
  for (int k = 0; k < bm; ++k) {
    if (valid_mask(cg[k], gq, k, p)) acc += std::exp(s[k] * inv_tau - mn);
  }
  l = (m == ninf ? 0.0 : l * std::exp(m - mn)) + acc;
  m = mn;
}
void bwd_row(double* s, int bm, const int32_t* cg, int32_t gq, int p, double inv_tau, double lse, double coef) {
  for (int k = 0; k < bm; ++k) s[k] = valid_mask(cg[k], gq, k, p) ? coef * std::exp(s[k] * inv_tau - lse) : 0.0;
  if (p >= 0) s[p] -= coef;
}

// Runs body(begin_blk, end_blk) on every thread, handing out anchor blocks one at a time
// from a shared counter: on a shared machine a descheduled thread no longer stalls a static
// half of the work (at::parallel_for splits statically).
template <typename Body>
void for_blocks(int64_t nblocks, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    body([&]() { return next.fetch_add(1); });
  });
}

struct Inputs {
  at::Tensor za, zc;          // normalised, [N, d] / [M, d], compute dtype, contiguous
  at::Tensor na, nc;          // norms before clamping, [N] / [M]
  std::vector<int32_t> cg;    // candidate groups
  std::vector<int32_t> gq;    // per anchor: the candidate group that counts as negative, or -3
  std::vector<int64_t> pos;   // positive index per anchor
};

Inputs prepare(const at::Tensor& a, const at::Tensor& c, const at::Tensor& pos, const at::Tensor& ag,
               const at::Tensor& cg, at::ScalarType ct) {
  Inputs in;
  // F.normalize semantics: x / max(||x||, 1e-12).
  auto af = a.to(ct).contiguous(), cf = c.to(ct).contiguous();
  in.na = af.norm(2, {1});
  in.nc = cf.norm(2, {1});
  in.za = af / in.na.clamp_min(1e-12).unsqueeze(1);
  in.zc = cf / in.nc.clamp_min(1e-12).unsqueeze(1);
  auto cg64 = cg.to(at::kLong).contiguous(), ag64 = ag.to(at::kLong).contiguous(),
       p64 = pos.to(at::kLong).contiguous();
  const int64_t N = a.size(0), M = c.size(0);
  in.cg.resize(M);
  in.gq.resize(N);
  in.pos.resize(N);
  for (int64_t k = 0; k < M; ++k) in.cg[k] = static_cast<int32_t>(cg64.data_ptr<int64_t>()[k]);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = ag64.data_ptr<int64_t>()[i], p = p64.data_ptr<int64_t>()[i];
    TORCH_CHECK(p >= 0 && p < M, "vars_fast::info_nce: positive_index[", i, "] = ", p, " is outside [0, ", M, ")");
    in.gq[i] = g >= 0 ? static_cast<int32_t>(g) : -3;  // -3 matches no candidate group
    in.pos[i] = p;
  }
  return in;
}

std::tuple<at::Tensor, at::Tensor> info_nce_fwd_cpu(const at::Tensor& anchors, const at::Tensor& candidates,
                                                    const at::Tensor& positive_index, const at::Tensor& anchor_group,
                                                    const at::Tensor& candidate_group, double temperature) {
  check_info_nce_inputs(anchors, candidates, positive_index, anchor_group, candidate_group);
  const auto ct = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = anchors.size(0), M = candidates.size(0);
  at::Tensor lse = at::empty({N}, anchors.options().dtype(ct));
  at::Tensor loss = at::empty({N}, anchors.options().dtype(ct));
  if (N == 0) return {loss.to(anchors.scalar_type()), lse};
  TORCH_CHECK(M > 0, "vars_fast::info_nce: no candidates");
  Inputs in = prepare(anchors, candidates, positive_index, anchor_group, candidate_group, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_fwd_cpu", [&] {
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    scalar_t* lp = lse.data_ptr<scalar_t>();
    scalar_t* op = loss.data_ptr<scalar_t>();
    const int64_t nblocks = (N + kBN - 1) / kBN;
    for_blocks(nblocks, [&](const auto& take) {
      at::Tensor S = at::empty({kBN, kBM}, in.za.options());
      std::vector<scalar_t> m(kBN), l(kBN), sp(kBN);
      for (int64_t blk = take(); blk < nblocks; blk = take()) {
        const int64_t i0 = blk * kBN, bn = std::min(kBN, N - i0);
        const at::Tensor za_b = in.za.narrow(0, i0, bn);
        std::fill(m.begin(), m.end(), -std::numeric_limits<scalar_t>::infinity());
        std::fill(l.begin(), l.end(), scalar_t(0));
        for (int64_t k0 = 0; k0 < M; k0 += kBM) {
          const int64_t bm = std::min(kBM, M - k0);
          at::Tensor St = S.narrow(0, 0, bn).narrow(1, 0, bm);
          at::mm_out(St, za_b, in.zc.narrow(0, k0, bm).t());
          const scalar_t* sp_t = S.data_ptr<scalar_t>();
          for (int64_t r = 0; r < bn; ++r) {
            const int64_t a = i0 + r;
            const scalar_t* row = sp_t + r * kBM;
            const int p = (in.pos[a] >= k0 && in.pos[a] < k0 + bm) ? static_cast<int>(in.pos[a] - k0) : -1;
            fwd_row(row, static_cast<int>(bm), in.cg.data() + k0, in.gq[a], p, inv_tau, m[r], l[r]);
            if (p >= 0) sp[r] = row[p] * inv_tau;
          }
        }
        for (int64_t r = 0; r < bn; ++r) {
          lp[i0 + r] = m[r] + std::log(l[r]);
          op[i0 + r] = lp[i0 + r] - sp[r];
        }
      }
    });
  });
  return {loss.to(anchors.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& anchors,
                                                    const at::Tensor& candidates, const at::Tensor& positive_index,
                                                    const at::Tensor& anchor_group, const at::Tensor& candidate_group,
                                                    const at::Tensor& lse, double temperature) {
  check_info_nce_inputs(anchors, candidates, positive_index, anchor_group, candidate_group);
  const auto ct = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = anchors.size(0), M = candidates.size(0), d = anchors.size(1);
  if (N == 0 || M == 0) return {at::zeros_like(anchors), at::zeros_like(candidates)};
  Inputs in = prepare(anchors, candidates, positive_index, anchor_group, candidate_group, ct);
  const at::Tensor g = grad_loss.to(ct).contiguous(), lse_c = lse.to(ct).contiguous();
  TORCH_CHECK(g.numel() == N && lse_c.numel() == N, "vars_fast::info_nce_bwd: grad_loss and lse must be [N]");
  at::Tensor dza = at::zeros({N, d}, in.za.options());
  // One [M, d] accumulator per thread (O(threads * M * d)), summed at the end.
  std::vector<at::Tensor> dzc_t(at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_bwd_cpu", [&] {
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* lp = lse_c.const_data_ptr<scalar_t>();
    const int64_t nblocks = (N + kBN - 1) / kBN;
    for_blocks(nblocks, [&](const auto& take) {
      at::Tensor& acc = dzc_t[at::get_thread_num()];
      if (!acc.defined()) acc = at::zeros({M, d}, in.za.options());
      at::Tensor S = at::empty({kBN, kBM}, in.za.options());
      for (int64_t blk = take(); blk < nblocks; blk = take()) {
        const int64_t i0 = blk * kBN, bn = std::min(kBN, N - i0);
        const at::Tensor za_b = in.za.narrow(0, i0, bn);
        at::Tensor dza_b = dza.narrow(0, i0, bn);
        for (int64_t k0 = 0; k0 < M; k0 += kBM) {
          const int64_t bm = std::min(kBM, M - k0);
          const at::Tensor zc_t = in.zc.narrow(0, k0, bm);
          at::Tensor St = S.narrow(0, 0, bn).narrow(1, 0, bm);
          at::mm_out(St, za_b, zc_t.t());
          scalar_t* sp_t = S.data_ptr<scalar_t>();
          for (int64_t r = 0; r < bn; ++r) {
            const int64_t a = i0 + r;
            const int p = (in.pos[a] >= k0 && in.pos[a] < k0 + bm) ? static_cast<int>(in.pos[a] - k0) : -1;
            bwd_row(sp_t + r * kBM, static_cast<int>(bm), in.cg.data() + k0, in.gq[a], p, inv_tau, lp[a],
                    gp[a] * inv_tau);
          }
          dza_b.addmm_(St, zc_t);
          acc.narrow(0, k0, bm).addmm_(St.t(), za_b);
        }
      }
    });
  });
  at::Tensor dzc = at::zeros({M, d}, in.za.options());
  for (auto& t : dzc_t) {
    if (t.defined()) dzc.add_(t);
  }
  // Normalisation backward: z = x / max(|x|, eps) -> dx = (dz - z (z . dz)) / |x| (or dz / eps).
  auto norm_bwd = [](const at::Tensor& z, const at::Tensor& nrm, const at::Tensor& dz) {
    auto big = nrm > 1e-12;
    auto proj = dz - z * (z * dz).sum(1, true);
    return at::where(big.unsqueeze(1), proj / nrm.clamp_min(1e-12).unsqueeze(1), dz / 1e-12);
  };
  return {norm_bwd(in.za, in.na, dza).to(anchors.scalar_type()),
          norm_bwd(in.zc, in.nc, dzc).to(candidates.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CPU, m) {
  m.impl("info_nce", &info_nce_fwd_cpu);
  m.impl("info_nce_backward", &info_nce_bwd_cpu);
}

}  // namespace vars_fast
