// Attributes of the CPU element loops (blend_cpu.cpp, telemetry_cpu.cpp).
#pragma once

#if defined(__GNUC__)
#define KASMINA_NOINLINE __attribute__((noinline))
#else
#define KASMINA_NOINLINE
#endif

// The element loops are compiled twice, for AVX2 and for baseline x86-64 (SSE2), and the
// loader picks one for the machine (GCC target_clones, an ifunc). AVX2 only, not FMA: a
// fused multiply-add rounds differently from the CUDA kernels and the reference.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KASMINA_RUN_LOOP __attribute__((noinline, target_clones("avx2", "default")))
#else
#define KASMINA_RUN_LOOP KASMINA_NOINLINE
#endif
