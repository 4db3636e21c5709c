// auto's miniature simulations fed in one compiled call (policies/auto.py's _feed decides;
// this is the same, step for step): the call's keys sampled by hash, then for each mini its
// hits among the sampled keys touched, its prefix hits counted while the request is alive for
// it, the misses made room for and inserted as the manager would. MiniFeed keeps the minis
// and auto's alive/score/differ lists (auto updates those in place).
//
//   minis     one tuple per mini: (kind, resident dict, core, touch, evict, insert, deepest
//             first); kind 0 = hitdensity (insert(keys, run_length, ends_run)), 1 = structured
//             (insert(keys, parents): each sampled key's parent is the sampled key before
//             it), 2 = plain (insert(keys)), 3 = auto's real tier standing in for the mini
//             (its keys asked and its prefix hits counted, never fed); a PrefixCore or S3FifoCore is called directly,
//             other cores through their bound methods
//   scores    `alive` (per mini: no miss yet in this request), `score` (prefix hits) and
//             `differ` (|hits - the active mini's|, where any differ) updated in place, the
//             same float additions as _feed's
//
// Called with the GIL held. Only kvbm/ops.py hands this class out.
#include "policy_core.hpp"
#include "prefix_core.hpp"
#include "s3fifo_core.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;
using policycore::Keys;
using policycore::raise_python;
using prefixcore::PrefixCore;
using s3fifocore::S3FifoCore;

namespace {

nb::object list_of(const std::vector<PyObject*>& items, bool reversed) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(items.size());
  PyObject* out = PyList_New(n);
  if (!out) raise_python();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* k = items[reversed ? n - 1 - i : i];
    Py_INCREF(k);
    PyList_SET_ITEM(out, i, k);
  }
  return nb::steal(out);
}

void call(PyObject* fn, std::initializer_list<PyObject*> args) {
  PyObject* r = PyObject_Vectorcall(fn, const_cast<PyObject**>(args.begin()), args.size(), nullptr);
  if (!r) raise_python();
  Py_DECREF(r);
}

}  // namespace

void add_float(PyObject* list, Py_ssize_t i, int64_t j) {  // list[i] += j, as Python adds
  double x = PyFloat_AsDouble(PyList_GET_ITEM(list, i));
  if (x == -1.0 && PyErr_Occurred()) raise_python();
  PyObject* v = PyFloat_FromDouble(x + static_cast<double>(j));
  if (!v) raise_python();
  PyList_SetItem(list, i, v);
}

void feed_minis(nb::handle minis, const std::vector<PyObject*>& sample, nb::handle parent, int64_t run_length,
                bool ends_run, int64_t capacity, nb::handle alive, nb::handle score, nb::handle differ,
                Py_ssize_t active) {
  Keys specs(minis);
  const Py_ssize_t n = static_cast<Py_ssize_t>(sample.size()), nm = specs.size();
  PyObject* alive_list = alive.ptr();
  PyObject* score_list = score.ptr();
  PyObject* differ_list = differ.ptr();
  for (PyObject* l : {alive_list, score_list, differ_list})
    if (!PyList_Check(l) || PyList_GET_SIZE(l) != nm)
      throw std::invalid_argument("feed_minis: alive, score and differ must be lists, one item per mini");
  if (active < 0 || active >= nm) throw std::invalid_argument("feed_minis: active out of range");
  std::vector<int64_t> counted(static_cast<size_t>(nm), 0);
  nb::object before;  // sampled key -> the sampled key before it (the last occurrence wins)
  nb::object empty = nb::steal(PyTuple_New(0));
  std::vector<PyObject*> hits, fresh, parents;
  std::vector<char> held;  // per sampled key: in this mini before the call
  std::vector<Py_hash_t> hashes;
  int distinct = -1;  // the sampled keys all distinct: 1, not: 0, not yet known: -1
  for (Py_ssize_t i = 0; i < nm; ++i) {
    PyObject* spec = specs[i];
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 7)
      throw std::invalid_argument("feed_minis: each mini is (kind, resident, core, touch, evict, insert, reverse)");
    const long kind = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    PyObject* resident = PyTuple_GET_ITEM(spec, 1);
    nb::handle core(PyTuple_GET_ITEM(spec, 2));
    PyObject* touch = PyTuple_GET_ITEM(spec, 3);
    PyObject* evict = PyTuple_GET_ITEM(spec, 4);
    PyObject* insert = PyTuple_GET_ITEM(spec, 5);
    const bool reverse = PyObject_IsTrue(PyTuple_GET_ITEM(spec, 6)) == 1;
    if (!PyDict_Check(resident)) throw std::invalid_argument("feed_minis: resident must be a dict");
    PrefixCore* prefix = kind == 1 && nb::isinstance<PrefixCore>(core) ? nb::inst_ptr<PrefixCore>(core) : nullptr;
    S3FifoCore* s3 = kind == 2 && nb::isinstance<S3FifoCore>(core) ? nb::inst_ptr<S3FifoCore>(core) : nullptr;
    hits.clear();
    held.assign(static_cast<size_t>(n), 0);
    Py_ssize_t lead = -1;  // the leading sampled keys it holds
    for (Py_ssize_t j = 0; j < n; ++j) {
      int r = PyDict_Contains(resident, sample[j]);
      if (r < 0) raise_python();
      if (r) {
        hits.push_back(sample[j]);
        held[static_cast<size_t>(j)] = 1;
      } else if (lead < 0) {
        lead = j;
      }
    }
    const Py_ssize_t nhits = static_cast<Py_ssize_t>(hits.size());
    int is_alive = PyObject_IsTrue(PyList_GET_ITEM(alive_list, i));
    if (is_alive < 0) raise_python();
    if (is_alive) {
      int64_t got = n;
      if (nhits != n) {
        got = lead;
        Py_INCREF(Py_False);
        PyList_SetItem(alive_list, i, Py_False);
      }
      counted[i] = got;
      add_float(score_list, i, got);
    }
    if (kind == 3) continue;  // auto's real tier standing in for this mini: asked, never fed
    if (nhits) {
      if (prefix || s3) {  // no list made: the same keys in the same order
        for (Py_ssize_t j = 0; j < nhits; ++j) {
          PyObject* k = hits[reverse ? nhits - 1 - j : j];
          if (prefix) prefix->touch_key(k);
          else s3->touch_key(k);
        }
      } else {
        nb::object h = list_of(hits, reverse);
        call(touch, {h.ptr()});
      }
    }
    if (nhits == n) continue;
    fresh.clear();
    for (Py_ssize_t j = 0; j < n; ++j)  // the misses: a touch neither adds nor drops a key, so
      if (!held[static_cast<size_t>(j)]) fresh.push_back(sample[j]);  // _feed's second ask agrees
    const int64_t nfresh = static_cast<int64_t>(fresh.size());
    const int64_t room = static_cast<int64_t>(PyDict_Size(resident)) + nfresh - capacity;
    if (room > 0 && nfresh > capacity) continue;  // the manager refuses a store larger than the tier
    if (room > 0) {
      if (prefix) prefix->evict_quiet(room);
      else if (s3) s3->evict_quiet(room);
      else {
        nb::object r = nb::int_(room);
        call(evict, {r.ptr(), empty.ptr()});
      }
    }
    if (kind == 0) {
      nb::object keys = list_of(fresh, false);
      nb::object len = nb::int_(run_length);
      call(insert, {keys.ptr(), len.ptr(), ends_run ? Py_True : Py_False});
    } else if (kind == 1) {
      // each fresh key's parent: the sampled key before its last occurrence (dict(zip(...))).
      // Where no two sampled keys share a hash, no key occurs twice (equal keys hash equal):
      // its last occurrence is its own position, no map needed (the usual case)
      if (n > 16 && distinct < 0) {
        hashes.clear();
        for (Py_ssize_t j = 0; j < n; ++j) {
          Py_hash_t h = PyObject_Hash(sample[j]);
          if (h == -1 && PyErr_Occurred()) raise_python();
          hashes.push_back(h);
        }
        std::sort(hashes.begin(), hashes.end());
        distinct = std::adjacent_find(hashes.begin(), hashes.end()) == hashes.end() ? 1 : 0;
      }
      if (n > 16 && distinct == 0 && !before.is_valid()) {
        PyObject* d = PyDict_New();
        if (!d) raise_python();
        before = nb::steal(d);
        PyObject* prev = parent.ptr();
        for (Py_ssize_t j = 0; j < n; ++j) {
          if (PyDict_SetItem(d, sample[j], prev) != 0) raise_python();
          prev = sample[j];
        }
      }
      parents.clear();
      if (distinct == 1) {
        for (Py_ssize_t j = 0; j < n; ++j)
          if (!held[static_cast<size_t>(j)]) parents.push_back(j ? sample[j - 1] : parent.ptr());
      }
      if (distinct != 1) for (PyObject* k : fresh) {
        PyObject* p = nullptr;
        if (before.is_valid()) {
          p = PyDict_GetItemWithError(before.ptr(), k);
          if (!p && PyErr_Occurred()) raise_python();
        } else {
          for (Py_ssize_t j = n - 1; j >= 0 && !p; --j) {
            int eq = sample[j] == k ? 1 : PyObject_RichCompareBool(sample[j], k, Py_EQ);
            if (eq < 0) raise_python();
            if (eq) p = j ? sample[j - 1] : parent.ptr();
          }
        }
        if (!p) {
          PyErr_SetObject(PyExc_KeyError, k);
          raise_python();
        }
        parents.push_back(p);
      }
      if (prefix) {
        for (size_t j = 0; j < fresh.size(); ++j) prefix->insert_linked_key(fresh[j], parents[j]);
      } else {
        nb::object keys = list_of(fresh, false);
        nb::object ps = list_of(parents, false);
        call(insert, {keys.ptr(), ps.ptr()});
      }
    } else if (s3) {
      const size_t m = fresh.size();
      for (size_t j = 0; j < m; ++j) s3->insert_one(fresh[reverse ? m - 1 - j : j]);
    } else {
      nb::object keys = list_of(fresh, reverse);
      call(insert, {keys.ptr()});
    }
  }
  const int64_t ja = counted[active];
  bool any = false;
  for (int64_t j : counted) any = any || j != ja;
  if (any)  // a paired test: where the two outcomes differ
    for (Py_ssize_t i = 0; i < nm; ++i) add_float(differ_list, i, counted[i] > ja ? counted[i] - ja : ja - counted[i]);
}

// auto's sample and its minis' step for one call: _feed from the sample on.
class MiniFeed {
 public:
  MiniFeed(nb::handle minis, uint64_t mix, uint64_t mask, uint64_t threshold, int64_t capacity, nb::handle alive,
           nb::handle score, nb::handle differ)
      : minis_(nb::borrow(minis)), alive_(nb::borrow(alive)), score_(nb::borrow(score)),
        differ_(nb::borrow(differ)), mix_(mix), mask_(mask), threshold_(threshold), capacity_(capacity) {}

  // None where no key of the call is sampled (nothing changes), else (sampled keys, the last one)
  nb::object feed(nb::handle keys, bool stored, bool new_request, nb::handle last, Py_ssize_t active) {
    Keys k(keys);
    sample_.clear();
    if (threshold_ > mask_) {  // rate 1: every key passes (hash & mask <= mask < threshold)
      for (Py_ssize_t i = 0; i < k.size(); ++i) sample_.push_back(k[i]);
    } else for (Py_ssize_t i = 0; i < k.size(); ++i) {  // hashed_sample: (hash(k) * mix) & mask < threshold
      Py_hash_t h = PyObject_Hash(k[i]);
      if (h == -1 && PyErr_Occurred()) raise_python();
      if (((static_cast<uint64_t>(h) * mix_) & mask_) < threshold_) sample_.push_back(k[i]);
    }
    if (sample_.empty()) return nb::none();
    PyObject* alive = alive_.ptr();
    if (new_request)  // a new request: alive again in every mini, no sampled parent yet
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(alive); ++i) {
        Py_INCREF(Py_True);
        PyList_SetItem(alive, i, Py_True);
      }
    nb::handle parent = new_request ? nb::handle(Py_None) : last;
    const bool ends_run = stored && sample_.back() == k[k.size() - 1];
    nb::object tail = nb::borrow(sample_.back());  // kept alive through the minis' calls
    feed_minis(minis_, sample_, parent, k.size(), ends_run, capacity_, alive_, score_, differ_, active);
    return nb::make_tuple(static_cast<int64_t>(sample_.size()), tail);
  }

 private:
  nb::object minis_, alive_, score_, differ_;
  uint64_t mix_, mask_, threshold_;
  int64_t capacity_;
  std::vector<PyObject*> sample_;
};

// auto's parents map (resident key -> its parent), kept per call at C speed: insert_many's
// parents.update((k, h.parent) for k, h in zip(keys, hints) if h is not None) and evict's
// parents.pop(v, None) for each victim. policies/_policy_native.py has both in Python.
void link_parents(nb::handle parents, nb::handle keys, nb::handle hints) {
  PyObject* d = parents.ptr();
  if (!PyDict_Check(d)) throw std::invalid_argument("link_parents: parents must be a dict");
  Keys k(keys), h(hints);
  const Py_ssize_t n = k.size() < h.size() ? k.size() : h.size();
  static PyObject* name = nullptr;  // "parent", interned once (kept for the process)
  if (!name && !(name = PyUnicode_InternFromString("parent"))) raise_python();
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (h[i] == Py_None) continue;
    PyObject* p = PyObject_GetAttr(h[i], name);
    if (!p) raise_python();
    const int r = PyDict_SetItem(d, k[i], p);
    Py_DECREF(p);
    if (r != 0) raise_python();
  }
}

void forget_keys(nb::handle parents, nb::handle victims) {
  PyObject* d = parents.ptr();
  if (!PyDict_Check(d)) throw std::invalid_argument("forget_keys: parents must be a dict");
  Keys v(victims);
  for (Py_ssize_t i = 0; i < v.size(); ++i) {
#if PY_VERSION_HEX >= 0x030D0000
    if (PyDict_Pop(d, v[i], nullptr) < 0) raise_python();
#else
    PyObject* r = _PyDict_Pop(d, v[i], Py_None);
    if (!r) raise_python();
    Py_DECREF(r);
#endif
  }
}

void bind_auto(nb::module_& m) {
  m.def("auto_link_parents", &link_parents, "parents"_a, "keys"_a, "hints"_a,
        "parents.update((k, h.parent) for k, h in zip(keys, hints) if h is not None) (auto's parents map)");
  m.def("auto_forget_keys", &forget_keys, "parents"_a, "victims"_a,
        "parents.pop(v, None) for each victim (auto's parents map)");
  nb::class_<MiniFeed>(m, "MiniFeed",
                       "auto's key sample and miniature simulations fed in one call (policies/auto.py's _feed)")
      .def(nb::init<nb::handle, uint64_t, uint64_t, uint64_t, int64_t, nb::handle, nb::handle, nb::handle>(),
           "minis"_a, "mix"_a, "mask"_a, "threshold"_a, "capacity"_a, "alive"_a, "score"_a, "differ"_a)
      .def("feed", &MiniFeed::feed, "keys"_a, "stored"_a, "new_request"_a, "last"_a.none(), "active"_a);
}
