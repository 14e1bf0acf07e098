// CPU kernels of the logits path, written once against ATen's at::vec and compiled once per
// instruction set (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp, each with its own
// CPU_CAPABILITY); cpu/dispatch.cpp picks the one ATen itself uses on this CPU.
//
// One row at a time, rows spread over threads by at::parallel_for. A row is read once, into a
// per-thread buffer of V accumulation-type values (z / T), which then stays in cache for the two
// sweeps that follow: the softmax statistics, and (when asked) the gradient, written to the output
// row in its dtype with round-to-nearest. Reading the row before writing any of the output is what
// makes the in-place case (grad is the logits) safe.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "shared_headers.h"

namespace dler {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// buf[j] = row[j] * inv_temp; returns the max of buf (NaN if any element is NaN).
template <typename scalar_t, typename acc_t>
acc_t load_scaled(const scalar_t* row, acc_t* buf, int64_t n, acc_t inv_temp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(row[j]);
  }
  const acc_t* src = reinterpret_cast<const acc_t*>(std::is_same_v<scalar_t, acc_t> ? (const void*)row : buf);
  const Vec vinv(inv_temp);
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec z = Vec::loadu(src + j) * vinv;
    z.store(buf + j);
    vmax = at::vec::maximum(vmax, z);
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < n; ++j) {
    const acc_t z = src[j] * inv_temp;
    buf[j] = z;
    m = (z != z || z > m) ? z : m;
  }
  return m;
}

// s = sum exp(z - m) and t = sum exp(z - m) (z - m) over buf (z - m, not z: then the entropy
// log s - t / s is a difference of terms of its own size, not of |z|). Summed in blocks whose
// partial sums are added in double: a long row (V = 150k) in float32 lanes alone would lose ~1e-4.
// m must be finite or NaN (a row of only -inf has no sums). A -inf logit adds 0 to both (p log p = 0
// at p = 0), but its e (z - m) is 0 * -inf = NaN: a block whose t is NaN while its s is not (a NaN
// or +inf logit makes s NaN too) is summed again with z - m floored at the lowest finite number, so
// that a row without -inf pays nothing for it. Returns whether that happened (the row holds a -inf).
template <typename acc_t>
bool exp_sums(const acc_t* buf, int64_t n, acc_t m, double& s, double& t) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kBlock = 64 * W;
  constexpr acc_t lowest = std::numeric_limits<acc_t>::lowest();
  const Vec vm(m), vlowest(lowest);
  auto add = [](Vec& a, Vec& b) { return a + b; };
  s = t = 0.0;
  bool has_minus_inf = false;
  int64_t j = 0;
  while (j + W <= n) {
    Vec vs(acc_t(0)), vt(acc_t(0));
    const int64_t block_begin = j;
    const int64_t block_end = std::min(n - W, j + kBlock - W);
    for (; j <= block_end; j += W) {
      const Vec d = Vec::loadu(buf + j) - vm;
      const Vec e = d.exp();
      vs = vs + e;
      vt = at::vec::fmadd(e, d, vt);
    }
    const double block_s = at::vec::vec_reduce_all<acc_t>(add, vs);
    double block_t = at::vec::vec_reduce_all<acc_t>(add, vt);
    if (std::isnan(block_t) && !std::isnan(block_s)) {
      has_minus_inf = true;
      vt = Vec(acc_t(0));
      for (int64_t k = block_begin; k < j; k += W) {
        const Vec d = Vec::loadu(buf + k) - vm;
        vt = at::vec::fmadd(d.exp(), at::vec::clamp_min(d, vlowest), vt);  // one max; a NaN passes it
      }
      block_t = at::vec::vec_reduce_all<acc_t>(add, vt);
    }
    s += block_s;
    t += block_t;
  }
  for (; j < n; ++j) {
    const acc_t d = buf[j] - m;
    const acc_t e = std::exp(d);
    s += e;
    if (d < lowest) {
      has_minus_inf = true;
    } else {
      t += e * d;
    }
  }
  return has_minus_inf;
}

// Where write_grad floors log p: far below where exp underflows to 0 (-104 in float32, -745 in float64),
// far above where the entropy term's c (log p + H) could overflow (|c| up to 1e18).
constexpr double kLogProbFloor = -1e20;

// buf (z / T of columns col0 ..) becomes d(loss)/d(logits), the formula of the Triton _grad_tile:
// [a (onehot - p) - c p (log p + H)] / T with a = dlogp, c = dent; then written to out. lse must be
// finite or NaN. A -inf logit gets exactly 0 (p log p = 0 at p = 0): with floor_logp, log p is floored
// at kLogProbFloor (one max per element, which a NaN passes), so that its p = 0 meets a finite factor
// instead of 0 * -inf; no other log p whose p is not already 0 is that low. Without floor_logp (a row
// that exp_sums found free of -inf) the sweep skips the max.
template <typename scalar_t, typename acc_t>
void write_grad(acc_t* buf, scalar_t* out, int64_t n, int64_t local_target, acc_t lse, acc_t entropy, acc_t dlogp,
                acc_t dent, acc_t inv_temp, bool floor_logp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr acc_t floor = acc_t(kLogProbFloor);
  const Vec vlse(lse), vent(entropy), va(dlogp), vc(dent), vinv(inv_temp), vfloor(floor);
  const bool has_target = local_target >= 0 && local_target < n;
  const acc_t z_target = has_target ? buf[local_target] : acc_t(0);
  auto sweep = [&](auto floored) {
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      Vec logp = Vec::loadu(buf + j) - vlse;
      if constexpr (decltype(floored)::value) logp = at::vec::clamp_min(logp, vfloor);
      const Vec p = logp.exp();
      const Vec g = -(p * at::vec::fmadd(vc, logp + vent, va)) * vinv;
      g.store(buf + j);
    }
    for (; j < n; ++j) {
      const acc_t d = buf[j] - lse;
      const acc_t logp = decltype(floored)::value && d < floor ? floor : d;
      const acc_t p = std::exp(logp);
      buf[j] = -(p * (dlogp + dent * (logp + entropy))) * inv_temp;
    }
  };
  if (floor_logp) {
    sweep(std::true_type{});
  } else {
    sweep(std::false_type{});
  }
  if (has_target) {
    // Recomputed rather than incremented: (-p a - ... + a) / T, the order of the Triton kernel, is
    // exactly 0 where p = 1 (a one-column vocab); adding a / T to the rounded product is not.
    const acc_t logp = z_target - lse;
    const acc_t p = std::exp(logp);
    buf[local_target] = z_target == -std::numeric_limits<acc_t>::infinity()
                            ? acc_t(0)
                            : (dlogp - p * (dlogp + dent * (logp + entropy))) * inv_temp;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(out, buf, n * sizeof(acc_t));
  } else {
    at::vec::convert(buf, out, n);  // round to nearest even, as a torch .to() would
  }
}

template <typename scalar_t>
void zero_row(scalar_t* out, int64_t n) {
  std::fill(out, out + n, scalar_t(0));
}

template <typename scalar_t, typename acc_t>
void rows_impl(const RowTask& t) {
  const int64_t n = t.logits.size(0), vocab = t.logits.size(1);
  const scalar_t* logits = t.logits.const_data_ptr<scalar_t>();
  const int64_t ls = t.logits.stride(0);
  scalar_t* grad = t.grad.defined() ? t.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t gs = t.grad.defined() ? t.grad.stride(0) : 0;
  const int64_t* targets = t.targets.const_data_ptr<int64_t>();
  const bool* valid = t.valid.const_data_ptr<bool>();
  const acc_t* old = t.compute_loss ? t.old.const_data_ptr<acc_t>() : nullptr;
  const acc_t* adv = t.compute_loss ? t.adv.const_data_ptr<acc_t>() : nullptr;
  const acc_t* weights = t.compute_loss ? t.weights.const_data_ptr<acc_t>() : nullptr;
  const acc_t* ref = t.ref.defined() ? t.ref.const_data_ptr<acc_t>() : nullptr;
  acc_t* logp_out = t.logp.mutable_data_ptr<acc_t>();
  acc_t* ent_out = t.entropy.mutable_data_ptr<acc_t>();
  acc_t* loss_out = t.loss.mutable_data_ptr<acc_t>();
  acc_t* kl_out = t.kl.mutable_data_ptr<acc_t>();
  acc_t* lse_out = t.lse.mutable_data_ptr<acc_t>();
  acc_t* dlogp_out = t.dlogp.mutable_data_ptr<acc_t>();
  acc_t* dent_out = t.dent.mutable_data_ptr<acc_t>();
  const LossParams p = t.params;
  const acc_t inv_temp = acc_t(p.inv_temp);

  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buf(new acc_t[vocab]);
    for (int64_t r = begin; r < end; ++r) {
      logp_out[r] = ent_out[r] = loss_out[r] = kl_out[r] = lse_out[r] = dlogp_out[r] = dent_out[r] = acc_t(0);
      if (!valid[r]) {
        if (grad) zero_row(grad + r * gs, vocab);
        continue;
      }
      const int64_t target = targets[r];
      TORCH_CHECK(target >= 0 && target < vocab, "targets must lie in [0, ", vocab, ") on valid rows, found ",
                  target, " at row ", r);
      const acc_t m = load_scaled<scalar_t, acc_t>(logits + r * ls, buf.get(), vocab, inv_temp);
      // Every logit -inf: no distribution, the target's probability is 0 (log-prob -inf, which the public
      // ops refuse), entropy 0 and gradient 0. (m is NaN on a row holding a NaN.)
      constexpr acc_t minus_inf = -std::numeric_limits<acc_t>::infinity();
      const bool no_mass = m == minus_inf;
      double s = 0.0, sd = 0.0;
      const bool has_minus_inf = !no_mass && exp_sums<acc_t>(buf.get(), vocab, m, s, sd);
      const acc_t lse = no_mass ? minus_inf : m + acc_t(std::log(s));
      const acc_t entropy = no_mass ? acc_t(0) : acc_t(std::log(s) - sd / s);
      const acc_t logp = no_mass ? minus_inf : buf[target] - lse;
      logp_out[r] = logp;
      ent_out[r] = entropy;
      if (!t.compute_loss) continue;
      const RowTerms<acc_t> terms =
          row_terms<acc_t>(logp, entropy, old[r], adv[r], ref ? ref[r] : acc_t(0), weights[r], p);
      loss_out[r] = terms.loss;
      kl_out[r] = terms.kl;
      lse_out[r] = lse;
      dlogp_out[r] = terms.dlogp;
      dent_out[r] = terms.dent;
      if (grad && no_mass) {
        zero_row(grad + r * gs, vocab);
      } else if (grad) {
        write_grad<scalar_t, acc_t>(buf.get(), grad + r * gs, vocab, target, lse, entropy, terms.dlogp, terms.dent,
                                    inv_temp, has_minus_inf);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void slab_impl(const SlabTask& t) {
  const int64_t n = t.slab.size(0), width = t.slab.size(1);
  scalar_t* slab = t.slab.mutable_data_ptr<scalar_t>();
  const int64_t ss = t.slab.stride(0);
  const int64_t* targets = t.targets.const_data_ptr<int64_t>();
  const bool* valid = t.valid.const_data_ptr<bool>();
  const acc_t* lse = t.lse.const_data_ptr<acc_t>();
  const acc_t* entropy = t.entropy.const_data_ptr<acc_t>();
  const acc_t* dlogp = t.dlogp.const_data_ptr<acc_t>();
  const acc_t* dent = t.dent.const_data_ptr<acc_t>();
  const acc_t inv_temp = acc_t(t.inv_temp);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<acc_t[]> buf(new acc_t[width]);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = slab + r * ss;
      if (!valid[r] || lse[r] == -std::numeric_limits<acc_t>::infinity()) {  // the latter: a row of only -inf
        zero_row(row, width);
        continue;
      }
      load_scaled<scalar_t, acc_t>(row, buf.get(), width, inv_temp);
      // floored always: whether this slice holds a -inf is not known without another pass over it
      write_grad<scalar_t, acc_t>(buf.get(), row, width, targets[r] - t.col0, lse[r], entropy[r], dlogp[r], dent[r],
                                  inv_temp, /*floor_logp=*/true);
    }
  });
}

// float64 logits accumulate in float64, every other dtype in float32.
#define DLER_DISPATCH_FLOATING(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {                       \
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;              \
    __VA_ARGS__();                                                                                  \
  })

void rows(const RowTask& task) {
  DLER_DISPATCH_FLOATING(task.logits.scalar_type(), "dler_rows_cpu", [&] { rows_impl<scalar_t, acc_t>(task); });
}

void slab_grad(const SlabTask& task) {
  DLER_DISPATCH_FLOATING(task.slab.scalar_type(), "dler_slab_grad_cpu", [&] { slab_impl<scalar_t, acc_t>(task); });
}

}  // namespace CPU_CAPABILITY
}  // namespace dler
