// The Python module sam_kernels._C. Importing it runs the static op registrations of the other
// files (csrc/sam_kernels.cpp, the kernels); its Python functions (no pybind module) are host
// helpers of the optimizer layer: each is one C pass over a Python list of tensors where Python
// would take several (a read of a tensor attribute from Python costs 50-100 ns; on a model of
// thousands of small tensors a step's host work is such passes, see docs/design/host-time.md).
// They read metadata only (no device work, no sync) and answer None for anything but a list of
// plain tensors (torch.Tensor, nn.Parameter): the callers' Python fallbacks
// (sam_kernels/optim/param_scan.py, sam_kernels/ops/lists.py) give the same answers.
#define PY_SSIZE_T_CLEAN  // "y#" takes a Py_ssize_t length
#include <Python.h>

#include <string>

#include <torch/csrc/Storage.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

namespace {

PyObject* numel_sum(PyObject*, PyObject* list) {
  if (!PyList_Check(list)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  int64_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    if (!THPVariable_CheckExact(item)) Py_RETURN_NONE;
    total += THPVariable_Unpack(item).unsafeGetTensorImpl()->numel();
  }
  return PyLong_FromLongLong(total);
}

// scan(params) -> (grads, signature, numel, flags) or None. grads[i] is params[i].grad (the same
// Python object, or None); signature holds 3 bytes per param (scalar type, device type, device
// index + 1), equal between two scans exactly when every param kept its dtype and device; numel is
// the params' elements; flags: 1 some gradient is None, 2 some gradient is sparse (COO), 4 the
// params are on more than one device.
PyObject* scan(PyObject*, PyObject* list) {
  if (!PyList_Check(list)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(list);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(PyList_GET_ITEM(list, i))) Py_RETURN_NONE;
  }
  PyObject* grads = PyList_New(n);
  if (grads == nullptr) return nullptr;
  std::string signature(static_cast<size_t>(3 * n), '\0');
  int64_t total = 0;
  long flags = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(list, i));
    const c10::Device device = p.device();
    signature[3 * i] = static_cast<char>(p.scalar_type());
    signature[3 * i + 1] = static_cast<char>(device.type());
    signature[3 * i + 2] = static_cast<char>(device.index() + 1);
    if (i > 0 && (signature[3 * i + 1] != signature[1] || signature[3 * i + 2] != signature[2])) flags |= 4;
    total += p.unsafeGetTensorImpl()->numel();
    const at::Tensor& g = p.grad();
    if (!g.defined()) {
      flags |= 1;
      Py_INCREF(Py_None);
      PyList_SET_ITEM(grads, i, Py_None);
      continue;
    }
    if (g.layout() == c10::kSparse) flags |= 2;
    PyObject* wrapped = THPVariable_Wrap(g);  // the gradient's own Python object (a new reference)
    if (wrapped == nullptr) {
      Py_DECREF(grads);
      return nullptr;
    }
    PyList_SET_ITEM(grads, i, wrapped);
  }
  return Py_BuildValue("(Ny#Ll)", grads, signature.data(), static_cast<Py_ssize_t>(signature.size()),
                       static_cast<long long>(total), flags);
}

// Whether params[i] and backups[i] may trade storages: plain strided tensors, neither a view, each
// the only tensor over its storage (no view, .detach(), state_dict entry or flattened buffer of
// another module shares it, so nothing else sees the trade), with equal shape, strides, dtype and
// device, and a backup outside autograd.
bool sole(const at::Tensor& t) {
  // Counted with the storage's Python object alive (made here if there is none), which holds a
  // reference of its own; once made, torch keeps it as long as the storage lives.
  PyObject* obj = THPStorage_Wrap(t.storage());
  if (obj == nullptr) {
    PyErr_Clear();
    return false;
  }
  const bool alone = t.storage().use_count() == 2;
  Py_DECREF(obj);
  return alone;
}

bool tradeable(const at::Tensor& p, const at::Tensor& b) {
  return p.layout() == c10::kStrided && b.layout() == c10::kStrided && !p.is_view() && !b.is_view() &&
         !b.requires_grad() && p.scalar_type() == b.scalar_type() && p.device() == b.device() &&
         p.sizes() == b.sizes() && p.strides() == b.strides() && sole(p) && sole(b);
}

// swap_storages(params, backups) -> bool: params[i] takes backups[i]'s storage and backups[i] takes
// params[i]'s (as `p.data, b.data = b.data, p.data`), for every i, when every pair may trade
// (tradeable); else nothing changes and the answer is False. Each param's version counter is bumped,
// so an autograd graph that saved it sees the change as it sees an in-place write.
bool all_tradeable(PyObject* params, PyObject* backups) {
  if (!PyList_Check(params) || !PyList_Check(backups) || PyList_GET_SIZE(params) != PyList_GET_SIZE(backups))
    return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject *p = PyList_GET_ITEM(params, i), *b = PyList_GET_ITEM(backups, i);
    if (!THPVariable_CheckExact(p) || !THPVariable_CheckExact(b) || p == b) return false;
    if (!tradeable(THPVariable_Unpack(p), THPVariable_Unpack(b))) return false;
  }
  return true;
}

// tradeable(params, backups) -> bool: whether every pair may trade storages (tradeable above).
PyObject* tradeable_py(PyObject*, PyObject* args) {
  PyObject *params, *backups;
  if (!PyArg_ParseTuple(args, "OO", &params, &backups)) return nullptr;
  return PyBool_FromLong(all_tradeable(params, backups));
}

PyObject* swap_storages(PyObject*, PyObject* args) {
  PyObject *params, *backups;
  if (!PyArg_ParseTuple(args, "OO", &params, &backups)) return nullptr;
  if (!all_tradeable(params, backups)) Py_RETURN_FALSE;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    at::Tensor p = THPVariable_Unpack(PyList_GET_ITEM(params, i));
    at::Tensor b = THPVariable_Unpack(PyList_GET_ITEM(backups, i));
    const at::Tensor w = p.variable_data();  // a second tensor over p's storage, for the trade
    p.set_data(b);
    b.set_data(w);
    torch::autograd::impl::bump_version(p);
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"swap_storages", swap_storages, METH_VARARGS,
     "Trade the storages of params[i] and backups[i] when every pair may (bool)."},
    {"tradeable", tradeable_py, METH_VARARGS, "Whether every params[i] may trade storages with backups[i]."},
    {"numel_sum", numel_sum, METH_O, "Σ numel of a list of plain tensors, or None."},
    {"scan", scan, METH_O, "(grads, signature, numel, flags) of a list of plain-tensor params, or None."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
