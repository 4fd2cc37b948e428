// Generated from spec/lifecycle.yaml (sha256 d199b5287b8b0c95) by `python -m codegen`. Do not edit.
#pragma once

#include <cstdint>

#ifndef KASMINA_HD
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KASMINA_HD __host__ __device__ __forceinline__
#else
#define KASMINA_HD inline
#endif
#endif

#define KASMINA_SPEC_SHA256 "d199b5287b8b0c95f49a01489ba76faa776a0d62b98f2e79c3d46c62a5f2e45e"

namespace kasmina {
namespace spec {

constexpr int32_t kNumStates = 11;
constexpr int32_t kNumEdges = 19;
constexpr int32_t kNumContextFields = 6;
constexpr int32_t kNumParams = 8;
constexpr int32_t kNumStateColumns = 8;
constexpr int32_t kNumMetricColumns = 4;
constexpr int32_t kHistoryLength = 10;
constexpr int32_t kNumGraftingStrategies = 5;
constexpr int32_t kNumReasons = 7;

enum State : int32_t {
  DORMANT = 0,
  GERMINATED = 1,
  TRAINING = 2,
  GRAFTING = 3,
  STABILIZATION = 4,
  EVALUATING = 5,
  FINE_TUNING = 6,
  FOSSILIZED = 7,
  CULLED = 8,
  CANCELLED = 9,
  ROLLED_BACK = 10
};

enum StateColumn : int32_t {
  COL_LIFECYCLE_STATE = 0,
  COL_BLUEPRINT_ID = 1,
  COL_EPOCHS_IN_STATE = 2,
  COL_GRAFTING_STRATEGY = 3,
  COL_PARENT_STATE = 4,
  COL_CHECKPOINT_ID = 5,
  COL_EVALUATION_SCORE = 6,
  COL_ERROR_COUNT = 7
};

enum MetricColumn : int32_t {
  METRIC_LOSS = 0,
  METRIC_ACCURACY = 1,
  METRIC_STABILITY = 2,
  METRIC_EFFICIENCY = 3
};

enum ContextField : int32_t {
  FIELD_RECONSTRUCTION_LOSS = 0,
  FIELD_PERFORMANCE_DELTA = 1,
  FIELD_STABILITY_SCORE = 2,
  FIELD_ERROR_RATE = 3,
  FIELD_TOTAL_IMPROVEMENT = 4,
  FIELD_FINAL_STABILITY = 5
};

enum Param : int32_t {
  PARAM_RECONSTRUCTION_THRESHOLD = 0,
  PARAM_MIN_PERFORMANCE_DELTA = 1,
  PARAM_MIN_STABILITY = 2,
  PARAM_CULL_PERFORMANCE_DELTA = 3,
  PARAM_CULL_ERROR_RATE = 4,
  PARAM_CULL_ERROR_COUNT = 5,
  PARAM_FOSSILIZE_IMPROVEMENT = 6,
  PARAM_FOSSILIZE_STABILITY = 7
};

enum Reason : int32_t {
  REASON_OK = 0,
  REASON_UNKNOWN_SEED = 1,
  REASON_STALE_FROM_STATE = 2,
  REASON_INVALID_EDGE = 3,
  REASON_MIN_EPOCHS = 4,
  REASON_GUARD_FAILED = 5,
  REASON_DUPLICATE_IN_BATCH = 6
};

enum StateKind : int32_t {
  KIND_IDLE = 0,
  KIND_ACTIVE = 1,
  KIND_PERMANENT = 2,
  KIND_RETIRED = 3
};

enum AlphaSource : int32_t {
  ALPHA_ZERO = 0,
  ALPHA_STRATEGY = 1,
  ALPHA_ONE = 2
};

enum LearnsFrom : int32_t {
  LEARNS_NONE = 0,
  LEARNS_RECONSTRUCTION = 1,
  LEARNS_TASK = 2
};

// Default minimum lifecycle epochs per state (a LifecyclePolicy overrides them at run time).
KASMINA_HD int32_t default_min_epochs(int32_t state) {
  switch (state) {
    case 0: return 0;
    case 1: return 0;
    case 2: return 100;
    case 3: return 50;
    case 4: return 20;
    case 5: return 30;
    case 6: return 50;
    case 7: return 0;
    case 8: return 20;
    case 9: return 0;
    case 10: return 20;
    default: return 0;
  }
}

// Default value of each param (a LifecyclePolicy overrides them at run time).
KASMINA_HD float default_param(int32_t param) {
  switch (param) {
    case 0: return 0x1.47ae140000000p-7f;
    case 1: return 0x0.0p+0f;
    case 2: return 0x1.99999a0000000p-1f;
    case 3: return -0x1.99999a0000000p-5f;
    case 4: return 0x1.99999a0000000p-4f;
    case 5: return 0x1.4000000000000p+2f;
    case 6: return 0x1.47ae140000000p-7f;
    case 7: return 0x1.e666660000000p-1f;
    default: return 0.0f;
  }
}

// StateKind of each state.
KASMINA_HD int32_t state_kind(int32_t state) {
  switch (state) {
    case 0: return KIND_IDLE;
    case 1: return KIND_ACTIVE;
    case 2: return KIND_ACTIVE;
    case 3: return KIND_ACTIVE;
    case 4: return KIND_ACTIVE;
    case 5: return KIND_ACTIVE;
    case 6: return KIND_ACTIVE;
    case 7: return KIND_PERMANENT;
    case 8: return KIND_RETIRED;
    case 9: return KIND_RETIRED;
    case 10: return KIND_RETIRED;
    default: return -1;
  }
}

// Whether the layer evaluates the blueprint of a seed in this state.
KASMINA_HD bool state_blueprint_runs(int32_t state) {
  switch (state) {
    case 2: return true;
    case 3: return true;
    case 4: return true;
    case 5: return true;
    case 6: return true;
    case 7: return true;
    default: return false;
  }
}

// Where a seed's blend factor comes from in this state.
KASMINA_HD int32_t state_alpha_source(int32_t state) {
  switch (state) {
    case 0: return ALPHA_ZERO;
    case 1: return ALPHA_ZERO;
    case 2: return ALPHA_ZERO;
    case 3: return ALPHA_STRATEGY;
    case 4: return ALPHA_ONE;
    case 5: return ALPHA_ONE;
    case 6: return ALPHA_ONE;
    case 7: return ALPHA_ONE;
    case 8: return ALPHA_ZERO;
    case 9: return ALPHA_ZERO;
    case 10: return ALPHA_ZERO;
    default: return ALPHA_ZERO;
  }
}

// What a seed's blueprint is trained on in this state.
KASMINA_HD int32_t state_learns_from(int32_t state) {
  switch (state) {
    case 0: return LEARNS_NONE;
    case 1: return LEARNS_NONE;
    case 2: return LEARNS_RECONSTRUCTION;
    case 3: return LEARNS_NONE;
    case 4: return LEARNS_NONE;
    case 5: return LEARNS_NONE;
    case 6: return LEARNS_TASK;
    case 7: return LEARNS_NONE;
    case 8: return LEARNS_NONE;
    case 9: return LEARNS_NONE;
    case 10: return LEARNS_NONE;
    default: return LEARNS_NONE;
  }
}

// Edge id of from -> to, or -1 where the lifecycle has no such edge.
KASMINA_HD int32_t edge_id(int32_t from, int32_t to) {
  if (from < 0 || from >= kNumStates || to < 0 || to >= kNumStates) return -1;
  switch (from * kNumStates + to) {
    case 1: return 0;  // DORMANT -> GERMINATED
    case 13: return 1;  // GERMINATED -> TRAINING
    case 25: return 2;  // TRAINING -> GRAFTING
    case 37: return 3;  // GRAFTING -> STABILIZATION
    case 49: return 4;  // STABILIZATION -> EVALUATING
    case 61: return 5;  // EVALUATING -> FINE_TUNING
    case 73: return 6;  // FINE_TUNING -> FOSSILIZED
    case 30: return 7;  // TRAINING -> CULLED
    case 63: return 8;  // EVALUATING -> CULLED
    case 74: return 9;  // FINE_TUNING -> CULLED
    case 20: return 10;  // GERMINATED -> CANCELLED
    case 31: return 11;  // TRAINING -> CANCELLED
    case 43: return 12;  // GRAFTING -> ROLLED_BACK
    case 54: return 13;  // STABILIZATION -> ROLLED_BACK
    case 65: return 14;  // EVALUATING -> ROLLED_BACK
    case 76: return 15;  // FINE_TUNING -> ROLLED_BACK
    case 88: return 16;  // CULLED -> DORMANT
    case 99: return 17;  // CANCELLED -> DORMANT
    case 110: return 18;  // ROLLED_BACK -> DORMANT
    default: return -1;
  }
}

// Source state of an edge.
KASMINA_HD int32_t edge_from(int32_t edge) {
  switch (edge) {
    case 0: return 0;
    case 1: return 1;
    case 2: return 2;
    case 3: return 3;
    case 4: return 4;
    case 5: return 5;
    case 6: return 6;
    case 7: return 2;
    case 8: return 5;
    case 9: return 6;
    case 10: return 1;
    case 11: return 2;
    case 12: return 3;
    case 13: return 4;
    case 14: return 5;
    case 15: return 6;
    case 16: return 8;
    case 17: return 9;
    case 18: return 10;
    default: return -1;
  }
}

// Target state of an edge.
KASMINA_HD int32_t edge_to(int32_t edge) {
  switch (edge) {
    case 0: return 1;
    case 1: return 2;
    case 2: return 3;
    case 3: return 4;
    case 4: return 5;
    case 5: return 6;
    case 6: return 7;
    case 7: return 8;
    case 8: return 8;
    case 9: return 8;
    case 10: return 9;
    case 11: return 9;
    case 12: return 10;
    case 13: return 10;
    case 14: return 10;
    case 15: return 10;
    case 16: return 0;
    case 17: return 0;
    case 18: return 0;
    default: return -1;
  }
}

// Whether an edge may be taken before the source state's minimum epochs.
KASMINA_HD bool edge_bypasses_min_epochs(int32_t edge) {
  switch (edge) {
    case 10: return true;
    case 11: return true;
    case 12: return true;
    case 13: return true;
    case 14: return true;
    case 15: return true;
    default: return false;
  }
}

// Guard id of an edge, or -1 for an unguarded edge.
KASMINA_HD int32_t edge_guard(int32_t edge) {
  switch (edge) {
    case 2: return 0;
    case 5: return 1;
    case 6: return 2;
    case 8: return 3;
    default: return -1;
  }
}

namespace detail {
// Every comparison with NaN is false, `ne` included, so a missing metric never
// lets a guarded move through.
KASMINA_HD bool cmp_lt(float a, float b) { return a < b; }
KASMINA_HD bool cmp_le(float a, float b) { return a <= b; }
KASMINA_HD bool cmp_gt(float a, float b) { return a > b; }
KASMINA_HD bool cmp_ge(float a, float b) { return a >= b; }
KASMINA_HD bool cmp_eq(float a, float b) { return a == b; }
KASMINA_HD bool cmp_ne(float a, float b) { return a < b || a > b; }
}  // namespace detail

// Whether the guard of `edge` holds. `ctx` holds kNumContextFields float32 metrics
// (NaN where not supplied), `params` kNumParams float32 thresholds. Unguarded
// edges pass.
KASMINA_HD bool guard_passes(int32_t edge, const float* ctx, float epochs_in_state,
                             float error_count, const float* params) {
  (void)ctx;
  (void)epochs_in_state;
  (void)error_count;
  (void)params;
  switch (edge) {
    case 2:  // TRAINING -> GRAFTING: reconstruction_converged (all)
      return detail::cmp_le(ctx[FIELD_RECONSTRUCTION_LOSS], params[PARAM_RECONSTRUCTION_THRESHOLD]);
    case 5:  // EVALUATING -> FINE_TUNING: evaluation_passed (all)
      return detail::cmp_gt(ctx[FIELD_PERFORMANCE_DELTA], params[PARAM_MIN_PERFORMANCE_DELTA]) &&
             detail::cmp_ge(ctx[FIELD_STABILITY_SCORE], params[PARAM_MIN_STABILITY]);
    case 6:  // FINE_TUNING -> FOSSILIZED: fine_tuning_converged (all)
      return detail::cmp_ge(ctx[FIELD_TOTAL_IMPROVEMENT], params[PARAM_FOSSILIZE_IMPROVEMENT]) &&
             detail::cmp_ge(ctx[FIELD_FINAL_STABILITY], params[PARAM_FOSSILIZE_STABILITY]);
    case 8:  // EVALUATING -> CULLED: evaluation_failed (any)
      return detail::cmp_lt(ctx[FIELD_PERFORMANCE_DELTA], params[PARAM_CULL_PERFORMANCE_DELTA]) ||
             detail::cmp_gt(ctx[FIELD_ERROR_RATE], params[PARAM_CULL_ERROR_RATE]) ||
             detail::cmp_gt(error_count, params[PARAM_CULL_ERROR_COUNT]);
    default: return true;
  }
}

}  // namespace spec
}  // namespace kasmina
