// Picks the build of cpu/kernels.h for this CPU: the instruction set ATen itself uses
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|avx512).
#include <ATen/Context.h>
#include <ATen/Version.h>

#include <string>

#include "../ops.h"

namespace dler {
namespace DEFAULT {
void rows(const RowTask&);
void slab_grad(const SlabTask&);
}  // namespace DEFAULT
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DLER_X86_KERNELS
namespace AVX2 {
void rows(const RowTask&);
void slab_grad(const SlabTask&);
}  // namespace AVX2
namespace AVX512 {
void rows(const RowTask&);
void slab_grad(const SlabTask&);
}  // namespace AVX512
#endif

namespace {
enum class Isa { kDefault, kAvx2, kAvx512 };

Isa detect() {
#ifdef DLER_X86_KERNELS
  const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
  if (cap == "AVX512") return Isa::kAvx512;
  if (cap == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa isa() {
  static const Isa value = detect();  // ATen fixes its capability once per process, too
  return value;
}
}  // namespace

const char* cpu_kernel_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

void rows_cpu(const RowTask& task) {
#ifdef DLER_X86_KERNELS
  switch (isa()) {
    case Isa::kAvx512:
      return AVX512::rows(task);
    case Isa::kAvx2:
      return AVX2::rows(task);
    default:
      break;
  }
#endif
  DEFAULT::rows(task);
}

void slab_grad_cpu(const SlabTask& task) {
#ifdef DLER_X86_KERNELS
  switch (isa()) {
    case Isa::kAvx512:
      return AVX512::slab_grad(task);
    case Isa::kAvx2:
      return AVX2::slab_grad(task);
    default:
      break;
  }
#endif
  DEFAULT::slab_grad(task);
}

}  // namespace dler
