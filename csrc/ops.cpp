// Schemas of the low-level kernels, defined once. The public ops (torch.ops.falconnet.*) are
// defined in falconnet_kernels/ops.py, which picks a backend and calls these for "cpu"/"cuda".
// CPU kernels register in csrc/cpu/*.cpp, CUDA kernels in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing falconnet_kernels._C loads this library, which registers the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(falconnet_C, m) {
  // y = act(sf(x; w1, w2) + bias) + residual;  w1: (G, c_h, k), w2: (c_h, m, G)
  m.def("sf_conv_forward(Tensor x, Tensor w1, Tensor w2, Tensor? bias, Tensor? residual, str activation) -> Tensor");
  // -> (grad_x, grad_w1, grad_w2, grad_bias); grad_bias has shape (C_out,) even when bias is None
  m.def("sf_conv_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor w2, Tensor? bias, str activation) -> (Tensor, Tensor, Tensor, Tensor)");
  // y = act(depthwise_conv3x3(x, weight, padding=1, stride) + bias);  weight: (C, 1, 3, 3)
  m.def("dw_conv3x3_forward(Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> Tensor");
  // -> (grad_x, grad_weight, grad_bias); grad_bias has shape (C,) even when bias is None
  m.def("dw_conv3x3_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, int stride, str activation) -> (Tensor, Tensor, Tensor)");
}
