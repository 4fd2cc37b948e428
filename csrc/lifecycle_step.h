// Per-seed lifecycle logic shared by the CPU kernels (lifecycle_cpu.cpp) and the CUDA
// kernels (cuda/lifecycle_cuda.cu). Torch-free: plain pointers over the generated tables
// of csrc/generated/lifecycle_tables.h, every function KASMINA_HD.
//
// Memory layout (all contiguous, row-major, one device):
//   state          int32  [num_seeds][kNumStateColumns]      a seed's row: state + seed * kNumStateColumns
//   history        int32  [num_seeds][kHistoryLength][2]     a seed's ring: history + seed * kHistoryLength * 2
//   history_count  int32  [num_seeds]                        transitions ever committed (see commit_transition)
//   context        float  [K][kNumContextFields]             one row per request, NaN = metric not supplied
//   min_epochs     int32  [kNumStates]                       effective minimum epochs per source state
//   params         float  [kNumParams]                       effective guard thresholds
//
// Stable API (the CUDA kernels call exactly these):
//
//   bool    seed_in_range(int64_t seed_id, int64_t num_seeds)
//       Check 1 of a request: 0 <= seed_id < num_seeds (else REASON_UNKNOWN_SEED).
//
//   int32_t judge_row(const int32_t* row, int64_t from_state, int64_t to_state,
//                     const float* ctx, const int32_t* min_epochs, const float* params)
//       Checks 3..6 of a request against the seed's row as it was before the batch:
//       STALE_FROM_STATE, INVALID_EDGE (to_state out of range included), MIN_EPOCHS
//       (unless the edge bypasses it), GUARD_FAILED; REASON_OK when all hold. Reads only.
//
//   int32_t judge_request(int64_t seed_id, int64_t num_seeds, int32_t occurrences,
//                         const int32_t* state, int64_t from_state, int64_t to_state,
//                         const float* ctx, const int32_t* min_epochs, const float* params)
//       The whole check order of DESIGN §4 for one request of a batch: UNKNOWN_SEED,
//       then DUPLICATE_IN_BATCH when `occurrences` (how many requests of the batch name
//       this in-range seed id) is > 1, then judge_row on state's row of the seed.
//       `state` is the base pointer of the whole state buffer. Reads only.
//       A kernel counts occurrences of in-range seed ids over the whole batch first
//       (e.g. a num_seeds-sized int32 scratch array and atomic increments), then calls
//       judge_request per request, then commit_transition where it returned REASON_OK:
//       accepted requests name distinct seeds, so commits never race.
//
//   void    commit_transition(int32_t* row, int32_t* history_ring, int32_t* history_count,
//                             int32_t from_state, int32_t to_state)
//       Applies an accepted request: history gets (from, to) at slot count % kHistoryLength,
//       the count advances, PARENT_STATE = from, EPOCHS_IN_STATE = 0, LIFECYCLE_STATE = to.
//       `history_ring` is the seed's ring, `history_count` points at the seed's count.
//       The count counts every transition; at INT32_MAX it steps back by
//       kHistoryLength - 1 instead of overflowing, so it keeps its value modulo
//       kHistoryLength and stays >= kHistoryLength (the ring stays full and in order).
//       (A corrupt negative count still writes inside the ring: the slot is taken unsigned.)
//
//   void    step_row_epoch(int32_t* row)
//       EPOCHS_IN_STATE += 1, saturating at INT32_MAX.
//
//   int32_t next_history_count(int32_t count)
//       The count after one more transition (the saturation rule above).
//
// Guards compare in float32: epochs_in_state and error_count are converted to float
// before guard_passes, exactly as the pure-torch reference does.
#pragma once

#include <cstdint>

#include "generated/lifecycle_tables.h"

namespace kasmina {
namespace lifecycle {

constexpr int32_t kInt32Max = 2147483647;

KASMINA_HD bool seed_in_range(int64_t seed_id, int64_t num_seeds) { return seed_id >= 0 && seed_id < num_seeds; }

KASMINA_HD int32_t judge_row(const int32_t* row, int64_t from_state, int64_t to_state, const float* ctx,
                             const int32_t* min_epochs, const float* params) {
  const int32_t current = row[spec::COL_LIFECYCLE_STATE];
  if (static_cast<int64_t>(current) != from_state) return spec::REASON_STALE_FROM_STATE;
  if (to_state < 0 || to_state >= spec::kNumStates) return spec::REASON_INVALID_EDGE;
  const int32_t edge = spec::edge_id(current, static_cast<int32_t>(to_state));
  if (edge < 0) return spec::REASON_INVALID_EDGE;
  const int32_t epochs = row[spec::COL_EPOCHS_IN_STATE];
  if (!spec::edge_bypasses_min_epochs(edge) && epochs < min_epochs[current]) return spec::REASON_MIN_EPOCHS;
  if (!spec::guard_passes(edge, ctx, static_cast<float>(epochs), static_cast<float>(row[spec::COL_ERROR_COUNT]),
                          params)) {
    return spec::REASON_GUARD_FAILED;
  }
  return spec::REASON_OK;
}

KASMINA_HD int32_t judge_request(int64_t seed_id, int64_t num_seeds, int32_t occurrences, const int32_t* state,
                                 int64_t from_state, int64_t to_state, const float* ctx, const int32_t* min_epochs,
                                 const float* params) {
  if (!seed_in_range(seed_id, num_seeds)) return spec::REASON_UNKNOWN_SEED;
  if (occurrences > 1) return spec::REASON_DUPLICATE_IN_BATCH;
  return judge_row(state + seed_id * spec::kNumStateColumns, from_state, to_state, ctx, min_epochs, params);
}

KASMINA_HD int32_t next_history_count(int32_t count) {
  return count == kInt32Max ? count - (spec::kHistoryLength - 1) : count + 1;
}

KASMINA_HD void commit_transition(int32_t* row, int32_t* history_ring, int32_t* history_count, int32_t from_state,
                                  int32_t to_state) {
  const int32_t count = *history_count;
  // unsigned: a corrupt negative count still lands inside the ring
  int32_t* slot = history_ring + 2 * (static_cast<uint32_t>(count) % static_cast<uint32_t>(spec::kHistoryLength));
  slot[0] = from_state;
  slot[1] = to_state;
  *history_count = next_history_count(count);
  row[spec::COL_PARENT_STATE] = from_state;
  row[spec::COL_EPOCHS_IN_STATE] = 0;
  row[spec::COL_LIFECYCLE_STATE] = to_state;
}

KASMINA_HD void step_row_epoch(int32_t* row) {
  const int32_t epochs = row[spec::COL_EPOCHS_IN_STATE];
  row[spec::COL_EPOCHS_IN_STATE] = epochs < kInt32Max ? epochs + 1 : kInt32Max;
}

}  // namespace lifecycle
}  // namespace kasmina
