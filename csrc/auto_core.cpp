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
//             (its keys asked and its prefix hits counted, never fed); a PrefixCore, S3FifoCore
//             or HitDensityCore is called directly, other cores through their bound methods
//   scores    `alive` (per mini: no miss yet in this request), `score` (prefix hits) and
//             `differ` (|hits - the active mini's|, where any differ) updated in place, the
//             same float additions as _feed's
//
// Called with the GIL held. Only kvbm/ops.py hands this class out.
#include "hitdensity_core.hpp"
#include "policy_core.hpp"
#include "prefix_core.hpp"
#include "s3fifo_core.hpp"

#include <structmember.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
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
    HitDensityCore* hd = kind == 0 ? hitdensity_feed::cast(core) : nullptr;
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
      } else if (hd) {
        if (reverse) std::reverse(hits.begin(), hits.end());
        hitdensity_feed::touch(hd, hits.data(), nhits);
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
      else if (hd) hitdensity_feed::evict_quiet(hd, room);
      else {
        nb::object r = nb::int_(room);
        call(evict, {r.ptr(), empty.ptr()});
      }
    }
    if (hd) {
      hitdensity_feed::insert_run(hd, fresh.data(), static_cast<Py_ssize_t>(fresh.size()), run_length, ends_run);
    } else if (kind == 0) {
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
        PrefixCore::Batch batch(*prefix);
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
    nb::object tail;
    const int64_t n = feed_raw(keys, stored, new_request, last, active, tail);
    if (!n) return nb::none();
    return nb::make_tuple(n, tail);
  }

  // feed without the tuple: the sampled keys (0: none, nothing changed) and the last of them
  int64_t feed_raw(nb::handle keys, bool stored, bool new_request, nb::handle last, Py_ssize_t active,
                   nb::object& tail) {
    Keys k(keys);
    sample_.clear();
    if (threshold_ > mask_) {  // rate 1: every key passes (hash & mask <= mask < threshold)
      for (Py_ssize_t i = 0; i < k.size(); ++i) sample_.push_back(k[i]);
    } else for (Py_ssize_t i = 0; i < k.size(); ++i) {  // hashed_sample: (hash(k) * mix) & mask < threshold
      Py_hash_t h = PyObject_Hash(k[i]);
      if (h == -1 && PyErr_Occurred()) raise_python();
      if (((static_cast<uint64_t>(h) * mix_) & mask_) < threshold_) sample_.push_back(k[i]);
    }
    if (sample_.empty()) return 0;
    PyObject* alive = alive_.ptr();
    if (new_request)  // a new request: alive again in every mini, no sampled parent yet
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(alive); ++i) {
        Py_INCREF(Py_True);
        PyList_SetItem(alive, i, Py_True);
      }
    nb::handle parent = new_request ? nb::handle(Py_None) : last;
    const bool ends_run = stored && sample_.back() == k[k.size() - 1];
    tail = nb::borrow(sample_.back());  // kept alive through the minis' calls
    feed_minis(minis_, sample_, parent, k.size(), ends_run, capacity_, alive_, score_, differ_, active);
    return static_cast<int64_t>(sample_.size());
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
// h.parent (a new reference, nullptr with an error set). Hints has __slots__: where h's type
// reads attributes the generic way and `parent` is its slot (a member descriptor), the slot is
// read at its offset, as that descriptor's __get__ does; the type's version tag, checked on each
// use, drops the shortcut if the class changes. Anything else: getattr.
PyObject* parent_of(PyObject* h) {
  static PyObject* name = nullptr;  // "parent", interned once (kept for the process)
  static PyTypeObject* type = nullptr;  // the type whose slot offset is known (a strong reference)
  static unsigned int tag = 0;
  static Py_ssize_t offset = 0;
  if (!name && !(name = PyUnicode_InternFromString("parent"))) return nullptr;
  PyTypeObject* t = Py_TYPE(h);
  if (t != type || !tag || t->tp_version_tag != tag) {
    if (t->tp_getattro != PyObject_GenericGetAttr) return PyObject_GetAttr(h, name);
    PyObject* d = _PyType_Lookup(t, name);  // borrowed; sets the type's version tag
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type) || !PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG))
      return PyObject_GetAttr(h, name);
    PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
    if (m->type != T_OBJECT_EX || reinterpret_cast<PyMemberDescrObject*>(d)->d_common.d_type != t)
      return PyObject_GetAttr(h, name);
    Py_INCREF(t);
    Py_XDECREF(reinterpret_cast<PyObject*>(type));
    type = t;
    tag = t->tp_version_tag;
    offset = m->offset;
  }
  PyObject* v = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(h) + offset);
  if (!v) return PyObject_GetAttr(h, name);  // unset slot: getattr raises AttributeError
  Py_INCREF(v);
  return v;
}

void link_parents(nb::handle parents, nb::handle keys, nb::handle hints) {
  PyObject* d = parents.ptr();
  if (!PyDict_Check(d)) throw std::invalid_argument("link_parents: parents must be a dict");
  Keys k(keys), h(hints);
  const Py_ssize_t n = k.size() < h.size() ? k.size() : h.size();
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (h[i] == Py_None) continue;
    PyObject* p = parent_of(h[i]);
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

// auto's per-call plumbing (policies/auto.py's insert_many, touch and _feed, line for line),
// compiled: the request boundaries, the key lists of the request being served, the mini feed
// and its counters, the real tier's call and the parents map. The state stays in the policy's
// own attributes (read and written here through its __dict__), so the Python decisions
// (_choose, _swap, _switch_cold) see and change the same values; _choose is called back when
// a check is due. AutoPlumb holds a weak reference to the policy (the policy holds it).
class AutoPlumb {
 public:
  explicit AutoPlumb(nb::handle policy) {
    PyObject* w = PyWeakref_NewRef(policy.ptr(), nullptr);
    if (!w) raise_python();
    weak_ = nb::steal(w);
  }

  void insert_many(nb::handle keys_in, nb::handle hints) {
    Self self(weak_);
    nb::object keys = as_sequence(keys_in);
    const Py_ssize_t nk = PySequence_Fast_GET_SIZE(keys.ptr());
    if (!nk) return;
    PyObject* k0 = PySequence_Fast_ITEMS(keys.ptr())[0];
    PyObject* h = hints.ptr();
    const bool per_key = PyList_Check(h) || PyTuple_Check(h);
    nb::object first = per_key ? steal_or_raise(PySequence_GetItem(h, 0)) : nb::borrow(h);
    if (!first.is_none()) self.set(n().structured, Py_True);
    if (first.is_none()) {  // no structure given: a store after a store starts a new request
      if (self.truth(n().stored_last)) self.new_request();
    } else {
      nb::object parent = steal_or_raise(parent_of(first.ptr()));
      if (parent.is_none()) {
        self.set(n().structured, Py_True);
        if (PyDict_SetItem(self.get(n().parents), k0, Py_None) != 0) raise_python();
        self.new_request();
      } else if (self.truth(n().req) && !contains(nb::borrow(self.get(n().parents)).ptr(), parent.ptr()) &&
                 !any_holds(nb::borrow(self.get(n().req)).ptr(), parent.ptr())) {
        self.new_request();  // a chain goes on only from a key of the request being served
      }
    }
    self.note_request(keys.ptr(), nk);
    const bool shared = self.truth(n().shared);
    if (shared) feed(self, keys.ptr(), true);  // the tier's hits are read before the keys go in
    PyObject* real = self.get(n().real);  // (after the feed: a switch may have come)
    nb::object hold_real = nb::borrow(real);
    nb::object wants = steal_or_raise(PyObject_GetAttr(real, n().wants_structure));
    if (truth(wants.ptr())) {
      call_method(real, n().insert_many, {keys.ptr(), h});
    } else if (self.reversed_active()) {
      nb::object rev = reversed_list(keys.ptr());
      call_method(real, n().insert_many, {rev.ptr(), Py_None});
    } else {
      call_method(real, n().insert_many, {keys.ptr(), Py_None});
    }
    if (per_key) {
      nb::object parents = nb::borrow(self.get(n().parents));
      link_parents(parents, keys, hints);
    } else if (h != Py_None) {
      nb::object parent = steal_or_raise(parent_of(h));
      if (PyDict_SetItem(self.get(n().parents), k0, parent.ptr()) != 0) raise_python();
    }
    self.set(n().stored_last, Py_True);
    if (!shared) feed(self, keys.ptr(), true);
  }

  // evict: the real tier's victims; where the request being served may not fit the tier
  // (and the real policy is not structured), auto's _own_victims (Python) decides; the victims
  // leave the parents map
  nb::object evict(nb::handle n_in, nb::handle protected_keys) {
    Self self(weak_);
    nb::object real = nb::borrow(self.get(n().real));
    nb::object evict_fn = steal_or_raise(PyObject_GetAttr(real.ptr(), n().evict));
    PyObject* args[2] = {n_in.ptr(), protected_keys.ptr()};
    nb::object victims = steal_or_raise(PyObject_Vectorcall(evict_fn.ptr(), args, 2, nullptr));
    if (!truth(victims.ptr())) return victims;
    const Py_ssize_t held = PyObject_Size(real.ptr());
    if (held < 0) raise_python();
    const Py_ssize_t nv = PyObject_Size(victims.ptr());
    if (nv < 0) raise_python();
    nb::object room = nb::int_(held + nv);
    nb::object need = steal_or_raise(PyNumber_Add(self.get(n().req_len), n_in.ptr()));
    int over = PyObject_RichCompareBool(need.ptr(), room.ptr(), Py_GT);
    if (over < 0) raise_python();
    if (over) {
      nb::object wants = steal_or_raise(PyObject_GetAttr(real.ptr(), n().wants_structure));
      if (!truth(wants.ptr())) {
        nb::object own = steal_or_raise(PyObject_GetAttr(self.policy(), n().own_victims));
        PyObject* a[4] = {victims.ptr(), n_in.ptr(), protected_keys.ptr(), room.ptr()};
        victims = steal_or_raise(PyObject_Vectorcall(own.ptr(), a, 4, nullptr));
      }
    }
    if (truth(victims.ptr())) {
      nb::object parents = nb::borrow(self.get(n().parents));
      forget_keys(parents, victims);
    }
    return victims;
  }

  void touch(nb::handle keys_in) {
    Self self(weak_);
    nb::object keys = as_sequence(keys_in);
    const Py_ssize_t nk = PySequence_Fast_GET_SIZE(keys.ptr());
    if (!nk) return;
    PyObject* k0 = PySequence_Fast_ITEMS(keys.ptr())[0];
    PyObject* p = PyDict_GetItemWithError(self.get(n().parents), k0);
    if (!p && PyErr_Occurred()) raise_python();
    if (p == Py_None || (self.truth(n().stored_last) && !self.truth(n().structured))) self.new_request();
    self.note_request(keys.ptr(), nk);
    self.set(n().stored_last, Py_False);
    PyObject* real = self.get(n().real);
    nb::object hold_real = nb::borrow(real);
    if (self.reversed_active()) {
      nb::object rev = reversed_list(keys.ptr());
      call_method(real, n().touch, {rev.ptr()});
    } else {
      call_method(real, n().touch, {keys.ptr()});
    }
    feed(self, keys.ptr(), false);
  }

 private:
  struct Names {
    PyObject *stored_last, *structured, *new_request, *req, *req_len, *parents, *shared, *real, *active,
        *feed_core, *window, *seen, *next_check, *last, *active_index, *choose, *feed, *wants_structure,
        *insert_many, *touch, *parent, *leaf_first, *reversed, *evict, *own_victims;
  };
  static const Names& n() {
    static const Names names = [] {
      auto intern = [](const char* s) {
        PyObject* o = PyUnicode_InternFromString(s);  // kept for the process
        if (!o) raise_python();
        return o;
      };
      return Names{intern("_stored_last"), intern("_structured"), intern("_new_request"), intern("_req"),
                   intern("_req_len"), intern("_parents"), intern("_shared"), intern("_real"), intern("active"),
                   intern("_feed_core"), intern("_window"), intern("_seen"), intern("_next_check"), intern("_last"),
                   intern("_active_index"), intern("_choose"), intern("_feed"), intern("wants_structure"),
                   intern("insert_many"), intern("touch"), intern("parent"), intern("LEAF_FIRST"),
                   intern("REVERSED"), intern("evict"), intern("_own_victims")};
    }();
    return names;
  }

  static bool truth(PyObject* o) {
    if (o == Py_True) return true;
    if (o == Py_False || o == Py_None) return false;
    int r = PyObject_IsTrue(o);
    if (r < 0) raise_python();
    return r == 1;
  }
  static nb::object steal_or_raise(PyObject* o) {
    if (!o) raise_python();
    return nb::steal(o);
  }
  static bool contains(PyObject* container, PyObject* key) {
    int r = PySequence_Contains(container, key);
    if (r < 0) raise_python();
    return r == 1;
  }
  static bool any_holds(PyObject* calls, PyObject* key) {  // any(key in call for call in calls)
    nb::object it = steal_or_raise(PyObject_GetIter(calls));
    while (PyObject* call = PyIter_Next(it.ptr())) {
      nb::object c = nb::steal(call);
      if (contains(call, key)) return true;
    }
    if (PyErr_Occurred()) raise_python();
    return false;
  }
  static nb::object as_sequence(nb::handle keys) {  // a list or tuple as given, else list(keys)
    PyObject* o = keys.ptr();
    if (PyList_Check(o) || PyTuple_Check(o)) return nb::borrow(o);
    return steal_or_raise(PySequence_List(o));
  }
  static nb::object reversed_list(PyObject* seq) {  // keys[::-1] (a list for a list, as slicing gives)
    const Py_ssize_t nk = PySequence_Fast_GET_SIZE(seq);
    if (!PyList_Check(seq)) {
      nb::object slice = steal_or_raise(PySlice_New(Py_None, Py_None, nb::int_(-1).ptr()));
      return steal_or_raise(PyObject_GetItem(seq, slice.ptr()));
    }
    PyObject* out = PyList_New(nk);
    if (!out) raise_python();
    PyObject* const* items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < nk; ++i) {
      Py_INCREF(items[nk - 1 - i]);
      PyList_SET_ITEM(out, i, items[nk - 1 - i]);
    }
    return nb::steal(out);
  }
  static void call_method(PyObject* obj, PyObject* name, std::initializer_list<PyObject*> args) {
    nb::object fn = steal_or_raise(PyObject_GetAttr(obj, name));
    call(fn.ptr(), args);
  }

  // The policy and its attribute dict for one call.
  class Self {
   public:
    explicit Self(const nb::object& weak) {
      PyObject* p = PyWeakref_GetObject(weak.ptr());  // borrowed
      if (!p) raise_python();
      if (p == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "auto: the policy of this plumbing is gone");
        raise_python();
      }
      policy_ = nb::borrow(p);
      dict_ = steal_or_raise(PyObject_GenericGetDict(p, nullptr));
    }
    PyObject* policy() const { return policy_.ptr(); }
    PyObject* get(PyObject* name) const {  // self.<name>: the instance's, else the class's
      PyObject* v = PyDict_GetItemWithError(dict_.ptr(), name);
      if (v) return v;
      if (PyErr_Occurred()) raise_python();
      held_.push_back(steal_or_raise(PyObject_GetAttr(policy_.ptr(), name)));
      return held_.back().ptr();
    }
    bool truth(PyObject* name) const { return AutoPlumb::truth(get(name)); }
    void set(PyObject* name, PyObject* v) const {
      if (PyDict_SetItem(dict_.ptr(), name, v) != 0) raise_python();
    }
    void new_request() const {  // self._new_request = True; self._req, self._req_len = [], 0
      set(n().new_request, Py_True);
      nb::object req = steal_or_raise(PyList_New(0));
      set(n().req, req.ptr());
      nb::object zero = nb::int_(0);
      set(n().req_len, zero.ptr());
    }
    void note_request(PyObject* keys, Py_ssize_t nk) const {  // LEAF_FIRST: the call's keys kept
      if (!(truth(n().leaf_first) && truth(n().structured))) return;
      if (PyList_Append(get(n().req), keys) != 0) raise_python();
      nb::object len = nb::int_(nk);
      nb::object sum = steal_or_raise(PyNumber_InPlaceAdd(get(n().req_len), len.ptr()));
      set(n().req_len, sum.ptr());
    }
    bool reversed_active() const {  // self.active in self.REVERSED
      return contains(get(n().reversed), get(n().active));
    }

   private:
    nb::object policy_, dict_;
    mutable std::vector<nb::object> held_;  // class attributes read in this call
  };

  // _feed: the sampled keys of one call to every mini (MiniFeed), its counters, a check if due
  static void feed(const Self& self, PyObject* keys, bool stored) {
    PyObject* core = self.get(n().feed_core);
    if (!nb::isinstance<MiniFeed>(core)) {  // no compiled feed: the Python one
      nb::object fn = steal_or_raise(PyObject_GetAttr(self.policy(), n().feed));
      call(fn.ptr(), {keys, stored ? Py_True : Py_False});
      return;
    }
    const bool fresh = self.truth(n().new_request);
    nb::object last = nb::borrow(self.get(n().last));
    const Py_ssize_t active = PyLong_AsSsize_t(self.get(n().active_index));
    if (active == -1 && PyErr_Occurred()) raise_python();
    nb::object tail;
    nb::object hold = nb::borrow(core);  // the feed stays alive through its call
    const int64_t got = nb::inst_ptr<MiniFeed>(core)->feed_raw(nb::handle(keys), stored, fresh, last, active, tail);
    if (!got) return;
    self.set(n().new_request, Py_False);
    self.set(n().last, tail.ptr());
    nb::object count = nb::int_(got);
    nb::object window = steal_or_raise(PyNumber_InPlaceAdd(self.get(n().window), count.ptr()));
    self.set(n().window, window.ptr());
    nb::object seen = steal_or_raise(PyNumber_InPlaceAdd(self.get(n().seen), count.ptr()));
    self.set(n().seen, seen.ptr());
    int due = PyObject_RichCompareBool(seen.ptr(), self.get(n().next_check), Py_GE);
    if (due < 0) raise_python();
    if (due) {
      nb::object choose = steal_or_raise(PyObject_GetAttr(self.policy(), n().choose));
      call(choose.ptr(), {});
    }
  }

  nb::object weak_;
};

void bind_auto(nb::module_& m) {
  nb::class_<AutoPlumb>(m, "AutoPlumb",
                        "auto's per-call plumbing (policies/auto.py's insert_many, touch, _feed) over the "
                        "policy's own attributes")
      .def(nb::init<nb::handle>(), "policy"_a)
      .def("insert_many", &AutoPlumb::insert_many, "keys"_a, "hints"_a.none() = nb::none())
      .def("touch", &AutoPlumb::touch, "keys"_a)
      .def("evict", &AutoPlumb::evict, "n"_a, "protected"_a.none() = nb::tuple());
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
