// What the compiled policy cores (prefix_core.cpp, s3fifo_core.cpp, auto_core.cpp) share: a
// Python list or tuple read as an array of borrowed keys, a pending Python error raised as C++,
// and each core's binding into kvbm._native (module.cpp calls these; kvbm/ops.py hands out).
#pragma once

#include <nanobind/nanobind.h>

#include <Python.h>

namespace policycore {

[[noreturn]] inline void raise_python() { throw nanobind::python_error(); }

// A list or tuple as an array of borrowed items (other iterables copied into a list).
class Keys {
 public:
  explicit Keys(nanobind::handle obj) {
    PyObject* o = obj.ptr();
    if (PyList_Check(o) || PyTuple_Check(o)) {
      seq_ = o;
      Py_INCREF(o);
    } else {
      seq_ = PySequence_List(o);
      if (!seq_) raise_python();
    }
  }
  ~Keys() { Py_DECREF(seq_); }
  Keys(const Keys&) = delete;
  Keys& operator=(const Keys&) = delete;
  Py_ssize_t size() const { return PySequence_Fast_GET_SIZE(seq_); }
  PyObject* operator[](Py_ssize_t i) const { return PySequence_Fast_ITEMS(seq_)[i]; }
  PyObject* const* items() const { return PySequence_Fast_ITEMS(seq_); }

 private:
  PyObject* seq_;
};

// The protected keys of an evict as the Python versions see them: a set (lists become one),
// or nullptr when there are none.
class Protected {
 public:
  Protected() = default;  // none
  explicit Protected(nanobind::handle obj) {
    PyObject* o = obj.ptr();
    if (o == Py_None) return;
    int truth = PyObject_IsTrue(o);
    if (truth < 0) raise_python();
    if (!truth) return;
    if (PyAnySet_Check(o) || PyDict_Check(o)) {
      set_ = o;
      Py_INCREF(o);
    } else {
      set_ = PySet_New(o);
      if (!set_) raise_python();
    }
  }
  ~Protected() { Py_XDECREF(set_); }
  Protected(const Protected&) = delete;
  Protected& operator=(const Protected&) = delete;
  bool any() const { return set_ != nullptr; }
  PyObject* get() const { return set_; }
  bool has(PyObject* key) const {
    if (!set_) return false;
    int r = PySequence_Contains(set_, key);
    if (r < 0) raise_python();
    return r == 1;
  }

 private:
  PyObject* set_ = nullptr;
};

// dict[key] = value unless key is there: one hash and one probe where a lookup and then an
// insert take two. Returns the value now under key: `value` (it went in) or the one that was
// there; nullptr with a Python error set.
inline PyObject* set_default(PyObject* dict, PyObject* key, PyObject* value) {
  return PyDict_SetDefault(dict, key, value);
}

// The new entry under key taken out again after a later step failed; the pending error is kept.
inline void undo_set(PyObject* dict, PyObject* key) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  if (PyDict_DelItem(dict, key) != 0) PyErr_WriteUnraisable(key);
  PyErr_Restore(t, v, tb);
}

}  // namespace policycore

void bind_prefix(nanobind::module_& m);
void bind_s3fifo(nanobind::module_& m);
void bind_auto(nanobind::module_& m);
