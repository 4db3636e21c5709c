// kvbm._native: Python glue over the plain C++ ops in this folder. Only
// kvbm/ops.py imports it. Every op checks bounds with the GIL held, then
// releases the GIL for the work.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <optional>
#include <string>
#include <vector>

#include "copy_blocks.hpp"
#include "crc32c.hpp"
#include "file_io.hpp"
#include "guarded_copy.hpp"
#include "hitdensity_core.hpp"
#include "policy_core.hpp"
#include "stream_copy.hpp"
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

// The arguments of a gather/scatter (copy_blocks, copy_blocks_crc32c), checked once: src
// readable, dst writable, one dst offset per src offset, every block inside its buffer.
struct CopyBatch {
  Buffer in, out;
  size_t n;

  CopyBatch(const char* op, nb::handle src, const Offsets& src_offsets, nb::handle dst,
            const Offsets& dst_offsets, int64_t nbytes)
      : in(src, false, op, "src"), out(dst, true, op, "dst"), n(src_offsets.shape(0)) {
    if (dst_offsets.shape(0) != n)
      throw std::invalid_argument(std::string(op) + ": len(src_offsets) = " + std::to_string(n) +
                                  " but len(dst_offsets) = " + std::to_string(dst_offsets.shape(0)));
    check_batch(op, n, nbytes);
    kvbm::check_ranges(op, "src_offsets", src_offsets.data(), n, nbytes, in.size());
    kvbm::check_ranges(op, "dst_offsets", dst_offsets.data(), n, nbytes, out.size());
  }
};

void copy_blocks_py(nb::handle src, Offsets src_offsets, nb::handle dst, Offsets dst_offsets,
                    int64_t nbytes, unsigned threads) {
  CopyBatch b("copy_blocks", src, src_offsets, dst, dst_offsets, nbytes);
  nb::gil_scoped_release release;
  threads = kvbm::pick_threads(threads, uint64_t(b.n) * uint64_t(nbytes));
  kvbm::copy_blocks(b.in.data(), src_offsets.data(), b.out.data(), dst_offsets.data(), b.n, nbytes,
                    threads);
}

nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>> copy_blocks_crc32c_py(nb::handle src, Offsets src_offsets,
                                                                     nb::handle dst, Offsets dst_offsets,
                                                                     int64_t nbytes, unsigned threads) {
  CopyBatch b("copy_blocks_crc32c", src, src_offsets, dst, dst_offsets, nbytes);
  std::unique_ptr<uint32_t[]> crcs(new uint32_t[b.n]);
  {
    nb::gil_scoped_release release;
    threads = kvbm::pick_threads(threads, uint64_t(b.n) * uint64_t(nbytes));
    kvbm::copy_blocks_crc32c(b.in.data(), src_offsets.data(), b.out.data(), dst_offsets.data(), b.n,
                             nbytes, crcs.get(), threads);
  }
  nb::capsule owner(crcs.get(), [](void* p) noexcept { delete[] static_cast<uint32_t*>(p); });
  return nb::ndarray<nb::numpy, uint32_t, nb::ndim<1>>(crcs.release(), {b.n}, owner);
}

void copy_buffer_py(nb::handle dst, nb::handle src, bool stream) {
  const char* op = "copy_buffer";
  Buffer in(src, false, op, "src");
  Buffer out(dst, true, op, "dst");
  if (in.size() != out.size())
    throw std::invalid_argument(std::string(op) + ": src holds " + std::to_string(in.size()) +
                                " bytes but dst " + std::to_string(out.size()));
  nb::gil_scoped_release release;
  kvbm::copy_bytes(out.data(), in.data(), in.size(), stream);
}

using Crcs = nb::ndarray<uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Statuses = nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>;

// pwrite_blocks / pread_blocks: block i is nbytes at bufs[i] (a list of buffers), or at
// bufs + buf_offsets[i] (one buffer). Bad arguments raise; I/O errors are statuses.
Statuses file_io_py(bool write, int fd, nb::handle bufs, std::optional<Offsets> buf_offsets,
                    Offsets file_offsets, int64_t nbytes, unsigned threads, std::optional<Crcs> crcs) {
  const char* op = write ? "pwrite_blocks" : "pread_blocks";
  const std::string name = write ? "src" : "dst";
  const size_t n = file_offsets.shape(0);
  check_batch(op, n, nbytes);
  kvbm::check_file_offsets(op, file_offsets.data(), n, nbytes);
  auto mismatch = [&](const std::string& what, size_t len) {
    return std::invalid_argument(std::string(op) + ": len(" + what + ") = " + std::to_string(len) +
                                 " but len(file_offsets) = " + std::to_string(n));
  };
  if (crcs && crcs->shape(0) != n) throw mismatch("crcs", crcs->shape(0));
  std::vector<std::unique_ptr<Buffer>> held;
  std::vector<uint8_t*> ptrs(n);
  if (buf_offsets) {
    if (buf_offsets->shape(0) != n) throw mismatch(name + "_offsets", buf_offsets->shape(0));
    held.emplace_back(new Buffer(bufs, !write, op, name.c_str()));
    kvbm::check_ranges(op, (name + "_offsets").c_str(), buf_offsets->data(), n, nbytes,
                       held[0]->size());
    for (size_t i = 0; i < n; ++i) ptrs[i] = held[0]->data() + buf_offsets->data()[i];
  } else {
    if (!nb::isinstance<nb::list>(bufs))
      throw nb::type_error((std::string(op) + ": " + name + " must be a list of buffers when " +
                            name + "_offsets is None").c_str());
    nb::list list = nb::borrow<nb::list>(bufs);
    if (list.size() != n) throw mismatch(name, list.size());
    for (size_t i = 0; i < n; ++i) {
      const std::string item = name + "[" + std::to_string(i) + "]";
      held.emplace_back(new Buffer(list[i], !write, op, item.c_str()));
      if (static_cast<int64_t>(held.back()->size()) < nbytes)
        throw std::invalid_argument(std::string(op) + ": " + item + " holds " +
                                    std::to_string(held.back()->size()) + " bytes, fewer than nbytes " +
                                    std::to_string(nbytes));
      ptrs[i] = held.back()->data();
    }
  }
  std::unique_ptr<int32_t[]> status(new int32_t[n]);
  {
    nb::gil_scoped_release release;
    threads = kvbm::pick_threads(threads, uint64_t(n) * uint64_t(nbytes));
    uint32_t* crc_out = crcs ? crcs->data() : nullptr;
    if (write)
      kvbm::pwrite_blocks(fd, ptrs.data(), file_offsets.data(), n, nbytes, threads, status.get(), crc_out);
    else
      kvbm::pread_blocks(fd, ptrs.data(), file_offsets.data(), n, nbytes, threads, status.get(), crc_out);
  }
  nb::capsule owner(status.get(), [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
  return Statuses(status.release(), {n}, owner);
}

// A MAP_SHARED mapping of a file another process may truncate (the daemon's staging windows):
// only guarded copies (guarded_copy.hpp) touch it. close() while a copy runs unmaps when it ends.
class SharedMap {
 public:
  SharedMap(int fd, size_t nbytes) : p_(kvbm::map_shared(fd, nbytes)), len_(nbytes) {}
  ~SharedMap() { kvbm::unmap_shared(p_, len_); }
  SharedMap(const SharedMap&) = delete;
  SharedMap& operator=(const SharedMap&) = delete;
  size_t size() const { return len_; }
  bool closed() {
    std::lock_guard<std::mutex> lk(mu_);
    return closing_;
  }
  void close() {
    std::lock_guard<std::mutex> lk(mu_);
    closing_ = true;
    if (users_ == 0) unmap();
  }
  uint8_t* acquire() {
    std::lock_guard<std::mutex> lk(mu_);
    if (closing_) return nullptr;
    ++users_;
    return p_;
  }
  void release() {
    std::lock_guard<std::mutex> lk(mu_);
    if (--users_ == 0 && closing_) unmap();
  }

 private:
  void unmap() {
    kvbm::unmap_shared(p_, len_);
    p_ = nullptr;
  }
  std::mutex mu_;
  uint8_t* p_;
  size_t len_;
  size_t users_ = 0;
  bool closing_ = false;
};

// to_map: map block i = buf block i, else the other way; EFAULT for a block the mapping faulted
// in, EBADF for every block once the map is closed. Ranges are checked before any byte moves.
Statuses shared_map_copy_py(bool to_map, SharedMap& map, Offsets map_offsets, nb::handle buf,
                            Offsets buf_offsets, int64_t nbytes, unsigned threads) {
  const char* op = to_map ? "blocks_to_window" : "window_to_blocks";
  const size_t n = map_offsets.shape(0);
  if (buf_offsets.shape(0) != n)
    throw std::invalid_argument(std::string(op) + ": len(window_offsets) = " + std::to_string(n) +
                                " but len(buf_offsets) = " + std::to_string(buf_offsets.shape(0)));
  check_batch(op, n, nbytes);
  Buffer b(buf, !to_map, op, to_map ? "src" : "dst");
  kvbm::check_ranges(op, "window_offsets", map_offsets.data(), n, nbytes, map.size());
  kvbm::check_ranges(op, "buf_offsets", buf_offsets.data(), n, nbytes, b.size());
  std::unique_ptr<int32_t[]> status(new int32_t[n]);
  {
    nb::gil_scoped_release release;
    uint8_t* p = map.acquire();
    if (p == nullptr) {
      std::fill(status.get(), status.get() + n, EBADF);
    } else {
      threads = kvbm::pick_threads(threads, uint64_t(n) * uint64_t(nbytes));
      kvbm::guarded_copy_blocks(to_map, p, map.size(), map_offsets.data(), b.data(), buf_offsets.data(), n,
                                nbytes, threads, status.get());
      map.release();
    }
  }
  nb::capsule owner(status.get(), [](void* p) noexcept { delete[] static_cast<int32_t*>(p); });
  return Statuses(status.release(), {n}, owner);
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
  m.def("copy_blocks_crc32c", &copy_blocks_crc32c_py, "src"_a, "src_offsets"_a, "dst"_a, "dst_offsets"_a,
        "nbytes"_a, "threads"_a = 0,
        "copy_blocks and crc32c_blocks of the source in one pass over memory -> uint32 CRC per block.");
  m.def("copy_buffer", &copy_buffer_py, "dst"_a, "src"_a, "stream"_a = false,
        "One sequential copy of a whole buffer: libc memcpy, or streaming stores (stream=True).");
  m.attr("copy_stream_impl") = kvbm::copy_stream_impl();
  m.attr("stream_above") = kvbm::kStreamAbove;

  m.def(
      "pwrite_blocks",
      [](int fd, nb::handle src, std::optional<Offsets> src_offsets, Offsets file_offsets,
         int64_t nbytes, unsigned threads, std::optional<Crcs> crcs) {
        return file_io_py(true, fd, src, src_offsets, file_offsets, nbytes, threads, crcs);
      },
      "fd"_a, "src"_a, "src_offsets"_a.none(), "file_offsets"_a, "nbytes"_a, "threads"_a = 0,
      "crcs"_a.none() = nb::none(),
      "Write block i to the file at file_offsets[i]; int32 status per block (0 or errno).");
  m.def(
      "pread_blocks",
      [](int fd, nb::handle dst, std::optional<Offsets> dst_offsets, Offsets file_offsets,
         int64_t nbytes, unsigned threads, std::optional<Crcs> crcs) {
        return file_io_py(false, fd, dst, dst_offsets, file_offsets, nbytes, threads, crcs);
      },
      "fd"_a, "dst"_a, "dst_offsets"_a.none(), "file_offsets"_a, "nbytes"_a, "threads"_a = 0,
      "crcs"_a.none() = nb::none(),
      "Read block i from the file at file_offsets[i]; int32 status per block (0 or errno).");

  nb::class_<SharedMap>(m, "SharedMap", "A MAP_SHARED mapping only guarded copies touch (kvbm.ops.window_map).")
      .def(nb::init<int, size_t>(), "fd"_a, "nbytes"_a)
      .def("close", &SharedMap::close, "Unmap (once a copy in flight ends); later copies fail EBADF.")
      .def_prop_ro("closed", &SharedMap::closed)
      .def_prop_ro("nbytes", &SharedMap::size);
  m.def("shared_map_copy", &shared_map_copy_py, "to_map"_a, "map"_a, "map_offsets"_a, "buf"_a, "buf_offsets"_a,
        "nbytes"_a, "threads"_a = 0,
        "Block copies between a SharedMap and a buffer under a SIGBUS guard -> int32 status per block.");
  m.def("sigbus_guard_installed", &kvbm::sigbus_guard_installed, "True while the guard's SIGBUS handler is installed.");

  bind_hitdensity(m);  // hitdensity's per-key state (policies/hitdensity.py), via kvbm.ops
  bind_prefix(m);  // prefix, s3fifo and auto's minis (policies/_policy_native.py), via kvbm.ops
  bind_s3fifo(m);
  bind_auto(m);

#ifdef KVBM_WITH_CUDA
  m.attr("built_with_cuda") = true;
  bind_cuda(m);
#else
  m.attr("built_with_cuda") = false;
  m.def("cuda_available", [] { return false; }, "Always False: built without CUDA.");
#endif
}
