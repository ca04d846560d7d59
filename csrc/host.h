// The Python methods of sam_kernels._C (csrc/host.cpp): host helpers of the optimizer layer.
#pragma once
#include <Python.h>

PyMethodDef* sam_kernels_host_methods();
