// S3-FIFO's per-key state and verbs in compiled code (policies/s3fifo.py decides; this is the
// same algorithm, decision for decision, with keys mapped to integer slots).
//
//   keys      two Python dicts: resident key -> slot (small, main and parked keys), ghost
//             key -> slot
//   queues    small, main, ghost and parked as doubly linked lists over per-slot arrays, in
//             the order of the Python version's OrderedDicts / dict (oldest first); a slot
//             keeps its 2-bit freq and, while parked, the queue it came from
//   evict     the Python version's loop: the count check first (after it evict cannot fail),
//             protected keys parked, the parked keys looked at again after as many victims
//
// Called with the GIL held. Only kvbm/ops.py hands this class out; s3fifo_core.cpp binds it,
// auto_core.cpp calls it directly for auto's minis.
#pragma once

#include "policy_core.hpp"

#include <cstdint>
#include <stdexcept>
#include <vector>


namespace s3fifocore {

namespace nb = nanobind;
using policycore::Keys;
using policycore::Protected;
using policycore::raise_python;

constexpr int kSmall = 0, kMain = 1, kGhost = 2, kParked = 3, kFree = 4;  // a slot's list


class S3FifoCore {
 public:
  S3FifoCore(int64_t small_target, int64_t ghost_size, int threshold)
      : small_target_(small_target), ghost_size_(ghost_size), threshold_(threshold) {
    resident_ = PyDict_New();
    ghosts_ = PyDict_New();
    if (!resident_ || !ghosts_) raise_python();
    for (int l = 0; l < 4; ++l) head_[l] = tail_[l] = -1, count_[l] = 0;
  }
  ~S3FifoCore() {
    Py_XDECREF(resident_);
    Py_XDECREF(ghosts_);
    for (PyObject* k : key_) Py_XDECREF(k);
    for (PyObject* s : slot_int_) Py_XDECREF(s);
  }
  S3FifoCore(const S3FifoCore&) = delete;
  S3FifoCore& operator=(const S3FifoCore&) = delete;

  void insert(nb::handle key) { insert_key(key.ptr()); }
  void insert_one(PyObject* key) { insert_key(key); }

  void insert_many(nb::handle keys) {
    Keys k(keys);
    for (Py_ssize_t i = 0; i < k.size(); ++i) insert_key(k[i]);
  }

  void touch(nb::handle keys) {
    Keys k(keys);
    for (Py_ssize_t i = 0; i < k.size(); ++i) touch_key(k[i]);
  }

  void touch_key(PyObject* key) {
    int32_t s = find(resident_, key);
    if (s >= 0 && freq_[s] < 3) freq_[s] += 1;
  }

  void batch_stored(nb::handle) {}

  void remove(nb::handle key) {
    int32_t s = find(resident_, key.ptr());
    if (s >= 0) {
      if (PyDict_DelItem(resident_, key_[s]) != 0) raise_python();
    } else {
      s = find(ghosts_, key.ptr());
      if (s < 0) return;
      if (PyDict_DelItem(ghosts_, key_[s]) != 0) raise_python();
    }
    unlink(s);
    release(s);
  }

  nb::object evict(int64_t n, nb::handle protected_keys) {
    if (n <= 0) return nb::steal(PyList_New(0));
    Protected prot(protected_keys);
    return evict_(n, prot, true);
  }

  void evict_quiet(int64_t n) {  // evict(n, ()) with the victims dropped (auto's minis)
    if (n > 0) evict_(n, Protected(), false);
  }

 private:
  nb::object evict_(int64_t n, const Protected& prot, bool want_list) {
    const int64_t size = count_[kSmall] + count_[kMain] + count_[kParked];
    if (prot.any()) {
      Py_ssize_t np = PyObject_Size(prot.get());
      if (np < 0) raise_python();
      if (size - np < n) {  // rarely: count only the protected keys held here
        int64_t held = 0;
        PyObject* it = PyObject_GetIter(prot.get());
        if (!it) raise_python();
        nb::object iter = nb::steal(it);
        while (PyObject* k = PyIter_Next(it)) {
          int r = PyDict_Contains(resident_, k);
          Py_DECREF(k);
          if (r < 0) raise_python();
          held += r;
        }
        if (PyErr_Occurred()) raise_python();
        if (size - held < n) return nb::none();
      }
    } else if (size < n) {
      return nb::none();
    }
    if (count_[kParked] && since_check_ >= count_[kParked]) unpark(prot);
    PyObject* out = want_list ? PyList_New(0) : nullptr;
    if (want_list && !out) raise_python();
    nb::object result = out ? nb::steal(out) : nb::none();
    int64_t victims = 0;
    while (victims < n) {
      if (!count_[kSmall] && !count_[kMain]) unpark(prot);  // the rest are parked: some are free now
      if (count_[kSmall] && (count_[kSmall] >= small_target_ || !count_[kMain])) {
        int32_t s = head_[kSmall];
        if (prot.has(key_[s])) {  // asked before s leaves its queue: an error leaves it there
          unlink(s);
          from_small_[s] = 1;
          append(s, kParked);
        } else if (freq_[s] >= threshold_) {
          unlink(s);
          freq_[s] = 0;
          append(s, kMain);
        } else {
          // what can fail first, while s is still resident at the head of small
          if (out && PyList_Append(out, key_[s]) != 0) raise_python();
          if (PyDict_DelItem(resident_, key_[s]) != 0) raise_python();
          unlink(s);
          ++victims;
          if (PyDict_SetItem(ghosts_, key_[s], slot_int_[s]) != 0) {  // no ghost: forgotten
            release(s);
            raise_python();
          }
          append(s, kGhost);
          while (count_[kGhost] > ghost_size_) {  // one at a time, unless a trim failed before
            int32_t g = head_[kGhost];
            if (PyDict_DelItem(ghosts_, key_[g]) != 0) raise_python();
            unlink(g);
            release(g);
          }
        }
      } else {
        int32_t s = head_[kMain];
        if (s < 0) throw std::logic_error("s3fifo core: no key left to evict");
        if (prot.has(key_[s])) {
          unlink(s);
          from_small_[s] = 0;
          append(s, kParked);
        } else if (freq_[s] > 0) {
          unlink(s);
          freq_[s] -= 1;
          append(s, kMain);
        } else {
          if (out && PyList_Append(out, key_[s]) != 0) raise_python();
          if (PyDict_DelItem(resident_, key_[s]) != 0) raise_python();
          unlink(s);
          ++victims;
          release(s);
        }
      }
    }
    since_check_ += n;
    return result;
  }

 public:

  nb::object resident() const { return nb::borrow(resident_); }
  int64_t count(int l) const { return l >= 0 && l < 4 ? count_[l] : 0; }
  int64_t since_check() const { return since_check_; }

  nb::object queue(int l) const {  // key -> freq in queue order (ghosts: key -> None; parked:
    nb::dict out;                  // key -> [came from small, freq]) (tests)
    if (l < 0 || l > 3) throw std::out_of_range("s3fifo core: queue is 0..3");
    for (int32_t s = head_[l]; s >= 0; s = next_[s]) {
      if (l == kGhost) out[nb::handle(key_[s])] = nb::none();
      else if (l == kParked) {
        nb::list e;
        e.append(nb::bool_(from_small_[s] != 0));
        e.append(static_cast<int>(freq_[s]));
        out[nb::handle(key_[s])] = e;
      } else out[nb::handle(key_[s])] = static_cast<int>(freq_[s]);
    }
    return out;
  }

  size_t native_bytes() const {
    size_t n = sizeof(*this);
    n += (key_.capacity() + slot_int_.capacity()) * sizeof(PyObject*);
    n += (prev_.capacity() + next_.capacity() + free_.capacity()) * sizeof(int32_t);
    n += freq_.capacity() + list_.capacity() + from_small_.capacity();
    return n;
  }

 private:
  // One probe of the resident map for a new or resident key (set_default), where a lookup and
  // then an insert took two; the ghosts are asked only when there are any. A returning ghost
  // goes on under the new slot (its old one freed): slots decide nothing, only list order does.
  void insert_key(PyObject* key) {
    int32_t s = take(key);
    PyObject* v = policycore::set_default(resident_, key, slot_int_[s]);
    if (v != slot_int_[s]) {  // resident already (or an error): touch((key,))
      release(s);
      if (!v) raise_python();
      int32_t r = slot_of(resident_, v);
      if (freq_[r] < 3) freq_[r] += 1;
      return;
    }
    int32_t g = -1;
    if (count_[kGhost]) {
      try {
        g = find(ghosts_, key);
        if (g >= 0 && PyDict_DelItem(ghosts_, key_[g]) != 0) raise_python();
      } catch (...) {  // nothing changed: the new entry taken back
        policycore::undo_set(resident_, key);
        release(s);
        throw;
      }
    }
    if (g >= 0) {  // a ghost: into main
      unlink(g);
      release(g);
    }
    freq_[s] = 0;
    append(s, g >= 0 ? kMain : kSmall);
  }

  void unpark(const Protected& prot) {  // parked keys no longer protected: back to their queue
    since_check_ = 0;
    for (int32_t s = head_[kParked]; s >= 0;) {
      int32_t nxt = next_[s];
      if (!prot.has(key_[s])) {
        unlink(s);
        append(s, from_small_[s] ? kSmall : kMain);
      }
      s = nxt;
    }
  }

  int32_t find(PyObject* dict, PyObject* key) const {
    PyObject* v = PyDict_GetItemWithError(dict, key);
    if (!v) {
      if (PyErr_Occurred()) raise_python();
      return -1;
    }
    return slot_of(dict, v);
  }

  int32_t slot_of(PyObject* dict, PyObject* v) const {  // the slot whose int is dict's value v
    long s = PyLong_AsLong(v);
    if (s < 0 || static_cast<size_t>(s) >= slot_int_.size() || slot_int_[s] != v || list_[s] == kFree ||
        (list_[s] == kGhost) != (dict == ghosts_)) {  // kFree: unlink would index past the lists
      if (PyErr_Occurred()) raise_python();
      throw std::runtime_error("s3fifo core: its key map was changed from outside");
    }
    return static_cast<int32_t>(s);
  }

  int32_t take(PyObject* key) {
    int32_t s;
    if (!free_.empty()) {
      s = free_.back();
      free_.pop_back();
    } else {
      s = static_cast<int32_t>(key_.size());
      PyObject* i = PyLong_FromLong(s);
      if (!i) raise_python();
      slot_int_.push_back(i);
      key_.push_back(nullptr);
      prev_.push_back(-1);
      next_.push_back(-1);
      freq_.push_back(0);
      list_.push_back(kFree);
      from_small_.push_back(0);
    }
    Py_INCREF(key);
    key_[s] = key;
    list_[s] = kFree;
    return s;
  }

  void release(int32_t s) {
    PyObject* k = key_[s];
    key_[s] = nullptr;
    list_[s] = kFree;
    free_.push_back(s);
    Py_DECREF(k);
  }

  void append(int32_t s, int l) {
    list_[s] = static_cast<uint8_t>(l);
    prev_[s] = tail_[l];
    next_[s] = -1;
    if (tail_[l] >= 0) next_[tail_[l]] = s;
    else head_[l] = s;
    tail_[l] = s;
    count_[l] += 1;
  }

  void unlink(int32_t s) {
    int l = list_[s];
    int32_t p = prev_[s], n = next_[s];
    if (p >= 0) next_[p] = n;
    else head_[l] = n;
    if (n >= 0) prev_[n] = p;
    else tail_[l] = p;
    count_[l] -= 1;
    list_[s] = kFree;
  }

  PyObject* resident_ = nullptr;  // key -> slot int: small, main and parked keys
  PyObject* ghosts_ = nullptr;
  std::vector<PyObject*> key_, slot_int_;
  std::vector<int32_t> prev_, next_, free_;
  std::vector<uint8_t> freq_, list_, from_small_;
  int32_t head_[4], tail_[4];
  int64_t count_[4];
  int64_t small_target_, ghost_size_, since_check_ = 0;
  int threshold_;
};

}  // namespace s3fifocore
