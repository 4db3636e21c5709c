// Binds prefix_core.hpp's PrefixCore into kvbm._native (module.cpp calls bind_prefix).
#include "prefix_core.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using prefixcore::PrefixCore;

void bind_prefix(nb::module_& m) {
  nb::class_<PrefixCore>(m, "PrefixCore",
                         "the prefix policy's per-key state and verbs (policies/prefix.py decides; "
                         "kvbm.ops.prefix_core hands it out)")
      .def(nb::init<>())
      .def("insert", &PrefixCore::insert, "key"_a, "hints"_a = nb::none())
      .def("insert_many", &PrefixCore::insert_many, "keys"_a, "hints"_a = nb::none())
      .def("insert_linked", &PrefixCore::insert_linked, "keys"_a, "parents"_a)
      .def("touch", &PrefixCore::touch, "keys"_a)
      .def("batch_stored", &PrefixCore::batch_stored, "keys"_a)
      .def("remove", &PrefixCore::remove, "key"_a)
      .def("evict", &PrefixCore::evict, "n"_a, "protected"_a = nb::none())
      .def("tracked", &PrefixCore::tracked)
      .def("parents_only", &PrefixCore::parents_only)
      .def("heap_size", &PrefixCore::heap_size)
      .def("clock", &PrefixCore::clock)
      .def("parent_of", &PrefixCore::parent_of, "key"_a)
      .def("seqs", &PrefixCore::seqs)
      .def("children", &PrefixCore::children)
      .def("native_bytes", &PrefixCore::native_bytes);
}
