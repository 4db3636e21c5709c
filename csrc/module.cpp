// kvbm._native: Python glue over the plain C++ ops in this folder. Only
// kvbm/ops.py imports it. Every op checks bounds with the GIL held, then
// releases the GIL for the work.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "copy_blocks.hpp"
#include "crc32c.hpp"
#include "thread_pool.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Offsets = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// A C-contiguous Python buffer (bytes, bytearray, memoryview, numpy array, mmap)
// held for the duration of one call; the export also stops it being resized.
class Buffer {
 public:
  Buffer(nb::handle obj, bool writable, const char* op, const char* name) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0) {
      nb::python_error cause;
      nb::raise_from(cause, PyExc_TypeError, "%s: %s must be a C-contiguous%s buffer", op, name,
                     writable ? ", writable" : "");
    }
  }
  ~Buffer() { PyBuffer_Release(&view_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

void check_batch(const char* op, size_t n, int64_t nbytes) {
  if (nbytes < 0) throw std::invalid_argument(std::string(op) + ": nbytes must be >= 0, got " +
                                              std::to_string(nbytes));
  if (nbytes > 0 && n > static_cast<size_t>(std::numeric_limits<int64_t>::max() / nbytes))
    throw std::invalid_argument(std::string(op) + ": len(offsets) * nbytes overflows int64");
}

uint32_t crc32c_py(nb::handle data, uint32_t crc) {
  Buffer buf(data, false, "crc32c", "data");
  nb::gil_scoped_release release;
  return kvbm::crc32c(crc, buf.data(), buf.size());
}

uint32_t crc32c_software_py(nb::handle data, uint32_t crc) {
  Buffer buf(data, false, "crc32c", "data");
  nb::gil_scoped_release release;
  return kvbm::crc32c_software(crc, buf.data(), buf.size());
}

nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>> crc32c_blocks_py(nb::handle data, Offsets offsets,
                                                                int64_t nbytes, unsigned threads) {
  const char* op = "crc32c_blocks";
  Buffer buf(data, false, op, "data");
  const size_t n = offsets.shape(0);
  check_batch(op, n, nbytes);
  kvbm::check_ranges(op, "offsets", offsets.data(), n, nbytes, buf.size());
  std::unique_ptr<uint32_t[]> out(new uint32_t[n]);
  {
    nb::gil_scoped_release release;
    threads = kvbm::pick_threads(threads, uint64_t(n) * uint64_t(nbytes));
    kvbm::crc32c_blocks(buf.data(), offsets.data(), n, nbytes, out.get(), threads);
  }
  nb::capsule owner(out.get(), [](void* p) noexcept { delete[] static_cast<uint32_t*>(p); });
  return nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(out.release(), {n}, owner);
}

void copy_blocks_py(nb::handle src, Offsets src_offsets, nb::handle dst, Offsets dst_offsets,
                    int64_t nbytes, unsigned threads) {
  const char* op = "copy_blocks";
  Buffer in(src, false, op, "src");
  Buffer out(dst, true, op, "dst");
  const size_t n = src_offsets.shape(0);
  if (dst_offsets.shape(0) != n)
    throw std::invalid_argument(std::string(op) + ": len(src_offsets) = " + std::to_string(n) +
                                " but len(dst_offsets) = " + std::to_string(dst_offsets.shape(0)));
  check_batch(op, n, nbytes);
  kvbm::check_ranges(op, "src_offsets", src_offsets.data(), n, nbytes, in.size());
  kvbm::check_ranges(op, "dst_offsets", dst_offsets.data(), n, nbytes, out.size());
  nb::gil_scoped_release release;
  threads = kvbm::pick_threads(threads, uint64_t(n) * uint64_t(nbytes));
  kvbm::copy_blocks(in.data(), src_offsets.data(), out.data(), dst_offsets.data(), n, nbytes,
                    threads);
}

}  // namespace

#ifdef KVBM_WITH_CUDA
void bind_cuda(nb::module_& m);  // cuda_bindings.cpp
#endif

NB_MODULE(_native, m) {
  m.doc() = "kvbm native ops; import through kvbm.ops, which has a fallback for each.";

  m.def("crc32c", &crc32c_py, "data"_a, "crc"_a = 0,
        "CRC-32C of a buffer, extending `crc` (the checksum of the bytes before it).");
  m.def("_crc32c_software", &crc32c_software_py, "data"_a, "crc"_a = 0,
        "crc32c through the portable slicing-by-8 path (for tests).");
  m.attr("crc32c_impl") = kvbm::crc32c_impl();
  m.def("crc32c_blocks", &crc32c_blocks_py, "data"_a, "offsets"_a, "nbytes"_a, "threads"_a = 0,
        "One CRC-32C per block: data[offsets[i] : offsets[i] + nbytes].");
  m.def("copy_blocks", &copy_blocks_py, "src"_a, "src_offsets"_a, "dst"_a, "dst_offsets"_a,
        "nbytes"_a, "threads"_a = 0,
        "dst[dst_offsets[i]:][:nbytes] = src[src_offsets[i]:][:nbytes] for every i.");

#ifdef KVBM_WITH_CUDA
  m.attr("built_with_cuda") = true;
  bind_cuda(m);
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_available", [] { return false; }, "Always False: built without CUDA.");
#endif
}
