// The CPU kernels' settings read from the environment: KASMINA_STREAM_MIN_BYTES and
// KASMINA_CPU_AVX2_ROWS (blend_cpu.cpp), KASMINA_CPU_OUTPUT_CACHE_BYTES (output_cache.cpp).
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

// The switch in environment variable `name`: "0" or "1", `fallback` when unset or empty;
// anything else raises ValueError naming the variable and its value.
inline bool env_switch(const char* name, bool fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  const bool zero = env[0] == '0' && env[1] == '\0';
  const bool one = env[0] == '1' && env[1] == '\0';
  TORCH_CHECK_VALUE(zero || one, name, "=", env, " is not a switch; use 0 or 1, or leave it unset");
  return one;
}

}  // namespace kasmina
