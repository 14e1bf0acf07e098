// CUDA kernels of the logits path: the second GPU backend (``backend="cuda"``), next to Triton.
//
// One thread block per row, memory-bound by design: the row is read once for the softmax
// statistics (each thread carries an online (max, sum e, sum e (z - max)) over its 16-byte vectors,
// then a warp-shuffle + shared-memory reduction combines them), and once more to write the
// gradient with 16-byte stores. float32 accumulation (float64 for float64 logits); no fast-math.
// A row whose start is not 16-byte aligned takes the same kernel with one element per load.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../ops.h"

namespace dler {
namespace {

constexpr int kMaxThreads = 512;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename acc_t>
struct Stats {
  acc_t m;  // running max of z = logit / T
  acc_t s;  // sum exp(z - m)
  acc_t t;  // sum exp(z - m) (z - m)
};

__device__ __forceinline__ float fast_exp_free(float x) { return expf(x); }
__device__ __forceinline__ double fast_exp_free(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Moves a partial result to the max M >= a.m: e' = e exp(m - M), z - M = (z - m) + (m - M).
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> rescale(const Stats<acc_t>& a, acc_t M) {
  if (a.s == acc_t(0)) return {M, acc_t(0), acc_t(0)};  // empty (m = -inf): no NaN from -inf - -inf
  const acc_t shift = a.m - M;
  const acc_t f = fast_exp_free(shift);
  return {M, a.s * f, f * (a.t + a.s * shift)};
}

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> combine(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  const acc_t M = a.m > b.m ? a.m : b.m;
  const Stats<acc_t> x = rescale(a, M), y = rescale(b, M);
  return {M, x.s + y.s, x.t + y.t};
}

template <typename acc_t>
__device__ Stats<acc_t> block_combine(Stats<acc_t> v) {
  __shared__ acc_t sm[kMaxThreads / 32], ss[kMaxThreads / 32], st[kMaxThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  for (int off = 16; off > 0; off /= 2) {
    Stats<acc_t> o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
                   __shfl_xor_sync(0xffffffffu, v.t, off)};
    v = combine(v, o);
  }
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
    st[warp] = v.t;
  }
  __syncthreads();
  Stats<acc_t> r{sm[0], ss[0], st[0]};
  for (int w = 1; w < warps; ++w) r = combine(r, Stats<acc_t>{sm[w], ss[w], st[w]});
  return r;  // every thread combines the warps' results in the same order: identical values
}

template <typename scalar_t, typename acc_t>
struct RowArgs {
  const scalar_t* logits;
  int64_t logits_stride;
  scalar_t* grad;  // nullptr: no gradient
  int64_t grad_stride;
  const int64_t* targets;
  const bool* valid;
  const acc_t *old, *adv, *ref, *weights;
  acc_t *logp, *entropy, *loss, *kl, *lse, *dlogp, *dent;
  int64_t vocab;
  bool compute_loss;
  LossParams params;
};

// d(loss)/d(z_j) for one element: [a (onehot - p) - c p (log p + H)] / T (the Triton _grad_tile); exactly 0
// for a -inf logit (p log p = 0 at p = 0), where the formula would meet 0 * -inf.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_of(acc_t z, bool is_target, acc_t lse, acc_t entropy, acc_t a, acc_t c,
                                         acc_t inv_temp) {
  const acc_t logp = z - lse;
  const acc_t p = fast_exp_free(logp);
  acc_t g = -p * (a + c * (logp + entropy));
  if (is_target) g += a;
  return z == acc_t(-INFINITY) ? acc_t(0) : g * inv_temp;
}

// Writes the gradient of columns [0, width) of a row (logits at src, gradient at dst, may alias);
// target is the column of the row's target (outside [0, width): none).
template <typename scalar_t, typename acc_t, int VEC>
__device__ void write_grad_row(const scalar_t* src, scalar_t* dst, int64_t width, int64_t target, acc_t lse,
                               acc_t entropy, acc_t a, acc_t c, acc_t inv_temp) {
  const int64_t nvec = width / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<scalar_t, VEC> in = reinterpret_cast<const Pack<scalar_t, VEC>*>(src)[i];
    Pack<scalar_t, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t col = i * VEC + k;
      const acc_t z = static_cast<acc_t>(in.v[k]) * inv_temp;
      out.v[k] = static_cast<scalar_t>(grad_of(z, col == target, lse, entropy, a, c, inv_temp));
    }
    reinterpret_cast<Pack<scalar_t, VEC>*>(dst)[i] = out;
  }
  for (int64_t col = nvec * VEC + threadIdx.x; col < width; col += blockDim.x) {
    const acc_t z = static_cast<acc_t>(src[col]) * inv_temp;
    dst[col] = static_cast<scalar_t>(grad_of(z, col == target, lse, entropy, a, c, inv_temp));
  }
}

template <typename scalar_t, int VEC>
__device__ void zero_row(scalar_t* dst, int64_t width) {
  const int64_t nvec = width / VEC;
  Pack<scalar_t, VEC> zero;
#pragma unroll
  for (int k = 0; k < VEC; ++k) zero.v[k] = scalar_t(0);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) reinterpret_cast<Pack<scalar_t, VEC>*>(dst)[i] = zero;
  for (int64_t col = nvec * VEC + threadIdx.x; col < width; col += blockDim.x) dst[col] = scalar_t(0);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(RowArgs<scalar_t, acc_t> a) {
  const int64_t row = blockIdx.x;
  const int64_t V = a.vocab;
  const acc_t inv_temp = acc_t(a.params.inv_temp);
  scalar_t* grad_row = a.grad ? a.grad + row * a.grad_stride : nullptr;
  if (!a.valid[row]) {
    if (threadIdx.x == 0) {
      a.logp[row] = a.entropy[row] = a.loss[row] = a.kl[row] = acc_t(0);
      a.lse[row] = a.dlogp[row] = a.dent[row] = acc_t(0);
    }
    if (grad_row) zero_row<scalar_t, VEC>(grad_row, V);
    return;
  }
  const scalar_t* src = a.logits + row * a.logits_stride;
  const int64_t target = a.targets[row];
  CUDA_KERNEL_ASSERT(target >= 0 && target < V);
  const acc_t z_target = static_cast<acc_t>(src[target]) * inv_temp;  // read before any write to the row

  Stats<acc_t> st{-INFINITY, acc_t(0), acc_t(0)};
  const int64_t nvec = V / VEC;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<scalar_t, VEC> in = reinterpret_cast<const Pack<scalar_t, VEC>*>(src)[i];
    acc_t z[VEC];
    acc_t vmax = st.m;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      z[k] = static_cast<acc_t>(in.v[k]) * inv_temp;
      vmax = z[k] > vmax ? z[k] : vmax;  // a NaN is not picked here, but it still poisons s below
    }
    st = rescale(st, vmax);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // A -inf logit adds nothing (p log p = 0 at p = 0): skipped, as its z - vmax may be -inf - -inf and
      // e (z - vmax) is 0 * -inf. A NaN is not skipped.
      if (z[k] == acc_t(-INFINITY)) continue;
      const acc_t d = z[k] - vmax;
      const acc_t e = fast_exp_free(d);
      st.s += e;
      st.t += e * d;
    }
  }
  for (int64_t col = nvec * VEC + threadIdx.x; col < V; col += blockDim.x) {
    const acc_t z = static_cast<acc_t>(src[col]) * inv_temp;
    if (z == acc_t(-INFINITY)) continue;
    st = rescale(st, z > st.m ? z : st.m);
    const acc_t d = z - st.m;
    const acc_t e = fast_exp_free(d);
    st.s += e;
    st.t += e * d;
  }
  const Stats<acc_t> total = block_combine(st);
  // s = 0 only when every logit is -inf (a finite one adds at least exp(0), a NaN or +inf makes s NaN): no
  // distribution, the target's probability is 0 (log-prob -inf, which the public ops refuse), entropy 0
  // and, from grad_of, gradient 0; as the CPU kernels.
  const bool no_mass = total.s == acc_t(0);
  const acc_t log_s = log_acc(total.s);
  const acc_t lse = no_mass ? acc_t(-INFINITY) : total.m + log_s;
  const acc_t entropy = no_mass ? acc_t(0) : log_s - total.t / total.s;
  const acc_t logp = no_mass ? acc_t(-INFINITY) : z_target - lse;
  RowTerms<acc_t> terms{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  if (a.compute_loss) {
    terms = row_terms<acc_t>(logp, entropy, a.old[row], a.adv[row], a.ref ? a.ref[row] : acc_t(0), a.weights[row],
                             a.params);
  }
  if (threadIdx.x == 0) {
    a.logp[row] = logp;
    a.entropy[row] = entropy;
    a.loss[row] = terms.loss;
    a.kl[row] = terms.kl;
    a.lse[row] = a.compute_loss ? lse : acc_t(0);
    a.dlogp[row] = terms.dlogp;
    a.dent[row] = terms.dent;
  }
  if (grad_row && a.compute_loss) {
    __syncthreads();  // every thread's reads of the row are done before any write (grad may be the logits)
    write_grad_row<scalar_t, acc_t, VEC>(src, grad_row, V, target, lse, entropy, terms.dlogp, terms.dent, inv_temp);
  }
}

template <typename scalar_t, typename acc_t>
struct SlabArgs {
  scalar_t* slab;
  int64_t stride;
  int64_t width;
  int64_t col0;
  const int64_t* targets;
  const bool* valid;
  const acc_t *lse, *entropy, *dlogp, *dent;
  acc_t inv_temp;
};

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads) slab_kernel(SlabArgs<scalar_t, acc_t> a) {
  const int64_t row = blockIdx.x;
  scalar_t* dst = a.slab + row * a.stride;
  if (!a.valid[row]) {
    zero_row<scalar_t, VEC>(dst, a.width);
    return;
  }
  write_grad_row<scalar_t, acc_t, VEC>(dst, dst, a.width, a.targets[row] - a.col0, a.lse[row], a.entropy[row],
                                       a.dlogp[row], a.dent[row], a.inv_temp);
}

int threads_for(int64_t width, int vec) {
  const int64_t per_thread_work = (width + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && threads < per_thread_work) threads *= 2;
  return threads;
}

// 16-byte loads need every row of every matrix involved to start on a 16-byte boundary.
bool rows_aligned(const at::Tensor& t) {
  if (!t.defined()) return true;
  const int64_t bytes = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(0) <= 1 || (t.stride(0) * bytes) % 16 == 0);
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

}  // namespace

#define DLER_DISPATCH_FLOATING_CUDA(TYPE, NAME, ...)                                                 \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {                         \
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;                \
    __VA_ARGS__();                                                                                    \
  })

void rows_cuda(const RowTask& t) {
  const int64_t n = t.logits.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(t.logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vectorized = rows_aligned(t.logits) && rows_aligned(t.grad);
  DLER_DISPATCH_FLOATING_CUDA(t.logits.scalar_type(), "dler_rows_cuda", [&] {
    RowArgs<scalar_t, acc_t> a;
    a.logits = t.logits.const_data_ptr<scalar_t>();
    a.logits_stride = t.logits.stride(0);
    a.grad = t.grad.defined() ? t.grad.mutable_data_ptr<scalar_t>() : nullptr;
    a.grad_stride = t.grad.defined() ? t.grad.stride(0) : 0;
    a.targets = t.targets.const_data_ptr<int64_t>();
    a.valid = t.valid.const_data_ptr<bool>();
    a.old = ptr_or_null<acc_t>(t.old);
    a.adv = ptr_or_null<acc_t>(t.adv);
    a.ref = ptr_or_null<acc_t>(t.ref);
    a.weights = ptr_or_null<acc_t>(t.weights);
    a.logp = t.logp.mutable_data_ptr<acc_t>();
    a.entropy = t.entropy.mutable_data_ptr<acc_t>();
    a.loss = t.loss.mutable_data_ptr<acc_t>();
    a.kl = t.kl.mutable_data_ptr<acc_t>();
    a.lse = t.lse.mutable_data_ptr<acc_t>();
    a.dlogp = t.dlogp.mutable_data_ptr<acc_t>();
    a.dent = t.dent.mutable_data_ptr<acc_t>();
    a.vocab = t.logits.size(1);
    a.compute_loss = t.compute_loss;
    a.params = t.params;
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vectorized) {
      rows_kernel<scalar_t, acc_t, kVec><<<n, threads_for(a.vocab, kVec), 0, stream>>>(a);
    } else {
      rows_kernel<scalar_t, acc_t, 1><<<n, threads_for(a.vocab, 1), 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void slab_grad_cuda(const SlabTask& t) {
  const int64_t n = t.slab.size(0);
  if (n == 0 || t.slab.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(t.slab.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vectorized = rows_aligned(t.slab);
  DLER_DISPATCH_FLOATING_CUDA(t.slab.scalar_type(), "dler_slab_grad_cuda", [&] {
    SlabArgs<scalar_t, acc_t> a;
    a.slab = t.slab.mutable_data_ptr<scalar_t>();
    a.stride = t.slab.stride(0);
    a.width = t.slab.size(1);
    a.col0 = t.col0;
    a.targets = t.targets.const_data_ptr<int64_t>();
    a.valid = t.valid.const_data_ptr<bool>();
    a.lse = t.lse.const_data_ptr<acc_t>();
    a.entropy = t.entropy.const_data_ptr<acc_t>();
    a.dlogp = t.dlogp.const_data_ptr<acc_t>();
    a.dent = t.dent.const_data_ptr<acc_t>();
    a.inv_temp = acc_t(t.inv_temp);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vectorized) {
      slab_kernel<scalar_t, acc_t, kVec><<<n, threads_for(a.width, kVec), 0, stream>>>(a);
    } else {
      slab_kernel<scalar_t, acc_t, 1><<<n, threads_for(a.width, 1), 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace dler
