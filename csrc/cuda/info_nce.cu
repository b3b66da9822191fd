// info_nce CUDA kernels: tiled InfoNCE over cosine logits, no N x M buffer (see csrc/cpu/info_nce.cpp).
//
// A block of 256 threads works on [BN=16 anchors] x [BM=64 candidates] logit tiles computed in
// shared memory (d in chunks of DC=32, so any d works):
//   forward       : one block per anchor block, loop over candidate tiles, masked online
//                   log-sum-exp per row (one warp owns two rows);
//   backward (2x) : one block per anchor block accumulates dza = dS @ zc, one block per
//                   candidate block accumulates dzc = dS^T @ za; each recomputes its tiles, no
//                   atomics (deterministic).
// fp32 math (fp64 for fp64 inputs) on CUDA cores: simple and exact; the L2 normalisation and
// its backward are ATen ops around the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

namespace vars_fast {
namespace {

constexpr int kThreads = 256, BN = 16, BM = 64, DC = 32;

template <typename T>
struct Smem {
  T za[BN][DC];
  T zc[DC][BM + 1];  // transposed chunk, +1 against bank conflicts
  T s[BN][BM];
  int64_t pos[BN];
  int gq[BN];
  T lse[BN], coef[BN];
};

// sm.s[r][k] = <za[i0 + r], zc[k0 + k]> * inv_tau (0 outside [N) x [M)). All threads call it.
template <typename T>
__device__ void logit_tile(Smem<T>& sm, const T* __restrict__ za, const T* __restrict__ zc, int64_t i0, int64_t k0,
                           int64_t N, int64_t M, int64_t D, T inv_tau) {
  const int t = threadIdx.x, kq = t % BM, r0 = t / BM;  // thread: column kq, rows r0 + 4j
  T acc[BN / 4];
#pragma unroll
  for (int j = 0; j < BN / 4; ++j) acc[j] = T(0);
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    for (int e = t; e < BN * DC; e += kThreads) {
      const int r = e / DC, dd = e % DC;
      sm.za[r][dd] = (i0 + r < N && d0 + dd < D) ? za[(i0 + r) * D + d0 + dd] : T(0);
    }
    for (int e = t; e < BM * DC; e += kThreads) {
      const int k = e / DC, dd = e % DC;
      sm.zc[dd][k] = (k0 + k < M && d0 + dd < D) ? zc[(k0 + k) * D + d0 + dd] : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < DC; ++dd) {
      const T v = sm.zc[dd][kq];
#pragma unroll
      for (int j = 0; j < BN / 4; ++j) acc[j] += sm.za[r0 + 4 * j][dd] * v;
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < BN / 4; ++j) sm.s[r0 + 4 * j][kq] = acc[j] * inv_tau;
  __syncthreads();
}

__device__ __forceinline__ bool valid(int64_t k, int64_t pos, int cgk, int gq) {
  return k == pos || cgk == -1 || cgk == gq;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ za, const T* __restrict__ zc,
                                                       const int64_t* __restrict__ pos, const int* __restrict__ gq,
                                                       const int* __restrict__ cg, T* __restrict__ lse,
                                                       T* __restrict__ loss, int64_t N, int64_t M, int64_t D,
                                                       T inv_tau) {
  __shared__ Smem<T> sm;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;  // warp w owns rows 2w, 2w + 1
  const T ninf = -INFINITY;
  T m[2] = {ninf, ninf}, l[2] = {0, 0}, sp[2] = {0, 0};
  for (int64_t k0 = 0; k0 < M; k0 += BM) {
    logit_tile(sm, za, zc, i0, k0, N, M, D, inv_tau);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = 2 * w + rr;
      const int64_t a = i0 + r;
      if (a >= N) continue;
      const int64_t p = pos[a];
      const int g = gq[a];
      T v[2];
      T tmax = ninf;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t k = k0 + lane + 32 * h;
        v[h] = (k < M && valid(k, p, cg[k], g)) ? sm.s[r][lane + 32 * h] : ninf;
        tmax = max(tmax, v[h]);
      }
      tmax = warp_max(tmax);
      if (tmax == ninf) continue;
      const T mn = max(m[rr], tmax);
      T acc = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) acc += v[h] == ninf ? T(0) : exp(v[h] - mn);
      acc = warp_sum(acc);
      l[rr] = (m[rr] == ninf ? T(0) : l[rr] * exp(m[rr] - mn)) + acc;
      m[rr] = mn;
      if (p >= k0 && p < k0 + BM) sp[rr] = sm.s[r][p - k0];
    }
  }
  if (lane == 0) {
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t a = i0 + 2 * w + rr;
      if (a < N) {
        lse[a] = m[rr] + log(l[rr]);
        loss[a] = lse[a] - sp[rr];
      }
    }
  }
}

// Turns the logit tile into dS = coef * (p - onehot(pos)) in place (rows' data in sm.pos/gq/lse/coef).
template <typename T>
__device__ void ds_tile(Smem<T>& sm, const int* __restrict__ cg, int64_t i0, int64_t k0, int64_t N, int64_t M) {
  for (int e = threadIdx.x; e < BN * BM; e += kThreads) {
    const int r = e / BM, kq = e % BM;
    const int64_t k = k0 + kq;
    T d = T(0);
    if (i0 + r < N && k < M) {
      if (valid(k, sm.pos[r], cg[k], sm.gq[r])) d = sm.coef[r] * exp(sm.s[r][kq] - sm.lse[r]);
      if (k == sm.pos[r]) d -= sm.coef[r];
    }
    sm.s[r][kq] = d;
  }
  __syncthreads();
}

template <typename T>
__device__ void load_rows(Smem<T>& sm, const int64_t* pos, const int* gq, const T* lse, const T* g, int64_t i0,
                          int64_t N, T inv_tau) {
  if (threadIdx.x < BN) {
    const int64_t a = i0 + threadIdx.x;
    const bool in = a < N;
    sm.pos[threadIdx.x] = in ? pos[a] : -1;
    sm.gq[threadIdx.x] = in ? gq[a] : -3;
    sm.lse[threadIdx.x] = in ? lse[a] : T(0);
    sm.coef[threadIdx.x] = in ? g[a] * inv_tau : T(0);
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_anchor_kernel(const T* __restrict__ za, const T* __restrict__ zc,
                                                              const int64_t* __restrict__ pos,
                                                              const int* __restrict__ gq, const int* __restrict__ cg,
                                                              const T* __restrict__ lse, const T* __restrict__ g,
                                                              T* __restrict__ dza, int64_t N, int64_t M, int64_t D,
                                                              T inv_tau) {
  __shared__ Smem<T> sm;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BN;
  load_rows(sm, pos, gq, lse, g, i0, N, inv_tau);
  for (int64_t k0 = 0; k0 < M; k0 += BM) {
    logit_tile(sm, za, zc, i0, k0, N, M, D, inv_tau);
    ds_tile(sm, cg, i0, k0, N, M);
    const int kn = static_cast<int>(M - k0 < BM ? M - k0 : BM);
    for (int64_t e = threadIdx.x; e < BN * D; e += kThreads) {  // this block owns rows i0..i0+BN
      const int r = static_cast<int>(e / D);
      const int64_t dd = e % D;
      if (i0 + r >= N) continue;
      T acc = 0;
      for (int kq = 0; kq < kn; ++kq) acc += sm.s[r][kq] * zc[(k0 + kq) * D + dd];
      dza[(i0 + r) * D + dd] += acc;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_candidate_kernel(const T* __restrict__ za, const T* __restrict__ zc,
                                                                 const int64_t* __restrict__ pos,
                                                                 const int* __restrict__ gq,
                                                                 const int* __restrict__ cg, const T* __restrict__ lse,
                                                                 const T* __restrict__ g, T* __restrict__ dzc,
                                                                 int64_t N, int64_t M, int64_t D, T inv_tau) {
  __shared__ Smem<T> sm;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int kn = static_cast<int>(M - k0 < BM ? M - k0 : BM);
  for (int64_t i0 = 0; i0 < N; i0 += BN) {
    load_rows(sm, pos, gq, lse, g, i0, N, inv_tau);
    logit_tile(sm, za, zc, i0, k0, N, M, D, inv_tau);
    ds_tile(sm, cg, i0, k0, N, M);
    const int rn = static_cast<int>(N - i0 < BN ? N - i0 : BN);
    for (int64_t e = threadIdx.x; e < kn * D; e += kThreads) {  // this block owns candidates k0..k0+BM
      const int kq = static_cast<int>(e / D);
      const int64_t dd = e % D;
      T acc = 0;
      for (int r = 0; r < rn; ++r) acc += sm.s[r][kq] * za[(i0 + r) * D + dd];
      dzc[(k0 + kq) * D + dd] += acc;
    }
    __syncthreads();
  }
}

struct Prepared {
  at::Tensor za, zc, na, nc, pos, gq, cg;
};

Prepared prepare(const at::Tensor& a, const at::Tensor& c, const at::Tensor& pos, const at::Tensor& ag,
                 const at::Tensor& cg, at::ScalarType ct) {
  check_info_nce_inputs(a, c, pos, ag, cg);
  Prepared p;
  auto af = a.to(ct).contiguous(), cf = c.to(ct).contiguous();
  p.na = af.norm(2, {1});
  p.nc = cf.norm(2, {1});
  p.za = (af / p.na.clamp_min(1e-12).unsqueeze(1)).contiguous();
  p.zc = (cf / p.nc.clamp_min(1e-12).unsqueeze(1)).contiguous();
  p.pos = pos.to(at::kLong).contiguous();
  TORCH_CHECK(a.size(0) == 0 || (p.pos.min().item<int64_t>() >= 0 && p.pos.max().item<int64_t>() < c.size(0)),
              "vars_fast::info_nce: positive_index outside [0, M = ", c.size(0), ")");
  p.gq = at::where(ag >= 0, ag, at::full_like(ag, -3)).to(at::kInt).contiguous();  // -3 matches no group
  p.cg = cg.to(at::kInt).contiguous();
  return p;
}

std::tuple<at::Tensor, at::Tensor> info_nce_fwd_cuda(const at::Tensor& anchors, const at::Tensor& candidates,
                                                     const at::Tensor& positive_index, const at::Tensor& anchor_group,
                                                     const at::Tensor& candidate_group, double temperature) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  const auto ct = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = anchors.size(0), M = candidates.size(0), D = anchors.size(1);
  TORCH_CHECK(M > 0 || N == 0, "vars_fast::info_nce: no candidates");
  Prepared p = prepare(anchors, candidates, positive_index, anchor_group, candidate_group, ct);
  at::Tensor lse = at::empty({N}, p.za.options()), loss = at::empty({N}, p.za.options());
  if (N) {
    AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_fwd_cuda", [&] {
      fwd_kernel<scalar_t><<<(N + BN - 1) / BN, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.za.const_data_ptr<scalar_t>(), p.zc.const_data_ptr<scalar_t>(), p.pos.const_data_ptr<int64_t>(),
          p.gq.const_data_ptr<int>(), p.cg.const_data_ptr<int>(), lse.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(),
          N, M, D, static_cast<scalar_t>(1.0 / temperature));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {loss.to(anchors.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& anchors,
                                                     const at::Tensor& candidates, const at::Tensor& positive_index,
                                                     const at::Tensor& anchor_group, const at::Tensor& candidate_group,
                                                     const at::Tensor& lse_in, double temperature) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  const auto ct = anchors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = anchors.size(0), M = candidates.size(0), D = anchors.size(1);
  if (N == 0 || M == 0) return {at::zeros_like(anchors), at::zeros_like(candidates)};
  Prepared p = prepare(anchors, candidates, positive_index, anchor_group, candidate_group, ct);
  const at::Tensor g = grad_loss.to(ct).contiguous(), lse = lse_in.to(ct).contiguous();
  at::Tensor dza = at::zeros_like(p.za), dzc = at::zeros_like(p.zc);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ct, "info_nce_bwd_cuda", [&] {
    const scalar_t it = static_cast<scalar_t>(1.0 / temperature);
    bwd_anchor_kernel<scalar_t><<<(N + BN - 1) / BN, kThreads, 0, stream>>>(
        p.za.const_data_ptr<scalar_t>(), p.zc.const_data_ptr<scalar_t>(), p.pos.const_data_ptr<int64_t>(),
        p.gq.const_data_ptr<int>(), p.cg.const_data_ptr<int>(), lse.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(), dza.data_ptr<scalar_t>(), N, M, D, it);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_candidate_kernel<scalar_t><<<(M + BM - 1) / BM, kThreads, 0, stream>>>(
        p.za.const_data_ptr<scalar_t>(), p.zc.const_data_ptr<scalar_t>(), p.pos.const_data_ptr<int64_t>(),
        p.gq.const_data_ptr<int>(), p.cg.const_data_ptr<int>(), lse.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(), dzc.data_ptr<scalar_t>(), N, M, D, it);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Normalisation backward: z = x / max(|x|, eps) -> dx = (dz - z (z . dz)) / |x| (or dz / eps).
  auto norm_bwd = [](const at::Tensor& z, const at::Tensor& nrm, const at::Tensor& dz) {
    auto proj = dz - z * (z * dz).sum(1, true);
    return at::where((nrm > 1e-12).unsqueeze(1), proj / nrm.clamp_min(1e-12).unsqueeze(1), dz / 1e-12);
  };
  return {norm_bwd(p.za, p.na, dza).to(anchors.scalar_type()), norm_bwd(p.zc, p.nc, dzc).to(candidates.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vars_fast, CUDA, m) {
  m.impl("info_nce", &info_nce_fwd_cuda);
  m.impl("info_nce_backward", &info_nce_bwd_cuda);
}

}  // namespace vars_fast
