// hitdensity's per-key state and verbs as a Python class (HitDensityCore), bound into
// kvbm._native by module.cpp; policies/hitdensity.py gets it through kvbm/ops.py.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>

void bind_hitdensity(nanobind::module_& m);

// For auto's mini feed (auto_core.cpp): a hitdensity mini's verbs called without Python between,
// on keys given as an array of borrowed references. cast: nullptr where core is not one.
class HitDensityCore;
namespace hitdensity_feed {
HitDensityCore* cast(nanobind::handle core);
void insert_run(HitDensityCore* c, PyObject* const* keys, Py_ssize_t n, int64_t run_length, bool ends_run);
void touch(HitDensityCore* c, PyObject* const* keys, Py_ssize_t n);  // touch(keys)
void evict_quiet(HitDensityCore* c, int64_t n);  // evict(n, ()) with the victims dropped
}  // namespace hitdensity_feed
