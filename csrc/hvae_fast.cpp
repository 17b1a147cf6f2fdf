// Operator schemas of the hvae_fast library and the Python module's init.
// Backends register kernels in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels,
// Python autograd and the pure-PyTorch fallback are registered in hvae_fast/ops/<op>.py.
// hvae_fast/ops/_registry.py keeps a copy of these strings for builds without this module;
// tests/test_ops.py checks that the two agree.
#include <Python.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

namespace {

PyObject* level_list(const std::vector<hvae_fast::cpu::Level>& levels) {
  PyObject* out = PyList_New(0);
  for (auto level : levels) {
    PyObject* name = PyUnicode_FromString(hvae_fast::cpu::level_name(level));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

PyObject* cpu_level(PyObject*, PyObject*) {
  return PyUnicode_FromString(hvae_fast::cpu::level_name(hvae_fast::cpu::active_level()));
}
PyObject* cpu_levels_compiled(PyObject*, PyObject*) { return level_list(hvae_fast::cpu::levels_compiled()); }
PyObject* cpu_levels_supported(PyObject*, PyObject*) { return level_list(hvae_fast::cpu::levels_supported()); }
PyObject* cpu_kernel_calls(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (auto level : hvae_fast::cpu::levels_compiled()) {
    PyObject* n = PyLong_FromLongLong(hvae_fast::cpu::calls(level));
    PyDict_SetItemString(out, hvae_fast::cpu::level_name(level), n);
    Py_DECREF(n);
  }
  return out;
}
PyObject* set_cpu_level(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "set_cpu_level: the level must be a str");
    return nullptr;
  }
  try {
    hvae_fast::cpu::set_level(PyUnicode_AsUTF8(arg));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_level", cpu_level, METH_NOARGS, "The instruction-set level the CPU kernels run."},
    {"cpu_levels_compiled", cpu_levels_compiled, METH_NOARGS, "The levels built into this module."},
    {"cpu_levels_supported", cpu_levels_supported, METH_NOARGS, "The built levels this CPU can run."},
    {"set_cpu_level", set_cpu_level, METH_O, "Makes every CPU kernel run this level ('auto': the best)."},
    {"cpu_kernel_calls", cpu_kernel_calls, METH_NOARGS, "CPU kernel calls per level since the module loaded."},
    {nullptr, nullptr, 0, nullptr}};

// Tags of the ops that read their seed on the host: cudagraph_unsafe (torch >= 2.8 has it),
// so that torch.compile(mode="reduce-overhead") runs them outside its CUDA graphs, where
// each call reads the seed drawn for it, instead of replaying the captured one's noise.
template <typename T, typename = void>
struct has_cudagraph_unsafe : std::false_type {};
template <typename T>
struct has_cudagraph_unsafe<T, std::void_t<decltype(T::cudagraph_unsafe)>> : std::true_type {};

template <typename T = at::Tag>
std::vector<at::Tag> host_seed_tags() {
  if constexpr (has_cudagraph_unsafe<T>::value) {
    return {T::cudagraph_unsafe};
  } else {
    return {};
  }
}

}  // namespace

extern "C" {
// Importing hvae_fast._C runs the static registrations; the methods choose the CPU level.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hvae_fast, m) {
  m.def("posterior_sample(Tensor delta_mu, Tensor delta_logvar, Tensor eps, Tensor? mu_p, "
        "Tensor? logvar_p, float min_logvar, float max_logvar) -> (Tensor, Tensor)");
  m.def("posterior_sample_backward(Tensor grad_z, Tensor grad_kl, Tensor delta_mu, "
        "Tensor delta_logvar, Tensor eps, Tensor? logvar_p, float min_logvar, float max_logvar, "
        "bool eps_grad=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same with the noise drawn in the kernel from `seed` (csrc/formulas.h, Philox) and
  // drawn again in the backward: eps is never stored. The seed is a 0-dim int64 CPU tensor,
  // not an int, so that torch.compile(fullgraph=True) keeps its draw in the graph; the
  // kernels read it on the host (csrc/inputs.h, philox_seed).
  const std::vector<at::Tag> host_seed = host_seed_tags();  // an lvalue: def(schema, tags), not def(name, fn)
  m.def("posterior_sample_philox(Tensor delta_mu, Tensor delta_logvar, Tensor? mu_p, Tensor? logvar_p, "
        "Tensor seed, float min_logvar, float max_logvar) -> (Tensor, Tensor)",
        host_seed);
  m.def("posterior_sample_philox_backward(Tensor grad_z, Tensor grad_kl, Tensor delta_mu, "
        "Tensor delta_logvar, Tensor? logvar_p, Tensor seed, float min_logvar, float max_logvar) "
        "-> (Tensor, Tensor, Tensor)",
        host_seed);
  // overwrite_logits: the backward writes the gradient into logits (see hvae_fast/ops/categorical_log_likelihood.py).
  m.def("categorical_log_likelihood(Tensor logits, Tensor x, bool overwrite_logits=False) -> (Tensor, Tensor)");
  m.def("categorical_log_likelihood_backward(Tensor grad, Tensor logits, Tensor x, Tensor lse) "
        "-> Tensor");
  // The same gradient written into logits' own storage (no logits-sized allocation).
  m.def("categorical_log_likelihood_backward_(Tensor grad, Tensor(a!) logits, Tensor x, Tensor lse) -> ()");
  m.def("bernoulli_log_likelihood(Tensor logits, Tensor x) -> Tensor");
  // One torch.optim.Adamax step over many tensors; neg_clrs[j] = -lr / (1 - beta1^step_j).
  m.def("adamax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
        "float[] neg_clrs, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def("bernoulli_log_likelihood_backward(Tensor grad, Tensor logits, Tensor x) -> Tensor");
  // The discretized logistic mixture (PixelCNN++), exact for every input (csrc/formulas.h).
  m.def("dmol_log_likelihood(Tensor params, Tensor x, int num_mixtures, int num_vals=256, "
        "float min_log_scale=-7.) -> Tensor");
  m.def("dmol_log_likelihood_backward(Tensor grad, Tensor params, Tensor x, int num_mixtures, int num_vals=256, "
        "float min_log_scale=-7.) -> Tensor");
}
