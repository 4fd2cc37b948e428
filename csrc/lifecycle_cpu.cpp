// CPU kernels of the lifecycle ops: kasmina::apply_transitions, kasmina::step_epoch and
// kasmina::state_summary. Every per-seed rule is in lifecycle_step.h; this file only
// checks the tensors and runs those rules over seeds and requests with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lifecycle_args.h"
#include "lifecycle_step.h"

namespace kasmina {
namespace {

namespace spec = ::kasmina::spec;
namespace lc = ::kasmina::lifecycle;

constexpr int64_t kGrain = 1 << 14;

// The state tensor of a CPU kernel call: on the CPU, int32 (N, kNumStateColumns), contiguous.
void check_cpu_state(const at::Tensor& state) {
  lc::check_on_device(state, "state", at::Device(at::kCPU));
  lc::check_state(state);
}

// Requests handled per task of at::parallel_for: below this a batch runs on the calling
// thread (thread start-up costs more than the work).
constexpr int64_t kRequestGrain = 1 << 16;
// How many requests ahead the loops prefetch the rows they will touch (random access).
constexpr int64_t kPrefetchAhead = 12;
// Distance between the stages of the apply pipeline (see apply_range).
constexpr int64_t kStage = 8;

inline void prefetch_write(const void* p) { __builtin_prefetch(p, 1, 1); }

// Marks, for every in-range seed id of the batch, whether it occurs more than once:
// flags[s] bit 0 = seen, bit 1 = seen again. The buffer is per calling thread and
// reused (kept zero between calls), so a batch does not pay for a fresh allocation.
// Returns nullptr when the batch cannot hold duplicates (K <= 1).
const uint8_t* duplicate_flags(const int64_t* seed_ids, int64_t num_requests, int64_t num_seeds) {
  if (num_requests <= 1) return nullptr;
  thread_local std::vector<uint8_t> flags;
  if (static_cast<int64_t>(flags.size()) < num_seeds) flags.assign(static_cast<size_t>(num_seeds), 0);
  uint8_t* f = flags.data();
  const bool threaded = num_requests > kRequestGrain && at::get_num_threads() > 1;
  at::parallel_for(0, num_requests, kRequestGrain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (k + kPrefetchAhead < end) {
        const int64_t ahead = seed_ids[k + kPrefetchAhead];
        if (lc::seed_in_range(ahead, num_seeds)) prefetch_write(f + ahead);
      }
      const int64_t s = seed_ids[k];
      if (!lc::seed_in_range(s, num_seeds)) continue;
      if (threaded) {
        // Relaxed atomics: only the final bits matter, read after parallel_for joins.
        if (__atomic_fetch_or(&f[s], uint8_t{1}, __ATOMIC_RELAXED) & 1) __atomic_fetch_or(&f[s], uint8_t{2}, __ATOMIC_RELAXED);
      } else {
        f[s] = static_cast<uint8_t>(f[s] | 1 | ((f[s] & 1) << 1));
      }
    }
  });
  return f;
}

// Zeroes the flags a batch set, leaving the buffer clean for the next batch: the whole
// prefix for large batches (a sequential memset beats random stores), else per seed.
void clear_duplicate_flags(const int64_t* seed_ids, int64_t num_requests, int64_t num_seeds, const uint8_t* flags) {
  if (flags == nullptr) return;
  uint8_t* f = const_cast<uint8_t*>(flags);
  if (num_requests * 16 >= num_seeds) {
    std::memset(f, 0, static_cast<size_t>(num_seeds));
    return;
  }
  for (int64_t k = 0; k < num_requests; ++k) {
    const int64_t s = seed_ids[k];
    if (lc::seed_in_range(s, num_seeds)) f[s] = 0;
  }
}

// Judges and commits requests [begin, end) as a software pipeline over the random rows
// they touch, `kStage` requests apart: stage 0 prefetches request i's state row, stage 1
// judges request i - kStage (its row is in cache by then) and, when accepted, prefetches
// its history count, stage 2 prefetches the one history slot request i - 2 kStage will
// write, stage 3 commits request i - 3 kStage. Refused requests never touch the history.
// Judging ahead of earlier commits is sound: accepted requests name distinct seeds, and
// every request is judged against the state before the batch.
template <typename StateIndex>
void apply_range(int32_t* state, int32_t* history, int32_t* history_count, int64_t num_seeds, const int64_t* seed_ids,
                 const StateIndex* from_states, const StateIndex* to_states, const float* context,
                 const int32_t* min_epochs, const float* params, const uint8_t* dup, int32_t* codes, int64_t begin,
                 int64_t end) {
  constexpr int64_t kRing = spec::kHistoryLength * 2;
  for (int64_t i = begin; i < end + 3 * kStage; ++i) {
    if (i < end) {
      const int64_t s = seed_ids[i];
      if (lc::seed_in_range(s, num_seeds)) prefetch_write(state + s * spec::kNumStateColumns);
    }
    const int64_t j = i - kStage;
    if (j >= begin && j < end) {
      const int64_t s = seed_ids[j];
      const int32_t occurrences = (dup != nullptr && lc::seed_in_range(s, num_seeds) && (dup[s] & 2)) ? 2 : 1;
      const int32_t code = lc::judge_request(s, num_seeds, occurrences, state, static_cast<int64_t>(from_states[j]),
                                             static_cast<int64_t>(to_states[j]), context + j * spec::kNumContextFields,
                                             min_epochs, params);
      codes[j] = code;
      if (code == spec::REASON_OK) prefetch_write(history_count + s);
    }
    const int64_t h = i - 2 * kStage;
    if (h >= begin && h < end && codes[h] == spec::REASON_OK) {
      const int64_t s = seed_ids[h];
      const uint32_t slot = static_cast<uint32_t>(history_count[s]) % static_cast<uint32_t>(spec::kHistoryLength);
      prefetch_write(history + s * kRing + 2 * slot);
    }
    const int64_t c = i - 3 * kStage;
    if (c >= begin && c < end && codes[c] == spec::REASON_OK) {
      const int64_t s = seed_ids[c];
      lc::commit_transition(state + s * spec::kNumStateColumns, history + s * kRing, history_count + s,
                            static_cast<int32_t>(from_states[c]), static_cast<int32_t>(to_states[c]));
    }
  }
}

template <typename StateIndex>
void apply_kernel(int32_t* state, int32_t* history, int32_t* history_count, int64_t num_seeds, const int64_t* seed_ids,
                  const StateIndex* from_states, const StateIndex* to_states, const float* context,
                  const int32_t* min_epochs, const float* params, int32_t* codes, int64_t num_requests) {
  const uint8_t* dup = duplicate_flags(seed_ids, num_requests, num_seeds);
  at::parallel_for(0, num_requests, kRequestGrain, [&](int64_t begin, int64_t end) {
    apply_range(state, history, history_count, num_seeds, seed_ids, from_states, to_states, context, min_epochs,
                params, dup, codes, begin, end);
  });
  clear_duplicate_flags(seed_ids, num_requests, num_seeds, dup);
}

at::Tensor apply_transitions_cpu(at::Tensor& state, at::Tensor& history, at::Tensor& history_count,
                                 const at::Tensor& seed_ids, const at::Tensor& from_states,
                                 const at::Tensor& to_states, const at::Tensor& context,
                                 const at::Tensor& min_epochs, const at::Tensor& params) {
  check_cpu_state(state);
  const lc::ApplyArgs args =
      lc::prepare_apply_args(state, history, history_count, seed_ids, from_states, to_states, context, min_epochs,
                             params);
  const int64_t k = args.num_requests;
  at::Tensor codes = at::empty({k}, seed_ids.options().dtype(at::kInt));
  if (k == 0) return codes;

  const auto run = [&](auto state_index) {
    using StateIndex = decltype(state_index);
    apply_kernel<StateIndex>(state.data_ptr<int32_t>(), history.data_ptr<int32_t>(),
                             history_count.data_ptr<int32_t>(), args.num_seeds, args.seed_ids.data_ptr<int64_t>(),
                             args.from_states.data_ptr<StateIndex>(), args.to_states.data_ptr<StateIndex>(),
                             args.context.data_ptr<float>(), args.min_epochs.data_ptr<int32_t>(),
                             args.params.data_ptr<float>(), codes.data_ptr<int32_t>(), k);
  };
  if (args.from_states.scalar_type() == at::kInt) {
    run(int32_t{});
  } else {
    run(int64_t{});
  }
  return codes;
}

void step_epoch_cpu(at::Tensor& state) {
  check_cpu_state(state);
  int32_t* rows = state.data_ptr<int32_t>();
  at::parallel_for(0, state.size(0), kGrain * 8, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) lc::step_row_epoch(rows + s * spec::kNumStateColumns);
  });
}

at::Tensor state_summary_cpu(const at::Tensor& state) {
  check_cpu_state(state);
  const int32_t* rows = state.data_ptr<int32_t>();
  std::array<std::atomic<int64_t>, spec::kNumStates> totals{};
  at::parallel_for(0, state.size(0), kGrain * 8, [&](int64_t begin, int64_t end) {
    std::array<int64_t, spec::kNumStates> local{};
    for (int64_t s = begin; s < end; ++s) {
      const int32_t st = rows[s * spec::kNumStateColumns + spec::COL_LIFECYCLE_STATE];
      if (st >= 0 && st < spec::kNumStates) ++local[st];
    }
    for (int32_t i = 0; i < spec::kNumStates; ++i) totals[i].fetch_add(local[i], std::memory_order_relaxed);
  });
  at::Tensor out = at::empty({spec::kNumStates}, state.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int32_t i = 0; i < spec::kNumStates; ++i) o[i] = totals[i].load(std::memory_order_relaxed);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CPU, m) {
  m.impl("apply_transitions", &apply_transitions_cpu);
  m.impl("step_epoch", &step_epoch_cpu);
  m.impl("state_summary", &state_summary_cpu);
}

}  // namespace kasmina
