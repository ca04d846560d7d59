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

#include <torch/csrc/autograd/python_variable.h>

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

PyMethodDef methods[] = {
    {"numel_sum", numel_sum, METH_O, "Σ numel of a list of plain tensors, or None."},
    {"scan", scan, METH_O, "(grads, signature, numel, flags) of a list of plain-tensor params, or None."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
