// The CPU blend kernels' output cache (see output_cache.h).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <mutex>
#include <new>

#include "env_settings.h"

namespace kasmina {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;  // smaller outputs take torch's CPU allocator
constexpr int64_t kDefaultLimit = int64_t{256} << 20;

// Blocks are coloured: block k's data starts (7k mod kColors) * kStoreAliasBytes into a page,
// so that blocks made one after the other (an output and the next) are 1792 bytes apart.
// Without colours the backward's grad_base and grad_blueprint_out, two 4 MB blocks, both
// started 128 bytes into a page, and the 1024x1024 float32 backward streaming both took
// 2.5 ms instead of 0.5 ms here. (The kernels check the outputs they stream together,
// blend_cpu.cpp, in case two blocks of one colour meet.)
constexpr size_t kColors = kPageBytes / kStoreAliasBytes;

constexpr uint64_t kNeverWritten = UINT64_MAX;  // after every clock value: mark_written sees no past

std::atomic<uint64_t> blend_clock{0};

// Just before the data: where the block starts, its total size, and the blend clock when a
// kernel last began writing it.
struct alignas(c10::gAlignment) Header {
  void* start;
  size_t bytes;
  uint64_t written_at;
};

struct Block {
  void* data;
  size_t bytes;
};

Header& header_of(void* data) { return *(static_cast<Header*>(data) - 1); }

// Where a block starting at `start` puts data of colour `color`: the first address with that
// offset into its page that leaves room for the header (at most a page and a header in).
void* colored_data(void* start, size_t color) {
  const auto first = reinterpret_cast<uintptr_t>(start) + sizeof(Header);
  const uintptr_t offset = color * kStoreAliasBytes;
  const uintptr_t page = first / kPageBytes * kPageBytes;
  const uintptr_t data = page + offset >= first ? page + offset : page + kPageBytes + offset;
  return reinterpret_cast<void*>(data);
}

class OutputCache final : public c10::Allocator {
 public:
  explicit OutputCache(int64_t limit) : limit_(static_cast<size_t>(limit)) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    // room for the header and any colour, so that every block of an output size is the same size
    const size_t bytes = (nbytes + sizeof(Header) + 2 * kPageBytes - 1) / kPageBytes * kPageBytes;
    void* data = take(bytes);
    if (data == nullptr) {
      void* start = nullptr;
      try {
        start = c10::alloc_cpu(bytes);
      } catch (const c10::OutOfMemoryError&) {
        release();  // what the cache holds is the first memory to give up
        start = c10::alloc_cpu(bytes);
      }
      data = colored_data(start, next_color_.fetch_add(7) % kColors);
      header_of(data) = {start, bytes, kNeverWritten};
    }
    return {data, data, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  int64_t held_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_bytes_);
  }

  int64_t limit() const { return static_cast<int64_t>(limit_); }

  // Whether this cache allocated ptr's memory (else torch's allocator did).
  static bool allocated_here(const c10::DataPtr& ptr) { return ptr.get_deleter() == &OutputCache::give_back; }

  void release() {
    std::list<Block> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(held_);
      held_bytes_ = 0;
    }
    for (const Block& block : blocks) c10::free_cpu(header_of(block.data).start);
  }

 private:
  // The data of the most recently freed held block of `bytes` (its memory likeliest still
  // cached), or null.
  void* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = held_.rbegin(); it != held_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        held_.erase(std::next(it).base());
        held_bytes_ -= bytes;
        return data;
      }
    }
    return nullptr;
  }

  static void give_back(void* data);

  std::mutex mutex_;
  std::list<Block> held_;  // oldest first
  size_t held_bytes_ = 0;
  std::atomic<size_t> next_color_{0};
  const size_t limit_;
};

// Never destroyed: outputs may be freed after static destructors have run.
OutputCache& output_cache() {
  static OutputCache* cache =
      new OutputCache(env_byte_count("KASMINA_CPU_OUTPUT_CACHE_BYTES", kDefaultLimit, " (0 turns the cache off)"));
  return *cache;
}

void OutputCache::give_back(void* data) {
  OutputCache& cache = output_cache();
  const size_t bytes = header_of(data).bytes;
  std::list<Block> dropped;
  try {
    const std::lock_guard<std::mutex> lock(cache.mutex_);
    if (bytes > cache.limit_) {
      dropped.push_back({data, bytes});
    } else {
      cache.held_.push_back({data, bytes});
      cache.held_bytes_ += bytes;
    }
    while (cache.held_bytes_ > cache.limit_) {  // oldest first
      cache.held_bytes_ -= cache.held_.front().bytes;
      dropped.splice(dropped.end(), cache.held_, cache.held_.begin());
    }
  } catch (const std::bad_alloc&) {  // a deleter must not throw: free the block instead of keeping it
    c10::free_cpu(header_of(data).start);
  }
  for (const Block& block : dropped) c10::free_cpu(header_of(block.data).start);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_generic(sizes, &output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
}

uint64_t advance_blend_clock(uint64_t bytes) { return blend_clock.fetch_add(bytes, std::memory_order_relaxed); }

uint64_t mark_written(const at::Tensor& out, uint64_t now) {
  const c10::DataPtr& ptr = out.storage().data_ptr();
  if (!OutputCache::allocated_here(ptr)) return 0;
  Header& header = header_of(ptr.get());
  const uint64_t since = header.written_at < now ? now - header.written_at : 0;
  header.written_at = now;
  return since;
}

int64_t output_cache_bytes() { return output_cache().held_bytes(); }

int64_t output_cache_limit() { return output_cache().limit(); }

void release_output_cache() { output_cache().release(); }

TORCH_LIBRARY_IMPL(kasmina, CompositeImplicitAutograd, m) {
  m.impl("cpu_output_cache_bytes", &output_cache_bytes);
  m.impl("cpu_output_cache_limit", &output_cache_limit);
  m.impl("release_cpu_output_cache", &release_output_cache);
}

}  // namespace kasmina
