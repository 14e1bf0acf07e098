// What the device-specific kernels of dler_kernels._C receive: checked, converted tensors and the
// loss options. The op wrappers in ops.cpp build these; cpu/ and cuda/ implement the kernels.
#pragma once

// The core tensor type only: this header reaches the CUDA sources, where <ATen/ATen.h> (every ATen op) would
// be parsed once per GPU arch by nvcc's device front end. The .cpp files that call ATen ops include it themselves.
#include <ATen/core/Tensor.h>

#include "policy_loss_math.h"

namespace dler {

// One sweep over the rows of a logits matrix: the softmax statistics, log-prob and entropy of each
// row; with compute_loss also its loss, KL, and the state a later pass needs (log-sum-exp,
// d loss / d log-prob, d loss / d entropy); with a defined grad, d(loss)/d(logits) written into it.
struct RowTask {
  at::Tensor logits;   // [N, V] float16/bfloat16/float32/float64, stride(1) == 1
  at::Tensor grad;     // undefined, or [N, V] like logits, stride(1) == 1 (may be logits itself)
  at::Tensor targets;  // [N] int64, in [0, V) on valid rows
  at::Tensor valid;    // [N] bool
  at::Tensor old, adv, ref, weights;  // [N] in the accumulation dtype (ref: only with a KL term)
  bool compute_loss = false;
  LossParams params;
  // Outputs, [N] in the accumulation dtype (float64 for float64 logits, else float32); 0 on masked rows.
  at::Tensor logp, entropy, loss, kl, lse, dlogp, dent;
};

// The vocab pass of the fused-linear path: a slab holding the logits of vocab columns
// col0 .. col0 + W of every row becomes their gradient, from the row state of an earlier RowTask.
struct SlabTask {
  at::Tensor slab;  // [N, W], stride(1) == 1; overwritten
  at::Tensor targets, valid, lse, entropy, dlogp, dent;  // [N]
  int64_t col0 = 0;
  double inv_temp = 1.0;
};

void rows_cpu(const RowTask& task);
void slab_grad_cpu(const SlabTask& task);
#ifdef DLER_WITH_CUDA
void rows_cuda(const RowTask& task);
void slab_grad_cuda(const SlabTask& task);
#endif

}  // namespace dler
