// The baseline build of kernels.h (any CPU; at::vec's scalar fallbacks outside x86).
#define CPU_CAPABILITY DEFAULT
#include "kernels.h"
