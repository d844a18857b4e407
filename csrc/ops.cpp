// The one schema file of moe_ext: every op's signature lives here; kernels register
// themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cpp.
//
// Notation (docs/architecture.md#notation): T tokens, D in features, O out features, E LoRA
// experts, N null experts, M = E + N router outputs, K experts per token, R LoRA rank, P = T * K
// (token, k) pairs. Python's limited API (Py_LIMITED_API, set by setup.py) keeps the module abi3:
// one build for every CPython >= 3.10.
#include <Python.h>

#include <string>

#include "stable.h"

STABLE_TORCH_LIBRARY(moe_ext, m) {
  // probs (T, M), weights (T, K), experts (T, K) int64, counts (M,) int64.
  m.def("route(Tensor router_logits, Tensor? logit_bias, int top_k, float temperature, "
        "bool normalize_weights) -> (Tensor probs, Tensor weights, Tensor experts, Tensor counts)");
  // grad_router_logits (T, M) in the probs' dtype.
  m.def("route_backward(Tensor? grad_probs, Tensor grad_weights, Tensor probs, Tensor weights, "
        "Tensor experts, float temperature, bool normalize_weights) -> Tensor");
  // Stable counting sort of the P pairs by expert: order (P,), offsets (num_bins + 1,).
  m.def("align(Tensor experts, int num_bins) -> (Tensor order, Tensor offsets)");
  // Sparse grouped strategy: y (T, O), and for the backward the per-pair shrink h (P, R)
  // and the pairs' alignment order (P,), offsets (E + 2,) (every null expert in bin E).
  m.def("lora_forward(Tensor x, Tensor lora_A, Tensor lora_B, Tensor weights, Tensor experts, "
        "float scaling, int num_null_experts) -> (Tensor y, Tensor h, Tensor order, "
        "Tensor offsets)");
  m.def(
      "lora_backward(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor weights, "
      "Tensor experts, Tensor order, Tensor offsets, Tensor h, float scaling, "
      "int num_null_experts) -> (Tensor grad_x, Tensor grad_weights, Tensor grad_A, Tensor "
      "grad_B)");
  // Dense-gated strategy: y (T, O) = gate(x A_all^T) B_all^T with every expert's shrink
  // computed and the unchosen ones masked; h_all (T, E*R) = x A_all^T kept for backward.
  m.def("lora_dense_forward(Tensor x, Tensor lora_A, Tensor lora_B, Tensor weights, "
        "Tensor experts, float scaling, int num_null_experts) -> (Tensor y, Tensor h_all)");
  m.def("lora_dense_backward(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, "
        "Tensor weights, Tensor experts, Tensor h_all, float scaling, int num_null_experts) "
        "-> (Tensor grad_x, Tensor grad_weights, Tensor grad_A, Tensor grad_B)");
  // The dense-gated expand alone, from a given h_all (T, E*R): y (T, O) = gate(h_all) B_all^T.
  // MoLoRALinear gets h_all and the router logits from one GEMM over x, [A_all; Wr] x^T, and
  // routes in between; autograd's GEMM gives dx and [dA_all; dWr] from grad_h_all.
  m.def("lora_dense_expand(Tensor h_all, Tensor lora_B, Tensor weights, Tensor experts, "
        "float scaling, int num_null_experts) -> Tensor y");
  m.def("lora_dense_expand_backward(Tensor grad_y, Tensor h_all, Tensor lora_B, Tensor weights, "
        "Tensor experts, float scaling, int num_null_experts) "
        "-> (Tensor grad_h_all, Tensor grad_weights, Tensor grad_B)");
}

// Build facts for `moe-ext info`, as JSON. The macros come from setup.py; the CUDA
// library (_C_cuda) reports its own archs.
#ifndef MOE_EXT_TORCH_VERSION
#define MOE_EXT_TORCH_VERSION "unknown"
#endif
static PyObject* build_info(PyObject*, PyObject*) {
  const std::string json =
      std::string("{\"torch_version\": \"" MOE_EXT_TORCH_VERSION "\", \"stable_abi_target\": \"") +
      std::to_string(TORCH_TARGET_VERSION >> 56) + "." +
      std::to_string((TORCH_TARGET_VERSION >> 48) & 0xff) +
      "\", \"compiler\": \"gcc/clang " __VERSION__ "\"}";
  return PyUnicode_FromString(json.c_str());
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "Build facts (JSON): the torch built against, the stable ABI targeted, the compiler."},
    {nullptr, nullptr, 0, nullptr}};

// `import moe_ext._C` loads this library, which runs the registrations above.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
