// The CPU blend kernels' output cache (see output_cache.h).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <list>
#include <mutex>
#include <new>

#include "env_bytes.h"

namespace kasmina {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;  // smaller outputs take torch's CPU allocator
constexpr size_t kPageBytes = 4096;
constexpr size_t kHeaderBytes = c10::gAlignment;  // before the data: the block's size
constexpr int64_t kDefaultLimit = int64_t{256} << 20;

// A block is kHeaderBytes of header (its total size) followed by the output's data; an
// output's DataPtr holds the data as its context too (a simple data pointer, as
// copy-on-write clones need).
struct Block {
  void* start;
  size_t bytes;
};

void* block_start(void* data) { return static_cast<char*>(data) - kHeaderBytes; }

class OutputCache final : public c10::Allocator {
 public:
  explicit OutputCache(int64_t limit) : limit_(static_cast<size_t>(limit)) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kHeaderBytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    void* start = take(bytes);
    if (start == nullptr) {
      try {
        start = c10::alloc_cpu(bytes);
      } catch (const c10::OutOfMemoryError&) {
        release();  // what the cache holds is the first memory to give up
        start = c10::alloc_cpu(bytes);
      }
      *static_cast<size_t*>(start) = bytes;
    }
    void* data = static_cast<char*>(start) + kHeaderBytes;
    return {data, data, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  int64_t held_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_bytes_);
  }

  int64_t limit() const { return static_cast<int64_t>(limit_); }

  void release() {
    std::list<Block> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(held_);
      held_bytes_ = 0;
    }
    for (const Block& block : blocks) c10::free_cpu(block.start);
  }

 private:
  // The most recently freed held block of `bytes` (its memory likeliest still cached), or null.
  void* take(size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = held_.rbegin(); it != held_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* start = it->start;
        held_.erase(std::next(it).base());
        held_bytes_ -= bytes;
        return start;
      }
    }
    return nullptr;
  }

  static void give_back(void* data);

  std::mutex mutex_;
  std::list<Block> held_;  // oldest first
  size_t held_bytes_ = 0;
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
  void* start = block_start(data);
  const size_t bytes = *static_cast<size_t*>(start);
  std::list<Block> dropped;
  try {
    const std::lock_guard<std::mutex> lock(cache.mutex_);
    if (bytes > cache.limit_) {
      dropped.push_back({start, bytes});
    } else {
      cache.held_.push_back({start, bytes});
      cache.held_bytes_ += bytes;
    }
    while (cache.held_bytes_ > cache.limit_) {  // oldest first
      cache.held_bytes_ -= cache.held_.front().bytes;
      dropped.splice(dropped.end(), cache.held_, cache.held_.begin());
    }
  } catch (const std::bad_alloc&) {  // a deleter must not throw: free the block instead of keeping it
    c10::free_cpu(start);
  }
  for (const Block& block : dropped) c10::free_cpu(block.start);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::Tensor(at::detail::empty_generic(sizes, &output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
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
