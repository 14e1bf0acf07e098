// What kernels.h includes besides ATen's vector headers: code shared with the rest of the extension. The
// AVX2 and AVX512 builds include it before their target pragma, so that the inline functions of these
// headers are compiled for the baseline: the linker keeps one copy of each for every caller, and a copy
// compiled with AVX would crash a CPU without it. tests/kernels/test_extension.py checks the library
// (test_vector_instructions_are_only_in_the_instruction_set_builds).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "../ops.h"
