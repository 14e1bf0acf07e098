// dler_kernels._C: the logits-path ops of dler_kernels as PyTorch custom ops (namespace ``dler``).
//
//   policy_loss        functional: loss, per-token outputs and (with write_grad) d loss / d logits;
//                      its autograd formula and fake (meta) implementation are registered from
//                      Python (dler_kernels/_ext.py), so torch.compile traces through it.
//   policy_loss_rows_  the same sweep writing the gradient into a given tensor (in place over the
//                      logits when it is them) and returning the per-row state of the fused-linear path.
//   token_logprobs     log-prob and entropy per row; a negative target marks a padding row (both 0).
//   slab_grad_         the vocab pass of the fused-linear path.
//
// The user-facing validation (with messages naming the argument of the public Python API) is in
// dler_kernels/validate.py and runs before these ops; the checks here guard memory safety for
// direct callers of torch.ops.dler.*, and refuse what a conversion would silently change (float
// targets, a non-bool valid) or what has no meaning (a vocab of 0 columns).
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#ifndef DLER_TORCH_VERSION
#define DLER_TORCH_VERSION "unknown"
#endif
#ifndef DLER_SOURCES_HASH
#define DLER_SOURCES_HASH "unknown"
#endif

// Bumped whenever a schema or a semantic of these ops changes; dler_kernels/_ext.py refuses an
// extension built with another value (a stale build) and falls back.
#define DLER_ABI_VERSION 2

namespace dler {

const char* cpu_kernel_isa();  // cpu/dispatch.cpp

namespace {

using OptTensor = std::optional<at::Tensor>;

at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [N, V], got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, name,
              " must be float16/bfloat16/float32/float64, got ", dt);
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
              " must be contiguous in the vocab dimension (stride(1) == 1), got strides ", t.strides());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  check_matrix(t, name);
  TORCH_CHECK(t.sizes() == logits.sizes(), name, " must have the shape of logits ", logits.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == logits.scalar_type(), name, " must have the dtype of logits (",
              logits.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), name, " must be on ", logits.device(), " like logits, got ", t.device());
}

at::Tensor per_row(const at::Tensor& t, const char* name, int64_t n, const at::Device& device, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be 1-D with ", n, " entries (one per row), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like logits, got ", t.device());
  return t.to(dtype).contiguous();
}

// Token ids: an integer tensor, never a float one that a conversion would truncate (2.7 -> 2).
at::Tensor targets_per_row(const at::Tensor& t, int64_t n, const at::Device& device) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false),
              "targets must be an integer tensor (token ids), got ", t.scalar_type());
  return per_row(t, "targets", n, device, at::kLong);
}

// The row mask: bool only (dler_kernels turns a 0/1 mask into bool after checking it), never a
// number that a conversion would take as true (0.5, 2, NaN).
at::Tensor valid_per_row(const at::Tensor& t, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kBool, "valid must be a bool tensor, got ", t.scalar_type());
  return per_row(t, "valid", n, device, at::kBool);
}

void run_rows(const RowTask& task) {
  if (task.logits.is_cuda()) {
#ifdef DLER_WITH_CUDA
    rows_cuda(task);
    return;
#else
    TORCH_CHECK(false, "this build of dler_kernels._C has no CUDA kernels (built without nvcc)");
#endif
  }
  rows_cpu(task);
}

RowTask make_task(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& valid,
                  const OptTensor& old_logprobs, const OptTensor& advantages, const OptTensor& ref_logprobs,
                  const OptTensor& weights, double temperature, double eps_low, double eps_high,
                  std::optional<double> clip_c, double beta, int64_t kl_type, double entropy_coef,
                  int64_t objective = kPpoClip, double ratio_cap = 20.0, double tau_pos = 1.0,
                  double tau_neg = 1.05) {
  check_matrix(logits, "logits");
  TORCH_CHECK(logits.size(1) > 0, "logits must have at least one column (the vocab size V), got shape ",
              logits.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(kl_type >= kNoKl && kl_type <= kK3Ratio, "kl_type must be a code in [0, 4], got ", kl_type);
  TORCH_CHECK(objective >= kPpoClip && objective <= kDppoKl, "objective must be a code in [0, 4], got ", objective);
  const int64_t n = logits.size(0);
  const auto dev = logits.device();
  const auto acc = acc_type_of(logits);
  RowTask t;
  t.logits = logits;
  t.targets = targets_per_row(targets, n, dev);
  t.valid = valid_per_row(valid, n, dev);
  t.compute_loss = old_logprobs.has_value();
  if (t.compute_loss) {
    TORCH_CHECK(advantages.has_value() && weights.has_value(), "advantages and weights are required with old_logprobs");
    t.old = per_row(*old_logprobs, "old_logprobs", n, dev, acc);
    t.adv = per_row(*advantages, "advantages", n, dev, acc);
    t.weights = per_row(*weights, "weights", n, dev, acc);
    const bool has_kl = kl_type != kNoKl && beta != 0.0;
    if (has_kl) {
      TORCH_CHECK(ref_logprobs.has_value(), "ref_logprobs is required when beta != 0 and kl_type != 0");
      t.ref = per_row(*ref_logprobs, "ref_logprobs", n, dev, acc);
    }
    t.params.eps_low = eps_low;
    t.params.eps_high = eps_high;
    t.params.has_dual = clip_c.has_value();
    t.params.clip_c = clip_c.value_or(0.0);
    t.params.beta = beta;
    t.params.kl_type = has_kl ? kl_type : kNoKl;
    t.params.entropy_coef = entropy_coef;
    t.params.objective = objective;
    t.params.ratio_cap = ratio_cap;
    t.params.tau_pos = tau_pos;
    t.params.tau_neg = tau_neg;
  }
  t.params.inv_temp = 1.0 / temperature;
  const auto opts = logits.options().dtype(acc);
  for (at::Tensor* out : {&t.logp, &t.entropy, &t.loss, &t.kl, &t.lse, &t.dlogp, &t.dent}) {
    *out = at::empty({n}, opts);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& valid, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const OptTensor& ref_logprobs, const at::Tensor& weights, double temperature,
    double eps_low, double eps_high, std::optional<double> clip_c, double beta, int64_t kl_type, double entropy_coef,
    bool write_grad, int64_t objective, double ratio_cap, double tau_pos, double tau_neg) {
  RowTask t = make_task(logits, targets, valid, old_logprobs, advantages, ref_logprobs, weights, temperature, eps_low,
                        eps_high, clip_c, beta, kl_type, entropy_coef, objective, ratio_cap, tau_pos, tau_neg);
  if (write_grad) {
    // On the CPU a fresh buffer's pages fault in at their first write; zero-filling it first (one fast pass) costs
    // less than taking those faults inside the row loop (fwd+bwd, N=2048 V=32000 fp32 on 2 cores: 211 against
    // 271 ms; bench/RESULTS.md). CUDA memory comes from the caching allocator, already mapped.
    t.grad = logits.is_cuda() ? at::empty(logits.sizes(), logits.options())
                              : at::zeros(logits.sizes(), logits.options());
  }
  run_rows(t);
  at::Tensor grad = write_grad ? t.grad : at::empty({0}, logits.options());
  at::Tensor loss = (t.loss * t.weights).sum();
  return {loss, t.loss, t.logp, t.entropy, t.kl, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_rows_(
    at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& valid,
    const at::Tensor& old_logprobs, const at::Tensor& advantages, const OptTensor& ref_logprobs,
    const at::Tensor& weights, double temperature, double eps_low, double eps_high, std::optional<double> clip_c,
    double beta, int64_t kl_type, double entropy_coef, int64_t objective, double ratio_cap, double tau_pos,
    double tau_neg) {
  check_like(grad, "grad", logits);
  RowTask t = make_task(logits, targets, valid, old_logprobs, advantages, ref_logprobs, weights, temperature, eps_low,
                        eps_high, clip_c, beta, kl_type, entropy_coef, objective, ratio_cap, tau_pos, tau_neg);
  t.grad = grad;
  run_rows(t);
  return {t.loss, t.logp, t.entropy, t.kl, t.lse, t.dlogp, t.dent};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& targets,
                                                  double temperature) {
  check_matrix(logits, "logits");
  const at::Tensor tg = targets_per_row(targets, logits.size(0), logits.device());
  const at::Tensor valid = tg >= 0;
  RowTask t = make_task(logits, at::where(valid, tg, 0), valid, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                        temperature, 0.0, 0.0, std::nullopt, 0.0, kNoKl, 0.0);
  run_rows(t);
  return {t.logp, t.entropy};
}

void slab_grad_(at::Tensor& slab, const at::Tensor& targets, const at::Tensor& valid, const at::Tensor& lse,
                const at::Tensor& entropy, const at::Tensor& dlogp, const at::Tensor& dent, int64_t col0,
                double temperature) {
  check_matrix(slab, "slab");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const int64_t n = slab.size(0);
  const auto dev = slab.device();
  const auto acc = acc_type_of(slab);
  SlabTask t;
  t.slab = slab;
  t.targets = targets_per_row(targets, n, dev);
  t.valid = valid_per_row(valid, n, dev);
  t.lse = per_row(lse, "lse", n, dev, acc);
  t.entropy = per_row(entropy, "entropy", n, dev, acc);
  t.dlogp = per_row(dlogp, "dlogp", n, dev, acc);
  t.dent = per_row(dent, "dent", n, dev, acc);
  t.col0 = col0;
  t.inv_temp = 1.0 / temperature;
  if (slab.is_cuda()) {
#ifdef DLER_WITH_CUDA
    slab_grad_cuda(t);
    return;
#else
    TORCH_CHECK(false, "this build of dler_kernels._C has no CUDA kernels (built without nvcc)");
#endif
  }
  slab_grad_cpu(t);
}

}  // namespace

TORCH_LIBRARY(dler, m) {
  m.def(
      "policy_loss(Tensor logits, Tensor targets, Tensor valid, Tensor old_logprobs, Tensor advantages, "
      "Tensor? ref_logprobs, Tensor weights, float temperature, float eps_low, float eps_high, float? clip_c, "
      "float beta, int kl_type, float entropy_coef, bool write_grad, int objective=0, float ratio_cap=20.0, "
      "float tau_pos=1.0, float tau_neg=1.05) "
      "-> (Tensor loss, Tensor per_token, Tensor logprobs, Tensor entropy, Tensor kl, Tensor grad)");
  m.def(
      "policy_loss_rows_(Tensor(a!) grad, Tensor logits, Tensor targets, Tensor valid, Tensor old_logprobs, "
      "Tensor advantages, Tensor? ref_logprobs, Tensor weights, float temperature, float eps_low, float eps_high, "
      "float? clip_c, float beta, int kl_type, float entropy_coef, int objective=0, float ratio_cap=20.0, "
      "float tau_pos=1.0, float tau_neg=1.05) "
      "-> (Tensor per_token, Tensor logprobs, Tensor entropy, Tensor kl, Tensor lse, Tensor dlogp, Tensor dent)");
  m.def("token_logprobs(Tensor logits, Tensor targets, float temperature) -> (Tensor logprobs, Tensor entropy)");
  m.def(
      "slab_grad_(Tensor(a!) slab, Tensor targets, Tensor valid, Tensor lse, Tensor entropy, Tensor dlogp, "
      "Tensor dent, int col0, float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(dler, CPU, m) {
  m.impl("policy_loss", &policy_loss);
  m.impl("policy_loss_rows_", &policy_loss_rows_);
  m.impl("token_logprobs", &token_logprobs);
  m.impl("slab_grad_", &slab_grad_);
}

#ifdef DLER_WITH_CUDA
TORCH_LIBRARY_IMPL(dler, CUDA, m) {
  m.impl("policy_loss", &policy_loss);
  m.impl("policy_loss_rows_", &policy_loss_rows_);
  m.impl("token_logprobs", &token_logprobs);
  m.impl("slab_grad_", &slab_grad_);
}
#endif

}  // namespace dler

// A plain Python module (no pybind11): importing it loads the library, whose static initialisers
// register the ops above; its attributes describe the build.
static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(dler::cpu_kernel_isa()); }

static PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels used on this machine."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "dler_kernels C++/CUDA extension", -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "ABI_VERSION", DLER_ABI_VERSION);
  PyModule_AddStringConstant(m, "TORCH_VERSION", DLER_TORCH_VERSION);
  PyModule_AddStringConstant(m, "SOURCES_HASH", DLER_SOURCES_HASH);
#ifdef DLER_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
