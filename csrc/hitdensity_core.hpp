// hitdensity's per-key state and verbs as a Python class (HitDensityCore), bound into
// kvbm._native by module.cpp; policies/hitdensity.py gets it through kvbm/ops.py.
#pragma once

#include <nanobind/nanobind.h>

void bind_hitdensity(nanobind::module_& m);
