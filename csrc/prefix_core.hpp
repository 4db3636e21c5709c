// The prefix policy's per-key state and verbs in compiled code (policies/prefix.py decides;
// this is the same algorithm, decision for decision, with keys mapped to integer slots).
//
//   keys      two Python dicts: tracked key -> slot, and parent-only key -> slot (an untracked
//             key that tracked children name as their parent: the Python version's _children
//             entries of untracked keys); a slot keeps its parent's slot and a child count
//   heap      (last access seq, slot), lazy deletion, as the Python version's (seq, key) heap:
//             a seq belongs to one key, so both pop the same entries in the same order, and
//             it is rebuilt at the same sizes
//   evict     leaves oldest first, then (no unprotected leaf left: a cycle of parents, the
//             ancestors of pinned leaves) the oldest unprotected inner keys, which stay as
//             parent-only keys of their children; a failed search undoes its evictions
//
// Called with the GIL held. Only kvbm/ops.py hands this class out; prefix_core.cpp binds it,
// auto_core.cpp calls it directly for auto's minis.
#pragma once

#include "policy_core.hpp"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>


namespace prefixcore {

namespace nb = nanobind;
using policycore::Keys;
using policycore::Protected;
using policycore::raise_python;

constexpr uint8_t kFree = 0, kTracked = 1, kParentOnly = 2;
using Entry = std::pair<int64_t, int32_t>;  // (seq, slot)


class PrefixCore {
 public:
  PrefixCore() {
    tracked_ = PyDict_New();
    parents_only_ = PyDict_New();
    if (!tracked_ || !parents_only_) raise_python();
  }
  ~PrefixCore() {
    Py_XDECREF(tracked_);
    Py_XDECREF(parents_only_);
    for (PyObject* k : key_) Py_XDECREF(k);
    for (PyObject* s : slot_int_) Py_XDECREF(s);
  }
  PrefixCore(const PrefixCore&) = delete;
  PrefixCore& operator=(const PrefixCore&) = delete;

  void insert(nb::handle key, nb::handle hints) {
    PyObject* parent = Py_None;
    if (hints.ptr() != Py_None) {
      nb::object p = hints.attr("parent");
      int ne = PyObject_RichCompareBool(p.ptr(), key.ptr(), Py_NE);
      if (ne < 0) raise_python();
      if (ne) return insert_key(key.ptr(), p.ptr());
    }
    insert_key(key.ptr(), parent);
  }

  // A batch of inserts (insert_many, insert_linked, auto's mini feed): a key that is a leaf when
  // inserted goes on the heap at the batch's end, if it is a leaf then (with its seq then). A
  // run's keys each get a child within the batch, so only its last goes on: fewer stale entries
  // to pop, and the same leaves with the same seqs on the heap whenever an evict comes (no evict
  // runs inside a batch), so the same victims.
  class Batch {
   public:
    explicit Batch(PrefixCore& core) : core_(core) { core_.batching_ = true; }
    ~Batch() { core_.end_batch(); }
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

   private:
    PrefixCore& core_;
  };

  void insert_many(nb::handle keys, nb::handle hints) {
    Batch batch(*this);
    Keys k(keys);
    PyObject* h = hints.ptr();
    bool per_key = PyList_Check(h) || PyTuple_Check(h);
    if (per_key) {
      Keys hs(hints);
      for (Py_ssize_t i = 0; i < k.size() && i < hs.size(); ++i) insert(nb::handle(k[i]), nb::handle(hs[i]));
    } else {
      for (Py_ssize_t i = 0; i < k.size(); ++i) insert(nb::handle(k[i]), hints);
    }
  }

  // keys with their parents given as keys (None: a root): auto's structured mini
  void insert_linked(nb::handle keys, nb::handle parents) {
    Batch batch(*this);
    Keys k(keys), p(parents);
    if (p.size() != k.size()) throw std::invalid_argument("prefix core: one parent per key");
    for (Py_ssize_t i = 0; i < k.size(); ++i) insert_linked_key(k[i], p[i]);
  }

  void insert_linked_key(PyObject* key, PyObject* parent) {
    int ne = parent == Py_None ? 0 : PyObject_RichCompareBool(parent, key, Py_NE);
    if (ne < 0) raise_python();
    insert_key(key, ne ? parent : Py_None);
  }

  void touch(nb::handle keys) {
    Keys k(keys);
    for (Py_ssize_t i = 0; i < k.size(); ++i) touch_key(k[i]);
  }

  void touch_key(PyObject* key) {
    int32_t s = find(tracked_, kTracked, key);
    if (s < 0) return;
    seq_[s] = ++clock_;
    if (!nchild_[s]) push(s);
  }

  void batch_stored(nb::handle) {}

  void remove(nb::handle key) {
    int32_t s = find(tracked_, kTracked, key.ptr());
    if (s < 0) return;
    int32_t leaf = unlink(s, false);
    try {
      untrack(s);
    } catch (...) {  // s stays tracked (a root now); its parent, if a leaf now, still evictable
      if (leaf >= 0) push(leaf);
      throw;
    }
    if (leaf >= 0) push(leaf);
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
    if (rebuild_due_) {
      rebuild();
      rebuild_due_ = false;
    }
    std::vector<Entry>& skipped = skipped_;
    skipped.clear();
    std::vector<Undo>& undo = undo_;
    undo.clear();
    pending_.clear();
    // puts the victims from undo[from] on back (newest first), as they were; skipped to the heap
    auto put_back = [&](size_t from) {
      for (size_t j = undo.size(); j-- > from;) {
        const Undo& u = undo[j];
        state_[u.slot] = kTracked;
        link(u.slot, u.parent);
        skipped.push_back(Entry{u.seq, u.slot});
      }
      for (const Entry& e : skipped) heap_push(e);
      skipped.clear();
    };
    try {  // a protected set whose `in` raises: every victim so far put back, nothing changed
      while (!heap_.empty() && static_cast<int64_t>(undo.size()) < n) {
        std::pop_heap(heap_.begin(), heap_.end(), std::greater<Entry>());
        Entry item = heap_.back();
        heap_.pop_back();
        int32_t s = item.second;
        if (state_[s] != kTracked || seq_[s] != item.first || nchild_[s]) continue;  // stale
        skipped.push_back(item);  // until it is known not to be protected
        if (prot.has(key_[s])) continue;
        skipped.pop_back();
        undo.push_back(Undo{s, parent_[s], item.first});
        state_[s] = kEvicting;
        int32_t leaf = unlink(s, true);
        if (leaf >= 0) heap_push(Entry{seq_[leaf], leaf});
      }
      if (static_cast<int64_t>(undo.size()) < n) {  // no unprotected leaf left: oldest inner keys
        std::vector<Entry>& inner = inner_;
        inner.clear();
        for (size_t t = 0; t < key_.size(); ++t)
          if (state_[t] == kTracked && !prot.has(key_[t])) inner.push_back(Entry{seq_[t], static_cast<int32_t>(t)});
        size_t need = static_cast<size_t>(n) - undo.size();
        if (inner.size() >= need) {
          std::partial_sort(inner.begin(), inner.begin() + static_cast<std::ptrdiff_t>(need), inner.end());
          for (size_t j = 0; j < need; ++j) {
            int32_t s = inner[j].second;
            undo.push_back(Undo{s, parent_[s], inner[j].first});
            state_[s] = kEvicting;
            int32_t leaf = unlink(s, true);
            if (leaf >= 0) heap_push(Entry{seq_[leaf], leaf});
          }
        }
        inner.clear();
      }
    } catch (...) {
      put_back(0);
      pending_.clear();  // all relinked: none is childless
      throw;
    }
    const bool ok = static_cast<int64_t>(undo.size()) == n;
    if (!ok) put_back(0);
    for (const Entry& e : skipped) heap_push(e);
    skipped.clear();
    // parent-only keys left without children go (an error keeps one: childless, dropped later)
    auto drop_pending = [&]() {
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      for (int32_t p : pending_)
        if (state_[p] == kParentOnly && !nchild_[p]) {
          if (PyDict_DelItem(parents_only_, key_[p]) == 0) release(p);
          else PyErr_WriteUnraisable(key_[p]);
        }
      pending_.clear();
      PyErr_Restore(t, v, tb);
    };
    PyObject* out = nullptr;
    if (ok && want_list) {
      out = PyList_New(static_cast<Py_ssize_t>(undo.size()));
      if (!out) {
        put_back(0);
        drop_pending();
        raise_python();
      }
    }
    nb::object result = out ? nb::steal(out) : nb::none();
    if (ok) {
      // an inner victim (children still tracked) stays as its children's parent-only key
      auto undo_parents_only = [&](size_t upto) {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        for (size_t j = 0; j < upto; ++j)
          if (nchild_[undo[j].slot] && PyDict_DelItem(parents_only_, key_[undo[j].slot]) != 0)
            PyErr_WriteUnraisable(key_[undo[j].slot]);
        PyErr_Restore(t, v, tb);
      };
      for (size_t i = 0; i < undo.size(); ++i) {
        int32_t s = undo[i].slot;
        if (!nchild_[s] || PyDict_SetItem(parents_only_, key_[s], slot_int_[s]) == 0) continue;
        undo_parents_only(i);  // an error: nothing changed
        put_back(0);
        drop_pending();
        raise_python();
      }
      for (size_t i = 0; i < undo.size(); ++i) {
        if (PyDict_DelItem(tracked_, key_[undo[i].slot]) == 0) continue;
        PyObject *t, *v, *tb;  // an error: every victim back in the map and tracked, nothing changed
        PyErr_Fetch(&t, &v, &tb);
        for (size_t j = 0; j < i; ++j)
          if (PyDict_SetItem(tracked_, key_[undo[j].slot], slot_int_[undo[j].slot]) != 0)
            PyErr_WriteUnraisable(key_[undo[j].slot]);
        PyErr_Restore(t, v, tb);
        undo_parents_only(undo.size());
        put_back(0);
        drop_pending();
        raise_python();
      }
      for (size_t i = 0; i < undo.size(); ++i) {
        const Undo& u = undo[i];
        if (out) {
          Py_INCREF(key_[u.slot]);
          PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), key_[u.slot]);
        }
        if (nchild_[u.slot]) state_[u.slot] = kParentOnly;
        else release(u.slot);
      }
    }
    drop_pending();
    return result;
  }

 public:
  nb::object tracked() const { return nb::borrow(tracked_); }
  int64_t heap_size() const { return static_cast<int64_t>(heap_.size()); }
  int64_t clock() const { return clock_; }

  nb::object parent_of(nb::handle key) {  // the tracked key's parent (tests); KeyError if untracked
    int32_t s = find(tracked_, kTracked, key.ptr());
    if (s < 0) {
      PyErr_SetObject(PyExc_KeyError, key.ptr());
      raise_python();
    }
    return parent_[s] < 0 ? nb::none() : nb::borrow(key_[parent_[s]]);
  }

  nb::object parents_only() const { return nb::borrow(parents_only_); }  // (tests)

  nb::dict seqs() const {  // tracked key -> last access seq (tests)
    nb::dict out;
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(tracked_, &pos, &k, &v)) out[nb::handle(k)] = seq_[PyLong_AsLong(v)];
    return out;
  }

  nb::dict children() const {  // key with tracked children -> their count (tests)
    nb::dict out;
    for (size_t s = 0; s < key_.size(); ++s)
      if (state_[s] != kFree && nchild_[s]) out[nb::handle(key_[s])] = nchild_[s];
    return out;
  }

  size_t native_bytes() const {
    size_t n = sizeof(*this);
    n += (key_.capacity() + slot_int_.capacity()) * sizeof(PyObject*);
    n += (parent_.capacity() + nchild_.capacity() + free_.capacity()) * sizeof(int32_t);
    n += seq_.capacity() * sizeof(int64_t) + state_.capacity() + heap_.capacity() * sizeof(Entry);
    return n;
  }

 private:
  struct Undo {
    int32_t slot, parent;
    int64_t seq;
  };
  static constexpr uint8_t kEvicting = 3;  // a victim of the evict under way (undone on failure)

  // One probe of the tracked map for a new or tracked key (set_default), where a lookup and
  // then an insert took two; parent-only keys are asked only when there are any, and a parent
  // that is the key inserted just before (a run's usual case) is found without a lookup.
  void insert_key(PyObject* key, PyObject* parent) {
    int32_t s = take(key);
    PyObject* v = policycore::set_default(tracked_, key, slot_int_[s]);
    if (v != slot_int_[s]) {  // tracked already (or an error)
      release(s);
      if (!v) raise_python();
      s = slot_of(v, kTracked);
      int32_t leaf = unlink(s, false);
      if (leaf >= 0) push(leaf);
    } else {
      int32_t q = -1;
      if (PyDict_GET_SIZE(parents_only_)) {
        try {
          q = find(parents_only_, kParentOnly, key);
        } catch (...) {  // nothing changed: the new entry taken back
          policycore::undo_set(tracked_, key);
          release(s);
          throw;
        }
      }
      if (q >= 0) {  // a parent-only key becomes tracked under its own slot, its children kept
        if (PyDict_DelItem(tracked_, key) != 0) {  // the new entry (its slot) taken back first
          release(s);  // (a key just put in does not fail to come out; were it to, it would be
          raise_python();  // left mapped to a free slot: the map is checked at each find)
        }
        release(s);
        s = q;
        if (PyDict_SetItem(tracked_, key_[s], slot_int_[s]) != 0) raise_python();  // nothing changed
        if (PyDict_DelItem(parents_only_, key_[s]) != 0) {  // still parent-only
          undo_map(tracked_, s);
          raise_python();
        }
      }
      state_[s] = kTracked;
    }
    int32_t p = -1;
    try {  // s is tracked: an error finding its parent leaves it a root, stamped and a leaf
      if (parent != Py_None) {
        // the slot inserted last holds this very object and is tracked: tracked_[parent] is it
        if (last_ >= 0 && key_[last_] == parent && state_[last_] == kTracked) p = last_;
        else p = find(tracked_, kTracked, parent);
        if (p < 0 && PyDict_GET_SIZE(parents_only_)) p = find(parents_only_, kParentOnly, parent);
        if (p < 0) {
          int32_t q = take(parent);
          state_[q] = kParentOnly;
          if (PyDict_SetItem(parents_only_, parent, slot_int_[q]) != 0) {
            release(q);
            raise_python();
          }
          p = q;
        }
      }
    } catch (...) {
      seq_[s] = ++clock_;
      if (!nchild_[s]) push(s);
      throw;
    }
    link(s, p);
    seq_[s] = ++clock_;
    if (!nchild_[s]) {
      if (batching_) fresh_.push_back(s);
      else push(s);
    }
    last_ = s;
  }

  void end_batch() noexcept {  // the batch's keys that are leaves now onto the heap
    batching_ = false;
    try {
      for (int32_t s : fresh_)
        if (state_[s] == kTracked && !nchild_[s]) push(s);
    } catch (...) {  // out of memory growing the heap: rebuilt before the next evict
      rebuild_due_ = true;
    }
    fresh_.clear();
  }

  // dict[key_[s]] removed again after a later step failed; the pending error is kept
  void undo_map(PyObject* dict, int32_t s) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    if (PyDict_DelItem(dict, key_[s]) != 0) PyErr_WriteUnraisable(key_[s]);
    PyErr_Restore(t, v, tb);
  }

  void link(int32_t s, int32_t p) {
    parent_[s] = p;
    if (p >= 0) nchild_[p] += 1;
  }

  // s's edge to its parent forgotten; the parent if it just became a tracked leaf, else -1.
  // A parent-only parent left without children goes (later, in an evict: it may be relinked).
  int32_t unlink(int32_t s, bool in_evict) {
    int32_t p = parent_[s];
    parent_[s] = -1;
    if (p < 0) return -1;
    if (--nchild_[p]) return -1;
    if (state_[p] == kTracked) return p;
    if (state_[p] == kParentOnly) {
      if (in_evict) pending_.push_back(p);
      else drop_parent_only(p);
    }
    return -1;
  }

  void untrack(int32_t s) {  // s left the tracked keys (remove); it stays while it has children
    if (nchild_[s]) {
      if (PyDict_SetItem(parents_only_, key_[s], slot_int_[s]) != 0) raise_python();  // nothing changed
      if (PyDict_DelItem(tracked_, key_[s]) != 0) {  // still tracked
        undo_map(parents_only_, s);
        raise_python();
      }
      state_[s] = kParentOnly;
    } else {
      if (PyDict_DelItem(tracked_, key_[s]) != 0) raise_python();
      release(s);
    }
  }

  void drop_parent_only(int32_t p) {
    if (PyDict_DelItem(parents_only_, key_[p]) != 0) raise_python();
    release(p);
  }

  void push(int32_t s) {  // the Python version's _push: a push, the heap rebuilt when bloated
    heap_push(Entry{seq_[s], s});
    if (static_cast<int64_t>(heap_.size()) > 2 * static_cast<int64_t>(PyDict_Size(tracked_)) + 1024) rebuild();
  }

  void rebuild() {  // the heap: one entry per tracked leaf
    heap_.clear();
    for (size_t t = 0; t < key_.size(); ++t)
      if (state_[t] == kTracked && !nchild_[t]) heap_.push_back(Entry{seq_[t], static_cast<int32_t>(t)});
    std::make_heap(heap_.begin(), heap_.end(), std::greater<Entry>());
  }

  void heap_push(Entry e) {
    heap_.push_back(e);
    std::push_heap(heap_.begin(), heap_.end(), std::greater<Entry>());
  }

  int32_t find(PyObject* dict, uint8_t state, PyObject* key) const {
    PyObject* v = PyDict_GetItemWithError(dict, key);
    if (!v) {
      if (PyErr_Occurred()) raise_python();
      return -1;
    }
    return slot_of(v, state);
  }

  int32_t slot_of(PyObject* v, uint8_t state) const {  // the slot whose int is the map's value v
    long s = PyLong_AsLong(v);
    if (s < 0 || static_cast<size_t>(s) >= slot_int_.size() || slot_int_[s] != v || state_[s] != state) {
      if (PyErr_Occurred()) raise_python();
      throw std::runtime_error("prefix core: its key map was changed from outside");
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
      parent_.push_back(-1);
      nchild_.push_back(0);
      seq_.push_back(0);
      state_.push_back(kFree);
    }
    Py_INCREF(key);
    key_[s] = key;
    parent_[s] = -1;
    nchild_[s] = 0;
    seq_[s] = 0;
    return s;
  }

  void release(int32_t s) {
    PyObject* k = key_[s];
    key_[s] = nullptr;
    state_[s] = kFree;
    seq_[s] = -1;  // no heap entry matches a free slot
    free_.push_back(s);
    Py_DECREF(k);
  }

  PyObject* tracked_ = nullptr;       // tracked key -> slot int
  PyObject* parents_only_ = nullptr;  // untracked key with tracked children -> slot int
  std::vector<PyObject*> key_, slot_int_;
  std::vector<int32_t> parent_, nchild_, free_, pending_;
  std::vector<int64_t> seq_;
  std::vector<uint8_t> state_;
  std::vector<Entry> heap_, skipped_, inner_;  // skipped_, inner_, undo_: evict's scratch, kept for reuse
  std::vector<Undo> undo_;
  int64_t clock_ = 0;
  int32_t last_ = -1;  // the slot insert_key tracked last (a hint, checked before each use)
  bool batching_ = false, rebuild_due_ = false;
  std::vector<int32_t> fresh_;  // a batch's keys that were leaves when inserted
};

}  // namespace prefixcore
