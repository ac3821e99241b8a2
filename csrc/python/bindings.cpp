// tidal_ext._C: the Python extension. Importing it registers the ops (this module carries the same
// objects as libtidal.so) and exposes the C++ TidalAttention layer.
// The DecodeContext is the torch custom class (torch.classes.tidal.DecodeContext), passed in as
// the ScriptObject Python holds.
#include <torch/extension.h>
#include <torch/script.h>

#include <iterator>

#include "tidal/attention.h"
#include "tidal/kernels/params.h"

namespace py = pybind11;

namespace {

tidal::DecodeContext& as_context(const py::object& obj) {
  try {
    return *c10::IValue(py::cast<torch::jit::Object>(obj)._ivalue()).toCustomClass<tidal::DecodeContext>();
  } catch (const std::exception&) {
    throw py::type_error("tidal.TidalAttention: ctx: expected a torch.classes.tidal.DecodeContext, got " +
                         std::string(py::str(py::type::of(obj))));
  }
}

torch::Device as_device(const py::object& device) {
  if (py::isinstance<py::str>(device)) return torch::Device(device.cast<std::string>());
  return torch::python::detail::py_object_to_device(device);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "TidalDecode C++ extension: ops (torch.ops.tidal) and the TidalAttention layer";
  // The head dims every op accepts (kernels::kHeadDims), for checks made before any op runs
  // (tidal_ext.hf.enable).
  py::tuple head_dims(std::size(tidal::kernels::kHeadDims));
  for (size_t i = 0; i < head_dims.size(); ++i) head_dims[i] = tidal::kernels::kHeadDims[i];
  m.attr("HEAD_DIMS") = head_dims;
  using Impl = tidal::TidalAttentionImpl;
  // The C++ layer; tidal_ext.TidalAttention (tidal_ext/module.py) wraps it as a torch.nn.Module
  // that owns the parameters and shares them with this object.
  py::class_<Impl, std::shared_ptr<Impl>>(m, "TidalAttentionLayer")
      .def(py::init([](int64_t layer_idx, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t hidden_size, double rope_theta, int64_t max_positions, std::optional<double> scale) {
             tidal::TidalAttentionOptions o;
             o.layer_idx = layer_idx;
             o.num_heads = num_heads;
             o.num_kv_heads = num_kv_heads;
             o.head_dim = head_dim;
             o.hidden_size = hidden_size;
             o.rope_theta = rope_theta;
             o.max_positions = max_positions;
             o.scale = scale;
             return std::make_shared<Impl>(o);
           }),
           py::arg("layer_idx"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
           py::arg("hidden_size") = 0, py::arg("rope_theta") = 0.0, py::arg("max_positions") = 0,
           py::arg("scale") = py::none())
      .def("named_parameters",
           [](Impl& self) {
             std::vector<std::pair<std::string, at::Tensor>> out;
             for (const auto& item : self.named_parameters()) out.emplace_back(item.key(), item.value());
             return out;
           })
      .def("named_buffers",
           [](Impl& self) {
             std::vector<std::pair<std::string, at::Tensor>> out;
             for (const auto& item : self.named_buffers()) out.emplace_back(item.key(), item.value());
             return out;
           })
      .def("set_projection_weights", &Impl::set_projection_weights)
      .def("allocate_cache",
           [](Impl& self, int64_t batch, int64_t capacity, py::object dtype, py::object device) {
             auto opts = torch::TensorOptions()
                             .dtype(torch::python::detail::py_object_to_dtype(dtype))
                             .device(as_device(device));
             self.allocate_cache(batch, capacity, opts);
           })
      .def("set_cache", &Impl::set_cache)
      .def("k_cache", &Impl::k_cache)
      .def("v_cache", &Impl::v_cache)
      .def("prefill", [](Impl& self, const at::Tensor& x, const py::object& ctx) { return self.prefill(x, as_context(ctx)); })
      .def("decode_step",
           [](Impl& self, const at::Tensor& x, const py::object& ctx) { return self.decode_step(x, as_context(ctx)); })
      .def("correct", [](Impl& self, const at::Tensor& x, const py::object& ctx) { return self.correct(x, as_context(ctx)); })
      .def("prefill_qkv",
           [](Impl& self, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const py::object& ctx) {
             return self.prefill_qkv(q, k, v, as_context(ctx));
           })
      .def("decode_qkv",
           [](Impl& self, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const py::object& ctx) {
             return self.decode_qkv(q, k, v, as_context(ctx));
           })
      .def("correct_qkv",
           [](Impl& self, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const py::object& ctx) {
             return self.correct_qkv(q, k, v, as_context(ctx));
           })
      .def("rotate", &Impl::rotate);
}
