// The per-token arithmetic of the policy loss, shared by the CPU and CUDA kernels (and equal to
// the Triton kernel's): from a row's log-prob and entropy to its loss, KL and the derivatives of
// the aggregated loss w.r.t. that log-prob and entropy. Semantics: dler_kernels/reference.py; each
// token-local objective's formula: its file in dler_kernels/objectives/ (the one definition, which the
// tests compare these kernels with).
#pragma once

#include <math.h>
#include <cstdint>

#if defined(__CUDACC__)
#define DLER_HD __host__ __device__ __forceinline__
#else
#define DLER_HD inline
#endif

namespace dler {

// Codes of kl_type, as passed by dler_kernels (reference.KL_CODES): 0 = no KL term; kK3Ratio is k3
// times the importance ratio (TRL's use_bias_correction_kl).
enum KlCode : int64_t { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3, kK3Ratio = 4 };

// Codes of the token-local objectives with a fused kernel (Objective.kernel_code in
// dler_kernels/objectives/): a token's loss depends on its own log-prob only.
enum ObjectiveCode : int64_t { kPpoClip = 0, kCispo = 1, kSapo = 2, kDppoTv = 3, kDppoKl = 4 };

constexpr double kLogRatioClamp = 20.0;
constexpr double kKlClamp = 10.0;
constexpr double kBinaryKlEps = 1e-8;  // objectives/dppo.py BINARY_KL_EPS (verl's guard in the binary KL)

struct LossParams {
  double inv_temp = 1.0;
  int64_t objective = kPpoClip;
  double eps_low = 0.2;  // CISPO's upper-only clip: +inf (its lower bound 1 - eps_low is then -inf)
  double eps_high = 0.28;
  bool has_dual = false;
  double clip_c = 0.0;
  double ratio_cap = 20.0;  // DPPO: the cap of the stop-gradient ratio
  double tau_pos = 1.0;     // SAPO: the gate's temperature for A > 0
  double tau_neg = 1.05;    // SAPO: for A <= 0
  double beta = 0.0;
  int64_t kl_type = kNoKl;
  double entropy_coef = 0.0;
};

template <typename acc_t>
struct RowTerms {
  acc_t loss;   // per-token loss (before the aggregation weight)
  acc_t kl;     // KL term (0 without one)
  acc_t dlogp;  // d(aggregated loss) / d(log-prob of the target)
  acc_t dent;   // d(aggregated loss) / d(entropy of the row)
};

// NaN-propagating clamp and max: a non-finite row must give a non-finite loss (as the reference
// does), where fmin/fmax would quietly drop the NaN.
// exp in the accumulation type: expf for float (never a silent promotion to double), exp for double.
DLER_HD float exp_acc(float x) { return expf(x); }
DLER_HD double exp_acc(double x) { return exp(x); }
DLER_HD float log_acc(float x) { return logf(x); }
DLER_HD double log_acc(double x) { return log(x); }

template <typename T>
DLER_HD T clamp_nan(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename T>
DLER_HD T max_nan(T a, T b) {
  return (a != a || a >= b) ? a : b;
}

template <typename acc_t>
struct PgTerms {
  acc_t pg;  // the objective's per-token policy loss
  acc_t g;   // its derivative w.r.t. the log-prob
};

// PPO-clip with clip-higher and the dual clip (objectives/ppo_clip.py).
template <typename acc_t>
DLER_HD PgTerms<acc_t> ppo_clip_terms(acc_t adv, acc_t ratio, acc_t dratio, const LossParams& p) {
  const acc_t pg_unclipped = -adv * ratio;
  const acc_t pg_clipped = -adv * clamp_nan(ratio, acc_t(1.0 - p.eps_low), acc_t(1.0 + p.eps_high));
  acc_t pg = max_nan(pg_unclipped, pg_clipped);
  // Inside the clip range both branches are equal and share the gradient -A; outside it the
  // clipped branch wins only when it is constant.
  acc_t dpg = pg_unclipped >= pg_clipped ? -adv : acc_t(0);
  if (p.has_dual) {
    const acc_t cap = -acc_t(p.clip_c) * adv;
    if (adv < acc_t(0) && pg > cap) {
      pg = cap;
      dpg = acc_t(0);
    }
  }
  return {pg, dpg * dratio};
}

// The token-local objectives (each one's file in dler_kernels/objectives/). ratio is r = exp(clamped log r),
// dratio its derivative w.r.t. the log-prob (0 where the clamp acts).
template <typename acc_t>
DLER_HD PgTerms<acc_t> objective_terms(acc_t logp, acc_t old, acc_t adv, acc_t ratio, acc_t dratio,
                                       const LossParams& p) {
  if (p.objective == kCispo) {  // -sg(clip(r)) A log pi
    const acc_t w = clamp_nan(ratio, acc_t(1.0 - p.eps_low), acc_t(1.0 + p.eps_high));
    return {-w * adv * logp, -w * adv};
  }
  if (p.objective == kSapo) {  // -A (4 / tau) sigmoid(tau (r - 1))
    const acc_t tau = adv > acc_t(0) ? acc_t(p.tau_pos) : acc_t(p.tau_neg);
    const acc_t s = acc_t(1) / (acc_t(1) + exp_acc(-tau * (ratio - acc_t(1))));
    return {-adv * (acc_t(4) / tau) * s, -acc_t(4) * adv * s * (acc_t(1) - s) * dratio};
  }
  if (p.objective == kDppoTv || p.objective == kDppoKl) {  // -A sg(min(r, C)) log pi, on the kept tokens
    const acc_t prob = exp_acc(logp), old_prob = exp_acc(old);
    bool keep;
    if (p.objective == kDppoTv) {
      const acc_t moved = prob - old_prob;
      keep = adv > acc_t(0) ? moved <= acc_t(p.eps_high) : moved >= -acc_t(p.eps_low);
    } else {
      const acc_t eps = acc_t(kBinaryKlEps);
      const acc_t kl = old_prob * (old - logp) +
                       (acc_t(1) - old_prob) * log_acc((acc_t(1) - old_prob + eps) / (acc_t(1) - prob + eps));
      keep = adv > acc_t(0) ? (kl <= acc_t(p.eps_high) || prob <= old_prob)
                            : (kl <= acc_t(p.eps_low) || prob >= old_prob);
    }
    const acc_t w = ratio > acc_t(p.ratio_cap) ? acc_t(p.ratio_cap) : ratio;  // NaN stays NaN, as torch.clamp
    const acc_t m = keep ? acc_t(1) : acc_t(0);  // a factor, as in the reference: NaN * 0 stays NaN
    return {-adv * w * logp * m, -adv * w * m};
  }
  return ppo_clip_terms(adv, ratio, dratio, p);
}

template <typename acc_t>
DLER_HD RowTerms<acc_t> row_terms(acc_t logp, acc_t entropy, acc_t old, acc_t adv, acc_t ref, acc_t weight,
                                  const LossParams& p) {
  const acc_t lim = acc_t(kLogRatioClamp);
  // Importance ratio with the log-ratio clamped to +-20 (no gradient outside).
  const acc_t d = logp - old;
  const acc_t ratio = exp_acc(clamp_nan(d, -lim, lim));
  const acc_t dratio = (d >= -lim && d <= lim) ? ratio : acc_t(0);
  const PgTerms<acc_t> pgt = objective_terms(logp, old, adv, ratio, dratio, p);
  acc_t g = pgt.g;
  acc_t loss = pgt.pg;
  acc_t kl = acc_t(0);
  if (p.kl_type != kNoKl) {
    acc_t dkl;
    if (p.kl_type == kK1) {
      kl = logp - ref;
      dkl = acc_t(1);
    } else if (p.kl_type == kK2) {
      kl = acc_t(0.5) * (logp - ref) * (logp - ref);
      dkl = logp - ref;
    } else {
      const acc_t dd = ref - logp;
      const acc_t ddc = clamp_nan(dd, -lim, lim);
      const acc_t e = exp_acc(ddc);
      const acc_t kl_raw = e - ddc - acc_t(1);
      const acc_t kl_lim = acc_t(kKlClamp);
      kl = clamp_nan(kl_raw, -kl_lim, kl_lim);
      const bool inside = dd >= -lim && dd <= lim && kl_raw >= -kl_lim && kl_raw <= kl_lim;
      dkl = inside ? acc_t(1) - e : acc_t(0);
      if (p.kl_type == kK3Ratio) {  // d(kl * r) = dkl * r + kl * dr
        dkl = dkl * ratio + kl * dratio;
        kl = kl * ratio;
      }
    }
    loss += acc_t(p.beta) * kl;
    g += acc_t(p.beta) * dkl;
  }
  loss -= acc_t(p.entropy_coef) * entropy;
  return {loss, kl, g * weight, -acc_t(p.entropy_coef) * weight};
}

}  // namespace dler
