// Binds s3fifo_core.hpp's S3FifoCore into kvbm._native (module.cpp calls bind_s3fifo).
#include "s3fifo_core.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using s3fifocore::S3FifoCore;

void bind_s3fifo(nb::module_& m) {
  nb::class_<S3FifoCore>(m, "S3FifoCore",
                         "S3-FIFO's per-key state and verbs (policies/s3fifo.py decides; "
                         "kvbm.ops.s3fifo_core hands it out)")
      .def(nb::init<int64_t, int64_t, int>(), "small_target"_a, "ghost_size"_a, "threshold"_a)
      .def("insert", [](S3FifoCore& c, nb::handle key, nb::handle) { c.insert(key); }, "key"_a,
           "hints"_a = nb::none())
      .def("insert_many", [](S3FifoCore& c, nb::handle keys, nb::handle) { c.insert_many(keys); }, "keys"_a,
           "hints"_a = nb::none())
      .def("touch", &S3FifoCore::touch, "keys"_a)
      .def("batch_stored", &S3FifoCore::batch_stored, "keys"_a)
      .def("remove", &S3FifoCore::remove, "key"_a)
      .def("evict", &S3FifoCore::evict, "n"_a, "protected"_a = nb::none())
      .def("resident", &S3FifoCore::resident)
      .def("count", &S3FifoCore::count, "l"_a)
      .def("since_check", &S3FifoCore::since_check)
      .def("queue", &S3FifoCore::queue, "l"_a)
      .def("native_bytes", &S3FifoCore::native_bytes);
}
