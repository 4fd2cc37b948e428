// A byte count read from the environment: the CPU kernels' settings
// KASMINA_STREAM_MIN_BYTES (blend_cpu.cpp) and KASMINA_CPU_OUTPUT_CACHE_BYTES (output_cache.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>

namespace kasmina {

// The non-negative decimal integer in environment variable `name`, or `fallback` when it is
// unset or empty. Anything else (a sign, spaces, units, overflow) raises ValueError naming
// the variable and its value; `hint` (e.g. " (0 turns it off)") follows "a non-negative integer".
inline int64_t env_byte_count(const char* name, int64_t fallback, const char* hint = "") {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && errno == 0 && value >= 0 && env[0] >= '0' && env[0] <= '9', name, "=", env,
                    " is not a byte count; use a non-negative integer", hint, " or leave it unset");
  return static_cast<int64_t>(value);
}

}  // namespace kasmina
