// The AVX512 build of kernels.h, used when ATen reports AVX512 for this CPU (cpu/dispatch.cpp).
// A target pragma instead of a compiler flag, so that the rest of the extension (and anything run
// at load time) stays baseline x86-64: loading the extension never executes a AVX512 instruction.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include "shared_headers.h"  // compiled for the baseline, before the pragma (see there)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC's target pragma enables the instructions but not the feature macros that sleef.h and
// at::vec test; define them for the rest of this file, as the matching -m flags would.
#ifndef __AVX2__
#ifndef __AVX__
#define __AVX__ 1
#endif
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.h"
#pragma GCC pop_options
#endif
