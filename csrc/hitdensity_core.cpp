// hitdensity's per-key state and verbs in compiled code (policies/hitdensity.py decides;
// this is the same algorithm, decision for decision, with keys mapped to integer slots).
//
//   keys      two Python dicts, resident key -> slot and ghost key -> slot (one lookup per
//             key, as LRU's OrderedDict pays); the slot ints are made once and reused
//   queues    one intrusive doubly linked list per class in access order, one for the ghosts
//             (FIFO), over per-slot arrays (prev, next, last access, class)
//   learning  reuse and end counts per class and age bucket, ghost epochs, and the Gittins
//             table update: the same float64 operations in the same order as the Python loop
//             and the numba kernel (policies/_gittins.py); this file is built with
//             -ffp-contract=off so no multiply-add is fused
//   evict     the oldest unprotected entry of each class scored through the table, the lowest
//             (score, last access, class) taken, the class's next entry scored in its place
//
// hashed_sample is auto's filter in front of its miniature simulations (one of which is this
// core): the keys whose (hash(key) * mix) & mask falls below threshold, as Python computes it.
//
// Called with the GIL held; keys are any hashable Python objects (hashed and compared by the
// dicts, as the Python version's dicts do). Only kvbm/ops.py hands this class out.
#include "hitdensity_core.hpp"
#include "hitdensity_table.hpp"
#include "policy_core.hpp"

#include <Python.h>

#include <cstdint>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using namespace hitdensity;

constexpr int kGhosts = kClasses;  // the list id of the ghosts
constexpr uint8_t kFree = 0, kResident = 1, kGhost = 2;  // a slot's state
constexpr int kHalfLifeUpdates = 32;
constexpr int64_t kMinPeriod = 256;
constexpr int64_t kTable = 1 << 16;  // the Python version's age -> bucket table size

using policycore::Keys;  // policy_core.hpp: what the compiled policies share
using policycore::raise_python;

}  // namespace

class HitDensityCore {
 public:
  explicit HitDensityCore(int64_t capacity) {
    if (capacity < 0) throw std::invalid_argument("hitdensity core: capacity must be >= 0");
    resident_ = PyDict_New();
    ghosts_ = PyDict_New();
    if (!resident_ || !ghosts_) raise_python();
    max_ghosts_ = capacity > 1 ? capacity : 1;
    period_ = capacity / 4 > kMinPeriod ? capacity / 4 : kMinPeriod;
    shift_ = bit_length(static_cast<uint64_t>(period_ / 4)) - 1;
    next_update_ = period_;
    for (int l = 0; l <= kGhosts; ++l) head_[l] = tail_[l] = -1, count_[l] = 0;
    for (int c = 0; c < kClasses; ++c)
      for (int b = 0; b < kBuckets; ++b) reuses_[c][b] = ends_[c][b] = index_[c][b] = rise_[c][b] = 0.0;
  }

  ~HitDensityCore() {
    Py_XDECREF(resident_);
    Py_XDECREF(ghosts_);
    for (PyObject* k : key_) Py_XDECREF(k);
    for (PyObject* s : slot_int_) Py_XDECREF(s);
  }

  HitDensityCore(const HitDensityCore&) = delete;
  HitDensityCore& operator=(const HitDensityCore&) = delete;

  // ------------------------------------------------------------------ verbs

  void insert(nb::handle key) { insert_key(key.ptr(), kNew); }

  void insert_many(nb::handle keys) {
    Keys k(keys);
    insert_run_(k.items(), k.size(), k.size(), true);
  }

  void insert_run(nb::handle keys, int64_t run_length, bool ends_run) {
    Keys k(keys);
    insert_run_(k.items(), k.size(), run_length, ends_run);
  }

  void batch_stored(nb::handle keys) {
    Keys k(keys);
    std::vector<int32_t> run;
    for (Py_ssize_t i = 0; i < k.size(); ++i) {
      int32_t s = find(resident_, kResident, k[i]);
      if (s >= 0 && cls_[s] == kNew) run.push_back(s);
    }
    if (run.empty()) return;
    const int64_t last = static_cast<int64_t>(run.size()) - 1;
    const int body = run_class(last + 1);
    for (int64_t i = last; i >= 0; --i) {
      int32_t s = run[i];
      if (cls_[s] != kNew) {  // the same key twice: the Python version's `del queue[key]` fails
        PyErr_SetObject(PyExc_KeyError, key_[s]);
        raise_python();
      }
      unlink(s, kNew);
      int c = i == last ? kTail : body;
      cls_[s] = static_cast<int8_t>(c);
      last_[s] = now_;
      append(s, c);
    }
  }

  void touch(nb::handle keys) {
    Keys k(keys);
    for (Py_ssize_t i = k.size() - 1; i >= 0; --i) {
      int32_t s = find(resident_, kResident, k[i]);
      if (s >= 0) touch_slot(s);
    }
  }

  void remove(nb::handle key) {
    int32_t s = find(resident_, kResident, key.ptr());
    if (s < 0) return;  // observation stops here: a censored life, not a miss
    if (PyDict_DelItem(resident_, key_[s]) != 0) raise_python();  // first: an error changes nothing
    int c = cls_[s];
    ends_[c][bucket(now_ - last_[s])] += 1;
    unlink(s, c);
    release(s);
  }

  nb::object evict(int64_t n, nb::handle protected_keys) {
    if (n <= 0) return nb::steal(PyList_New(0));
    return evict_(n, protected_keys.ptr(), true);
  }

  void evict_quiet(int64_t n) {  // evict(n, ()) with the victims dropped (auto's minis)
    if (n > 0) evict_(n, Py_None, false);
  }

  void insert_run_items(PyObject* const* keys, Py_ssize_t n, int64_t run_length, bool ends_run) {
    insert_run_(keys, n, run_length, ends_run);
  }

  void touch_items(PyObject* const* keys, Py_ssize_t n) {  // touch(keys) without a list
    for (Py_ssize_t i = n - 1; i >= 0; --i) {
      int32_t s = find(resident_, kResident, keys[i]);
      if (s >= 0) touch_slot(s);
    }
  }

 private:
  nb::object evict_(int64_t n, PyObject* prot, bool want_list) {
    bool check = prot != Py_None;
    if (check) {
      Py_ssize_t size = PyObject_Size(prot);
      if (size < 0) PyErr_Clear();  // no len(): ask it about each key
      else check = size > 0;
    }
    struct Head {
      double score;
      int64_t last;
      int c;
      int32_t slot;
    };
    Head heads[kClasses];
    int32_t cursor[kClasses];
    int nh = 0;
    auto next_unprotected = [&](int32_t s) -> int32_t {
      for (; s >= 0; s = next_[s]) {
        if (!check) return s;
        int r = PySequence_Contains(prot, key_[s]);
        if (r < 0) raise_python();
        if (r == 0) return s;
      }
      return -1;
    };
    for (int c = 0; c < kClasses; ++c) {
      if (!count_[c]) continue;
      int32_t s = next_unprotected(head_[c]);
      if (s < 0) continue;
      heads[nh++] = Head{score_at(c, now_ - last_[s]), last_[s], c, s};
      cursor[c] = next_[s];
    }
    std::vector<int32_t> victims;
    victims.reserve(static_cast<size_t>(n < 4096 ? n : 4096));
    while (static_cast<int64_t>(victims.size()) < n) {
      if (!nh) return nb::none();  // atomic: nothing has changed yet
      int best = 0;
      for (int i = 1; i < nh; ++i) {  // (score, last access, class): the heap order of the Python
        const Head& a = heads[i];
        const Head& m = heads[best];
        if (a.score < m.score || (a.score == m.score && (a.last < m.last || (a.last == m.last && a.c < m.c))))
          best = i;
      }
      victims.push_back(heads[best].slot);
      int c = heads[best].c;
      int32_t s = next_unprotected(cursor[c]);
      if (s >= 0) {
        heads[best] = Head{score_at(c, now_ - last_[s]), last_[s], c, s};
        cursor[c] = next_[s];
      } else {
        heads[best] = heads[--nh];
      }
    }
    return forget(victims, want_list);
  }

 public:
  // ------------------------------------------------------------------ state, for the wrapper

  nb::object resident() const { return nb::borrow(resident_); }
  int64_t now() const { return now_; }
  int64_t updates() const { return updates_; }
  int64_t ghost_count() const { return count_[kGhosts]; }
  int64_t queue_len(int c) const { return c >= 0 && c < kClasses ? count_[c] : 0; }

  int class_of(nb::handle key) {
    int32_t s = find(resident_, kResident, key.ptr());
    return s >= 0 ? cls_[s] : -1;
  }

  double score(int c, int64_t age) const {  // _score, for tests and notebooks
    if (c < 0 || c >= kClasses) throw std::out_of_range("hitdensity core: class out of range");
    return score_at(c, age);
  }

  nb::list table(int which) const {  // 0 reuses, 1 ends, 2 index, 3 rise
    const double (*t)[kBuckets] = which == 0 ? reuses_ : which == 1 ? ends_ : which == 2 ? index_ : rise_;
    nb::list out;
    for (int c = 0; c < kClasses; ++c) {
      nb::list row;
      for (int b = 0; b < kBuckets; ++b) row.append(t[c][b]);
      out.append(row);
    }
    return out;
  }

  void set_counts(nb::handle reuses, nb::handle ends) {  // adopt's warm start
    for (int c = 0; c < kClasses; ++c)
      for (int b = 0; b < kBuckets; ++b) {
        reuses_[c][b] = nb::cast<double>(reuses[c][b]);
        ends_[c][b] = nb::cast<double>(ends[c][b]);
      }
  }

  nb::dict classes() const {  // key -> class of the resident keys, in slot order (tests)
    nb::dict out;
    for (int c = 0; c < kClasses; ++c)
      for (int32_t s = head_[c]; s >= 0; s = next_[s]) out[nb::handle(key_[s])] = c;
    return out;
  }

  nb::list queues() const {  // per class: key -> last access, in queue order (tests)
    nb::list out;
    for (int c = 0; c < kClasses; ++c) {
      nb::dict q;
      for (int32_t s = head_[c]; s >= 0; s = next_[s]) q[nb::handle(key_[s])] = last_[s];
      out.append(q);
    }
    return out;
  }

  nb::list epochs() const {  // per class: ghost epoch -> ghosts (tests)
    nb::list out;
    for (int c = 0; c < kClasses; ++c) {
      nb::dict d;
      for (const auto& [e, n] : epochs_[c]) d[nb::int_(e)] = n;
      out.append(d);
    }
    return out;
  }

  nb::list ongoing() const {  // the lives going on per class and bucket, as update counts them
    int64_t live[kClasses][kBuckets] = {};
    count_live(live);
    nb::list out;
    for (int c = 0; c < kClasses; ++c) {
      nb::list row;
      for (int b = 0; b < kBuckets; ++b) row.append(live[c][b]);
      out.append(row);
    }
    return out;
  }

  size_t native_bytes() const {  // what tracemalloc does not see: the arrays and epoch maps
    size_t n = sizeof(*this);
    n += (key_.capacity() + slot_int_.capacity()) * sizeof(PyObject*);
    n += (prev_.capacity() + next_.capacity() + free_.capacity()) * sizeof(int32_t);
    n += last_.capacity() * sizeof(int64_t) + cls_.capacity() + state_.capacity();
    for (const auto& e : epochs_) n += e.bucket_count() * sizeof(void*) + e.size() * 32;
    return n;
  }

  int64_t max_ghosts() const { return max_ghosts_; }
  int shift() const { return shift_; }

  nb::list ghosts() const {  // (key, class, last access), oldest first (tests)
    nb::list out;
    for (int32_t s = head_[kGhosts]; s >= 0; s = next_[s])
      out.append(nb::make_tuple(nb::handle(key_[s]), static_cast<int>(cls_[s]), last_[s]));
    return out;
  }

  void update() {
    next_update_ = now_ + period_;
    updates_ += 1;
    const bool decay = updates_ % kHalfLifeUpdates == 0;
    int64_t live[kClasses][kBuckets] = {};
    count_live(live);
    gittins(reuses_, ends_, live, index_, rise_, decay);
    floor_reused(reuses_, index_, rise_);
  }

 private:
  // Lives not ended yet per class and age bucket (_ongoing): resident blocks and ghosts.
  void count_live(int64_t (&live)[kClasses][kBuckets]) const {
    for (int c = 0; c < kClasses; ++c)  // resident lives, censored at their age
      for (int32_t s = head_[c]; s >= 0; s = next_[s]) live[c][bucket(now_ - last_[s])] += 1;
    const int64_t mid = now_ - ((int64_t(1) << shift_) >> 1);  // an epoch's ghosts count at its middle
    for (int c = 0; c < kClasses; ++c)
      for (const auto& [e, n] : epochs_[c]) {
        int64_t age = mid - (e << shift_);
        live[c][age < 4 ? (age > 0 ? age : 0) : bucket(age)] += n;
      }
  }

  // The class index at this age, linear between bucket starts: evict's inlined score for ages
  // 4 .. table-1 (rise taken at the update), _score otherwise; the same operations as each.
  double score_at(int c, int64_t age) const {
    if (age < 4) return index_[c][age > 0 ? age : 0];
    int b = bucket(age);
    if (age < kTable)
      return index_[c][b] + rise_[c][b] * static_cast<double>(age - kStarts.start[b]) /
                                static_cast<double>(kStarts.width[b]);
    if (b >= kBuckets - 1) return index_[c][b];
    return index_[c][b] + (index_[c][b + 1] - index_[c][b]) * static_cast<double>(age - kStarts.start[b]) /
                              static_cast<double>(kStarts.width[b]);
  }

  void insert_run_(PyObject* const* keys, Py_ssize_t n, int64_t run_length, bool ends_run) {
    const Py_ssize_t last = n - 1;
    if (last < 0) return;
    const int body = run_class(run_length > 1 ? run_length : 1);
    // the batch's last block first (the partial one the next turn replaces), then deepest
    // first: the Python version's bulk path gives the same stamps and queues
    insert_key(keys[last], ends_run ? kTail : body);
    for (Py_ssize_t i = last - 1; i >= 0; --i) insert_key(keys[i], body);
  }

  // One probe of the resident map for a new or resident key (set_default), where a lookup and
  // then an insert took two; the ghosts are asked only when there are any. A returning ghost
  // goes on under the new slot (its old one freed): slots decide nothing, the lists' order does.
  void insert_key(PyObject* key, int fresh) {
    now_ += 1;
    if (now_ >= next_update_) update();
    int32_t s = take(key);
    PyObject* v = policycore::set_default(resident_, key, slot_int_[s]);
    if (v != slot_int_[s]) {  // already tracked (or an error): an access
      release(s);
      if (!v) raise_python();
      touch_slot(slot_of(v, kResident));
      return;
    }
    int32_t g = -1;
    if (count_[kGhosts]) {
      try {
        g = find(ghosts_, kGhost, key);
        if (g >= 0 && PyDict_DelItem(ghosts_, key_[g]) != 0) raise_python();
      } catch (...) {  // nothing changed: the new entry taken back
        policycore::undo_set(resident_, key);
        release(s);
        throw;
      }
    }
    if (g >= 0) {  // a reuse the tier missed, counted for the class the block had
      int gc = cls_[g];
      int64_t gl = last_[g];
      unlink(g, kGhosts);
      release(g);
      unghost(gc, gl);
      int b = bucket(now_ - gl);
      reuses_[gc][b] += 1;
      ends_[gc][b] += 1;
      int c = gc >= kOnce ? kMany : kOnce;
      cls_[s] = static_cast<int8_t>(c);
      last_[s] = now_;
      append(s, c);
      return;
    }
    cls_[s] = static_cast<int8_t>(fresh);
    last_[s] = now_;
    append(s, fresh);
  }

  void touch_slot(int32_t s) {
    int c = cls_[s];
    int b = bucket(now_ - last_[s]);
    reuses_[c][b] += 1;
    ends_[c][b] += 1;
    unlink(s, c);
    c = c >= kOnce ? kMany : kOnce;
    cls_[s] = static_cast<int8_t>(c);
    last_[s] = now_;
    append(s, c);
  }

  nb::object forget(const std::vector<int32_t>& victims, bool want_list) {
    PyObject* out = want_list ? PyList_New(static_cast<Py_ssize_t>(victims.size())) : nullptr;
    if (want_list && !out) raise_python();
    nb::object result = out ? nb::steal(out) : nb::none();
    Py_ssize_t i = 0;
    for (int32_t s : victims) {  // out of their queues, into the ghosts
      // the maps first: an error leaves this victim (and the ones after it) resident, whole
      if (PyDict_SetItem(ghosts_, key_[s], slot_int_[s]) != 0) raise_python();
      if (PyDict_DelItem(resident_, key_[s]) != 0) {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (PyDict_DelItem(ghosts_, key_[s]) != 0) PyErr_WriteUnraisable(key_[s]);
        PyErr_Restore(t, v, tb);
        raise_python();
      }
      int c = cls_[s];
      unlink(s, c);
      append(s, kGhosts);
      state_[s] = kGhost;
      epochs_[c][last_[s] >> shift_] += 1;
      if (out) {
        Py_INCREF(key_[s]);
        PyList_SET_ITEM(out, i++, key_[s]);
      }
    }
    for (int64_t extra = count_[kGhosts] - max_ghosts_; extra > 0; --extra) {
      int32_t s = head_[kGhosts];  // never came back within the ghost horizon
      if (PyDict_DelItem(ghosts_, key_[s]) != 0) raise_python();  // first: it stays a ghost
      int gc = cls_[s];
      int64_t gl = last_[s];
      ends_[gc][bucket(now_ - gl)] += 1;
      unghost(gc, gl);
      unlink(s, kGhosts);
      release(s);
    }
    return result;
  }

  void unghost(int c, int64_t last) {
    auto& epoch = epochs_[c];
    auto it = epoch.find(last >> shift_);
    if (it != epoch.end() && --it->second == 0) epoch.erase(it);
  }

  // key -> slot in `dict`, -1 if absent; a Python error (an unhashable key) is raised
  int32_t find(PyObject* dict, uint8_t state, PyObject* key) const {
    PyObject* v = PyDict_GetItemWithError(dict, key);
    if (!v) {
      if (PyErr_Occurred()) raise_python();
      return -1;
    }
    return slot_of(v, state);
  }

  int32_t slot_of(PyObject* v, uint8_t state) const {  // the slot whose int is the map's value v
    long s = PyLong_AsLong(v);  // one of our slot ints, unless the map was written from outside
    if (s < 0 || static_cast<size_t>(s) >= slot_int_.size() || slot_int_[s] != v || state_[s] != state) {
      if (PyErr_Occurred()) raise_python();
      throw std::runtime_error("hitdensity core: its key map was changed from outside");
    }
    return static_cast<int32_t>(s);
  }

  int32_t take(PyObject* key) {  // a free slot for key (a strong reference kept)
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
      last_.push_back(0);
      cls_.push_back(0);
      state_.push_back(kFree);
    }
    Py_INCREF(key);
    key_[s] = key;
    state_[s] = kResident;
    return s;
  }

  void release(int32_t s) {
    PyObject* k = key_[s];
    key_[s] = nullptr;
    state_[s] = kFree;
    free_.push_back(s);
    Py_DECREF(k);
  }

  void append(int32_t s, int l) {
    prev_[s] = tail_[l];
    next_[s] = -1;
    if (tail_[l] >= 0) next_[tail_[l]] = s;
    else head_[l] = s;
    tail_[l] = s;
    count_[l] += 1;
  }

  void unlink(int32_t s, int l) {
    int32_t p = prev_[s], n = next_[s];
    if (p >= 0) next_[p] = n;
    else head_[l] = n;
    if (n >= 0) prev_[n] = p;
    else tail_[l] = p;
    count_[l] -= 1;
  }

  PyObject* resident_ = nullptr;  // key -> slot int
  PyObject* ghosts_ = nullptr;
  std::vector<PyObject*> key_, slot_int_;
  std::vector<int32_t> prev_, next_, free_;
  std::vector<int64_t> last_;
  std::vector<int8_t> cls_;
  std::vector<uint8_t> state_;  // kFree, kResident or kGhost: which map holds the slot's key
  int32_t head_[kGhosts + 1], tail_[kGhosts + 1];
  int64_t count_[kGhosts + 1];
  std::unordered_map<int64_t, int64_t> epochs_[kClasses];
  double reuses_[kClasses][kBuckets], ends_[kClasses][kBuckets];
  double index_[kClasses][kBuckets], rise_[kClasses][kBuckets];
  int64_t now_ = 0, next_update_ = 0, period_ = 0, max_ghosts_ = 1, updates_ = 0;
  int shift_ = 0;
};

// auto's mini feed (auto_core.cpp) calls a hitdensity mini directly, through these: the same
// verbs as its bound methods, compiled here (with -ffp-contract=off), no Python call between.
namespace hitdensity_feed {

HitDensityCore* cast(nb::handle core) {
  return nb::isinstance<HitDensityCore>(core) ? nb::inst_ptr<HitDensityCore>(core) : nullptr;
}
void insert_run(HitDensityCore* c, PyObject* const* keys, Py_ssize_t n, int64_t run_length, bool ends_run) {
  c->insert_run_items(keys, n, run_length, ends_run);
}
void touch(HitDensityCore* c, PyObject* const* keys, Py_ssize_t n) { c->touch_items(keys, n); }
void evict_quiet(HitDensityCore* c, int64_t n) { c->evict_quiet(n); }

}  // namespace hitdensity_feed

// [k for k in keys if (hash(k) * mix) & mask < threshold]: Python's & of the exact product
// keeps its low bits, which the product modulo 2**64 has too (mask < 2**64).
nb::object hashed_sample(nb::handle keys, uint64_t mix, uint64_t mask, uint64_t threshold) {
  Keys k(keys);
  PyObject* out = PyList_New(0);
  if (!out) raise_python();
  nb::object result = nb::steal(out);
  for (Py_ssize_t i = 0; i < k.size(); ++i) {
    Py_hash_t h = PyObject_Hash(k[i]);
    if (h == -1 && PyErr_Occurred()) raise_python();
    if (((static_cast<uint64_t>(h) * mix) & mask) < threshold && PyList_Append(out, k[i]) != 0) raise_python();
  }
  return result;
}

void bind_hitdensity(nb::module_& m) {
  m.def("hashed_sample", &hashed_sample, "keys"_a, "mix"_a, "mask"_a, "threshold"_a,
        "The keys whose (hash(key) * mix) & mask < threshold, in order (auto's key sample).");
  nb::class_<HitDensityCore>(m, "HitDensityCore",
                             "hitdensity's per-key state and verbs (policies/hitdensity.py decides; "
                             "kvbm.ops.hitdensity_core hands it out)")
      .def(nb::init<int64_t>(), "capacity"_a)
      .def("insert", [](HitDensityCore& h, nb::handle key, nb::handle) { h.insert(key); }, "key"_a,
           "hints"_a = nb::none())
      .def("insert_many", [](HitDensityCore& h, nb::handle keys, nb::handle) { h.insert_many(keys); },
           "keys"_a, "hints"_a = nb::none())
      .def("insert_run", &HitDensityCore::insert_run, "keys"_a, "run_length"_a, "ends_run"_a)
      .def("batch_stored", &HitDensityCore::batch_stored, "keys"_a)
      .def("touch", &HitDensityCore::touch, "keys"_a)
      .def("remove", &HitDensityCore::remove, "key"_a)
      .def("evict", &HitDensityCore::evict, "n"_a, "protected"_a = nb::none())
      .def("update", &HitDensityCore::update)
      .def("resident", &HitDensityCore::resident)
      .def("now", &HitDensityCore::now)
      .def("updates", &HitDensityCore::updates)
      .def("ghost_count", &HitDensityCore::ghost_count)
      .def("queue_len", &HitDensityCore::queue_len, "c"_a)
      .def("class_of", &HitDensityCore::class_of, "key"_a)
      .def("score", &HitDensityCore::score, "c"_a, "age"_a)
      .def("table", &HitDensityCore::table, "which"_a)
      .def("set_counts", &HitDensityCore::set_counts, "reuses"_a, "ends"_a)
      .def("classes", &HitDensityCore::classes)
      .def("ghosts", &HitDensityCore::ghosts)
      .def("queues", &HitDensityCore::queues)
      .def("epochs", &HitDensityCore::epochs)
      .def("ongoing", &HitDensityCore::ongoing)
      .def("native_bytes", &HitDensityCore::native_bytes)
      .def("max_ghosts", &HitDensityCore::max_ghosts)
      .def("shift", &HitDensityCore::shift);
}
