// Runs the TorchScript decoder saved by export.py from C++ and checks that every output equals the
// one Python recorded, bit for bit (same kernels, same inputs, CPU):
//
//   ts_run model.pt data.pt
//
// model.pt is loaded with torch::jit::load; its code calls torch.ops.tidal.* and takes a
// torch.classes.tidal.DecodeContext, both registered by libtidal.so when it loads. data.pt (a
// scripted module of attributes) holds the inputs, the schedule and Python's outputs.
//
// Built twice from this file (CMakeLists.txt):
//   ts_run             builds the DecodeContext with the C++ API (tidal::TidalConfig,
//                      c10::make_intrusive<tidal::DecodeContext>) and drives it directly; the
//                      TorchScript code then works on that very C++ object.
//   ts_run_dispatcher  includes no TidalDecode header and references no symbol of the library: the
//                      context comes from the model's scripted make_context() and is driven through
//                      the custom class's registered methods. That this runs at all shows that
//                      linking TidalDecode::tidal keeps libtidal.so loaded (--no-as-needed), so the
//                      ops and classes are registered.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/script.h>

#ifndef TIDAL_DISPATCHER_ONLY
#include <tidal/config.h>
#include <tidal/decode_context.h>
#endif

namespace {

// The decode context as the two builds hold it. `value` is what the scripted methods take.
struct Context {
  c10::IValue value;
#ifndef TIDAL_DISPATCHER_ONLY
  c10::intrusive_ptr<tidal::DecodeContext> cpp;

  void begin_prefill(const at::Tensor& lens) { cpp->begin_prefill(lens); }
  void begin_step() { cpp->begin_step(); }
  bool correction_due() { return cpp->correction_due(); }
  bool has_indices() { return cpp->has_indices(); }
  at::Tensor indices() { return cpp->indices(); }
#else
  // A method of the custom class torch.classes.tidal.DecodeContext, called through its schema.
  c10::IValue call(const std::string& name, std::vector<c10::IValue> args = {}) {
    args.insert(args.begin(), value);
    return value.type()->expectRef<c10::ClassType>().getMethod(name)(std::move(args));
  }
  void begin_prefill(const at::Tensor& lens) { call("begin_prefill", {lens}); }
  void begin_step() { call("begin_step"); }
  bool correction_due() { return call("correction_due").toBool(); }
  bool has_indices() { return call("has_indices").toBool(); }
  at::Tensor indices() { return call("indices").toTensor(); }
#endif
};

// Largest |a - b| (inf where shapes, dtypes or NaN placement differ), and whether a equals b exactly.
double max_diff(const at::Tensor& a, const at::Tensor& b, bool& equal) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
    equal = false;
    return INFINITY;
  }
  equal = at::equal(a, b) || (a.numel() == 0);
  if (a.numel() == 0) return 0.0;
  if (a.is_floating_point()) {
    const auto nan_mismatch = (a.isnan() != b.isnan()).any().item<bool>();
    if (nan_mismatch) return INFINITY;
    return (a.to(at::kDouble) - b.to(at::kDouble)).abs().nan_to_num(0.0).max().item<double>();
  }
  return (a.to(at::kLong) - b.to(at::kLong)).abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " model.pt data.pt\n";
    return 2;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::jit::Module data = torch::jit::load(argv[2]);
    auto tensor = [&](const char* name) { return data.attr(name).toTensor(); };
    auto integer = [&](const char* name) { return data.attr(name).toInt(); };
    // Same thread count as Python: the CPU kernels' reductions then split the same way.
    at::set_num_threads(static_cast<int>(integer("num_threads")));

    torch::jit::Module model = torch::jit::load(argv[1]);
    model.eval();

    const int64_t L = integer("num_layers"), stride = integer("correction_stride");
    const std::vector<int64_t> select_layers = data.attr("select_layers").toIntVector();
    const std::string mode = data.attr("mode").toStringRef();

    Context ctx;
#ifndef TIDAL_DISPATCHER_ONLY
    ctx.cpp = c10::make_intrusive<tidal::DecodeContext>(
        tidal::TidalConfig(integer("top_k"), select_layers, mode, integer("sink"), integer("recent"), stride), L);
    ctx.value = c10::IValue(ctx.cpp);
    const char* how = "context built with the C++ API";
#else
    ctx.value = model.run_method("make_context", integer("top_k"), c10::List<int64_t>(select_layers), mode,
                                 integer("sink"), integer("recent"), stride);
    const char* how = "no TidalDecode symbol referenced; context from the scripted make_context";
#endif

    // The generation of export.py's generate(), step for step.
    const at::Tensor prompt = tensor("prompt"), xs = tensor("xs"), expected_k = tensor("expected_k_caches");
    const int64_t steps = xs.size(0);
    c10::List<at::Tensor> k_caches, v_caches;
    for (int64_t l = 0; l < L; ++l) {
      k_caches.push_back(torch::zeros_like(expected_k[l]));
      v_caches.push_back(torch::zeros_like(expected_k[l]));
    }
    ctx.begin_prefill(tensor("prompt_lens"));
    const at::Tensor prefill_out = model.run_method("prefill", prompt, k_caches, v_caches, ctx.value).toTensor();
    std::vector<at::Tensor> outs;
    int64_t corrections = 0;
    for (int64_t t = 0; t < steps; ++t) {
      ctx.begin_step();
      outs.push_back(model.forward({xs[t], k_caches, v_caches, ctx.value}).toTensor());
      if (ctx.correction_due()) {
        model.run_method("correct", xs.slice(0, t - stride + 1, t + 1).transpose(0, 1), k_caches, v_caches, ctx.value);
        ++corrections;
      }
    }
    const at::Tensor indices = ctx.has_indices() ? ctx.indices() : torch::empty({0}, torch::kInt);

    // Compare with Python's.
    std::vector<at::Tensor> ks(k_caches.begin(), k_caches.end()), vs(v_caches.begin(), v_caches.end());
    const std::vector<std::pair<const char*, std::pair<at::Tensor, at::Tensor>>> checks = {
        {"prefill output", {prefill_out, tensor("expected_prefill")}},
        {"decode step outputs", {torch::stack(outs), tensor("expected_steps")}},
        {"K caches", {torch::stack(ks), expected_k}},
        {"V caches", {torch::stack(vs), tensor("expected_v_caches")}},
        {"last selection (indices)", {indices, tensor("expected_indices")}},
    };
    double worst = 0;
    bool all_equal = true;
    for (const auto& [what, pair] : checks) {
      bool equal = false;
      const double diff = max_diff(pair.first, pair.second, equal);
      std::printf("  %-26s %s  max diff %g%s\n", what, c10::str(pair.first.sizes()).c_str(), diff,
                  equal ? "" : "  <-- differs");
      worst = std::max(worst, diff);
      all_equal = all_equal && equal;
    }
    std::printf("  (%s; %lld decode steps, %lld corrections)\n", how, (long long)steps, (long long)corrections);
    if (!all_equal) {
      std::printf("torchscript: outputs DIFFER from python (max diff %g)\n", worst);
      return 1;
    }
    std::printf("torchscript: outputs equal python (max diff 0)\n");
  } catch (const c10::Error& e) {
    std::cerr << "ts_run: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "ts_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
