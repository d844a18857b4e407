// moe_ext._C_cuda: `import moe_ext._C_cuda` (moe_ext/ops/common.py, after moe_ext._C, which
// defines the schemas) loads this library, which registers the CUDA kernels of
// csrc/cuda/*_cuda.cpp. Python's limited API keeps it abi3, as _C.
#include <Python.h>

#include <string>

#ifndef MOE_EXT_CUDA_ARCHS
#define MOE_EXT_CUDA_ARCHS ""
#endif

// The archs this library was built for, as setup.py names them ("80;90a;80+PTX").
static PyObject* cuda_archs(PyObject*, PyObject*) {
  return PyUnicode_FromString(MOE_EXT_CUDA_ARCHS);
}

static PyMethodDef methods[] = {
    {"cuda_archs", cuda_archs, METH_NOARGS, "The CUDA archs built: SASS, and +PTX where PTX."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&module_def); }
