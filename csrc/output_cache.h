// Memory of the CPU blend kernels' outputs (blend_cpu.cpp).
//
// glibc gives the free memory at the top of its heap back to the kernel once more than
// M_TRIM_THRESHOLD bytes lie there, a threshold it sets to twice the largest block it has
// recently unmapped. The backward returns grad_base and grad_blueprint_out of one size;
// freeing both (zero_grad(set_to_none=True), or the next iteration of a loop) can trim
// the heap, and the next call then faults in every page of its outputs again: here
// 6-7 ms instead of 0.3-0.8 ms for a 64x16384 float32 backward, about 2 µs per 4 KB
// page. Which calls fall into this depends on the process's allocation history.
//
// So outputs of kMinCachedBytes or more come from a cache of the blocks earlier outputs
// were freed from, reused for an output needing the same number of pages. It holds at
// most KASMINA_CPU_OUTPUT_CACHE_BYTES (default 256 MiB; 0 turns it off), freeing its
// oldest blocks past that; release_output_cache() frees all it holds, as does an
// allocation that finds no memory. Cached blocks bypass torch's CPU allocator, so the
// memory profiler does not see them. Consecutive new blocks start their data at different
// offsets into a page (see kStoreAliasBytes).
//
// Blocks also remember when a kernel last began writing them, on a clock counting the bytes
// the kernels move (see mark_written), so that a kernel can tell an output whose memory is
// likely still cached from one whose memory has long left the cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kasmina {

// Non-temporal stores to two buffers whose addresses agree in their low 12 bits, or differ
// there by less than this, were 3-16 times slower here (AMD EPYC under KVM) than to buffers
// further apart. The cache gives its blocks page offsets this far apart (colours).
constexpr uintptr_t kStoreAliasBytes = 256;
constexpr uintptr_t kPageBytes = 4096;

// Whether a and b are kStoreAliasBytes or more apart modulo a page, either way round.
inline bool apart_in_page(const void* a, const void* b) {
  const uintptr_t delta = (reinterpret_cast<uintptr_t>(a) - reinterpret_cast<uintptr_t>(b)) % kPageBytes;
  return delta >= kStoreAliasBytes && delta <= kPageBytes - kStoreAliasBytes;
}

// An uninitialised contiguous CPU tensor.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Advances the clock of bytes moved by the CPU blend kernels by `bytes`; returns its value
// before, the start of the calling kernel.
uint64_t advance_blend_clock(uint64_t bytes);

// Marks `out`'s memory written at `now` (a value of advance_blend_clock) and returns the bytes
// the blend kernels moved between the start of the kernel that wrote it before and `now`: 0
// when none did (a new cache block, or an output too small for the cache).
uint64_t mark_written(const at::Tensor& out, uint64_t now);

// Bytes the cache holds now, and the most it holds.
int64_t output_cache_bytes();
int64_t output_cache_limit();

// Frees every block the cache holds.
void release_output_cache();

}  // namespace kasmina
