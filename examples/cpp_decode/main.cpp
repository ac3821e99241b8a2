// tidal_decode: a pure LibTorch decode app (no Python) on the installed TidalDecode package.
//
// It builds an L-layer, Llama-like decoder stack of tidal::TidalAttention layers with random weights
//   per layer: x = x + attn(rmsnorm(x))          (q/k/v/o projections, rotary embedding)
// or, with --projections off, the attention alone: every layer gets random q/k/v (decode_qkv), so
// the time is the attention cost only. It fills the KV caches with a context of N tokens, then runs
// the same decode steps twice, each with its own tidal::DecodeContext and the same layers (the
// caches are shared: a step writes its token's K/V before attending, and nothing reads past the
// current token, so both runs see the same prefix):
//   full  : TidalConfig with no select layers (every layer full attention, the baseline)
//   tidal : the given schedule (--select-layers, --top-k, --mode, ...)
// and prints ms per decode step (= per token of each sequence; median over the measured steps
// after warm-up) for both, the speedup, and how close the two runs' outputs are on the first step.
//
// Timing: each step is bracketed by a device synchronization (none inside a step); the host clock
// measures begin_step + every layer (+ the KV-cache correction on the steps it is due), i.e. what
// an eager C++ decode loop pays, kernel launches included. --cuda-graph (CUDA builds of torch)
// captures one step as a CUDA graph and times its replays instead: the GPU time alone.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <tidal/attention.h>
#include <tidal/decode_context.h>

#ifdef TIDAL_EXAMPLE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

struct Args {
  int64_t layers = 32, heads = 32, kv_heads = 8, head_dim = 128, hidden = 0;  // hidden 0: heads*head_dim
  int64_t context = 8192, batch = 1, steps = 20, warmup = 3;
  int64_t top_k = 2048, sink = 0, recent = 0, correction_stride = 0;
  std::vector<int64_t> select_layers{2, 13};
  std::string mode = "head", device = "cpu", dtype = "auto", prefill = "auto", json;
  bool projections = true, ragged = false, cuda_graph = false;
  int64_t prefill_chunk = 4096, threads = 0, seed = 0;
};

void usage(std::ostream& os) {
  os << "usage: tidal_decode [options]\n"
        "model (Llama-3-8B attention shapes by default):\n"
        "  --layers L (32)  --heads Hq (32)  --kv-heads Hkv (8)  --head-dim D (128)\n"
        "  --hidden H (Hq*D)  --projections on|off (on; off: random q/k/v per layer, attention cost only)\n"
        "workload:\n"
        "  --context N (8192)  --batch B (1)  --ragged (sequence b gets N - b*N/(2B) tokens)\n"
        "  --steps S (20, measured)  --warmup W (3)\n"
        "  --prefill run|random|auto (auto: run up to 16384 tokens, else random)\n"
        "      run: chunked prefill through the layers (TidalAttention::correct, --prefill-chunk tokens\n"
        "           at a time); random: K/V caches filled with N(0,1), no prefill compute\n"
        "  --prefill-chunk C (4096)\n"
        "TidalDecode schedule:\n"
        "  --top-k K (2048)  --select-layers 2,13  --mode head|group  --sink S (0)  --recent R (0)\n"
        "  --correction-stride S (0 = off; else re-run the last S tokens with full attention every S steps)\n"
        "runtime:\n"
        "  --device cpu|cuda[:i] (cpu)  --dtype float|half|bfloat16|auto (auto: bfloat16 on cuda, float on cpu)\n"
        "  --threads T (CPU intra-op threads, 0 = torch's default)  --seed S (0)\n"
        "  --cuda-graph (capture one step as a CUDA graph, time replays; not with --correction-stride)\n"
        "  --json PATH (write the result row as JSON)\n";
}

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "tidal_decode: " << msg << "\n";
  usage(std::cerr);
  std::exit(2);
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(std::stoll(item));
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "-h" || key == "--help") {
      usage(std::cout);
      std::exit(0);
    }
    if (key == "--ragged") { a.ragged = true; continue; }
    if (key == "--cuda-graph") { a.cuda_graph = true; continue; }
    if (i + 1 >= argc) fail("missing value for " + key);
    const std::string v = argv[++i];
    try {
      if (key == "--layers") a.layers = std::stoll(v);
      else if (key == "--heads") a.heads = std::stoll(v);
      else if (key == "--kv-heads") a.kv_heads = std::stoll(v);
      else if (key == "--head-dim") a.head_dim = std::stoll(v);
      else if (key == "--hidden") a.hidden = std::stoll(v);
      else if (key == "--context") a.context = std::stoll(v);
      else if (key == "--batch") a.batch = std::stoll(v);
      else if (key == "--steps") a.steps = std::stoll(v);
      else if (key == "--warmup") a.warmup = std::stoll(v);
      else if (key == "--top-k") a.top_k = std::stoll(v);
      else if (key == "--sink") a.sink = std::stoll(v);
      else if (key == "--recent") a.recent = std::stoll(v);
      else if (key == "--correction-stride") a.correction_stride = std::stoll(v);
      else if (key == "--select-layers") a.select_layers = parse_list(v);
      else if (key == "--mode") a.mode = v;
      else if (key == "--device") a.device = v;
      else if (key == "--dtype") a.dtype = v;
      else if (key == "--prefill") a.prefill = v;
      else if (key == "--prefill-chunk") a.prefill_chunk = std::stoll(v);
      else if (key == "--threads") a.threads = std::stoll(v);
      else if (key == "--seed") a.seed = std::stoll(v);
      else if (key == "--json") a.json = v;
      else if (key == "--projections") {
        if (v != "on" && v != "off") fail("--projections: expected on|off, got " + v);
        a.projections = v == "on";
      } else fail("unknown option " + key);
    } catch (const std::logic_error&) {
      fail("bad value for " + key + ": " + v);
    }
  }
  if (a.hidden == 0) a.hidden = a.heads * a.head_dim;
  if (a.layers < 1 || a.context < 1 || a.batch < 1 || a.steps < 1 || a.warmup < 1 || a.prefill_chunk < 1)
    fail("--layers, --context, --batch, --steps, --warmup and --prefill-chunk must be >= 1");
  if (a.prefill == "auto") a.prefill = a.context <= 16384 ? "run" : "random";
  if (a.prefill != "run" && a.prefill != "random") fail("--prefill: expected run|random|auto, got " + a.prefill);
  if (a.cuda_graph && a.correction_stride > 0)
    fail("--cuda-graph replays one captured step: it cannot run the correction schedule (--correction-stride)");
  return a;
}

at::ScalarType parse_dtype(const std::string& s, const torch::Device& device) {
  if (s == "auto") return device.is_cuda() ? at::kBFloat16 : at::kFloat;
  if (s == "float" || s == "float32") return at::kFloat;
  if (s == "half" || s == "float16") return at::kHalf;
  if (s == "bfloat16" || s == "bf16") return at::kBFloat16;
  fail("--dtype: expected float|half|bfloat16|auto, got " + s);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / v.size();
}

at::Tensor rmsnorm(const at::Tensor& x) {
  const auto xf = x.to(at::kFloat);
  return (xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + 1e-5)).to(x.scalar_type());
}

// Cosine similarity per sequence (row of dim 0), flattened over the rest; returns the smallest.
double min_cosine(const at::Tensor& a, const at::Tensor& b) {
  const auto x = a.to(at::kDouble).reshape({a.size(0), -1});
  const auto y = b.to(at::kDouble).reshape({b.size(0), -1});
  const auto cos = (x * y).sum(1) / (x.norm(2, 1) * y.norm(2, 1)).clamp_min(1e-300);
  return cos.min().item<double>();
}

// The decoder stack and its inputs. A step's inputs come from a small pool (rotated through), so
// both runs see identical inputs without generating random numbers inside the timed region.
class Stack {
 public:
  static constexpr int64_t kPool = 8;

  Stack(const Args& a, torch::Device device, at::ScalarType dtype) : a_(a), device_(device), dtype_(dtype) {
    const int64_t capacity = a.context + a.warmup + a.steps;
    const auto opts = torch::TensorOptions().dtype(dtype).device(device);
    for (int64_t l = 0; l < a.layers; ++l) {
      tidal::TidalAttentionOptions o;
      o.layer_idx = l;
      o.num_heads = a.heads;
      o.num_kv_heads = a.kv_heads;
      o.head_dim = a.head_dim;
      if (a.projections) {  // Llama-3: projections from the hidden size, rope theta 500000
        o.hidden_size = a.hidden;
        o.rope_theta = 500000.0;
        o.max_positions = capacity;
      }
      tidal::TidalAttention layer(o);
      layer->to(device, dtype);
      layer->allocate_cache(a.batch, capacity, opts);
      layers_.push_back(layer);
    }
    torch::NoGradGuard no_grad;
    if (a.projections) {
      for (int64_t p = 0; p < kPool; ++p) x_pool_.push_back(torch::randn({a.batch, a.hidden}, opts));
    } else {
      for (int64_t l = 0; l < a.layers; ++l) {
        q_pool_.emplace_back();
        k_pool_.emplace_back();
        v_pool_.emplace_back();
        for (int64_t p = 0; p < kPool; ++p) {
          q_pool_[l].push_back(torch::randn({a.batch, a.heads, a.head_dim}, opts));
          k_pool_[l].push_back(torch::randn({a.batch, a.kv_heads, a.head_dim}, opts));
          v_pool_[l].push_back(torch::randn({a.batch, a.kv_heads, a.head_dim}, opts));
        }
      }
    }
  }

  // Fills tokens 0..context-1 of every cache. `ctx` is a scratch context (prefill is full attention
  // whatever the schedule); the runs start their own contexts on the filled caches.
  void fill_context(tidal::DecodeContext& ctx) {
    torch::NoGradGuard no_grad;
    const auto opts = torch::TensorOptions().dtype(dtype_).device(device_);
    if (a_.prefill == "random") {
      for (auto& layer : layers_) {
        layer->k_cache().normal_();
        layer->v_cache().normal_();
      }
      return;
    }
    // Chunked prefill: chunk [s, s+T) of every sequence is written at positions s..s+T-1 by the
    // correction path (TidalAttention::correct starts at seq_lens - T), attending causally to all
    // earlier tokens. Sequences shorter than the context (--ragged) get their tail overwritten by
    // the decode steps before it is ever read.
    for (int64_t s = 0; s < a_.context; s += a_.prefill_chunk) {
      const int64_t T = std::min(a_.prefill_chunk, a_.context - s);
      ctx.begin_prefill(torch::full({a_.batch}, s + T, opts.dtype(at::kInt)));
      if (a_.projections) {
        auto x = torch::randn({a_.batch, T, a_.hidden}, opts);
        for (auto& layer : layers_) x = x + layer->correct(rmsnorm(x), ctx);
      } else {
        for (auto& layer : layers_) {
          layer->correct_qkv(torch::randn({a_.batch, a_.heads, T, a_.head_dim}, opts),
                             torch::randn({a_.batch, a_.kv_heads, T, a_.head_dim}, opts),
                             torch::randn({a_.batch, a_.kv_heads, T, a_.head_dim}, opts), ctx);
        }
      }
    }
  }

  // One decode step for every sequence with the inputs of pool slot p (ctx.begin_step() done by the
  // caller). Returns what the runs compare: the final hidden state [B, hidden] with projections,
  // else every layer's attention output [B, L, Hq, D].
  at::Tensor step(int64_t p, tidal::DecodeContext& ctx, at::Tensor* x_in = nullptr) {
    torch::NoGradGuard no_grad;
    if (a_.projections) {
      auto x = x_in ? *x_in : x_pool_[p];
      for (auto& layer : layers_) x = x + layer->decode_step(rmsnorm(x), ctx);
      return x;
    }
    std::vector<at::Tensor> outs;
    for (int64_t l = 0; l < a_.layers; ++l)
      outs.push_back(layers_[l]->decode_qkv(q_pool_[l][p], k_pool_[l][p], v_pool_[l][p], ctx));
    return torch::stack(outs, 1);
  }

  // KV-cache correction: the last S decode tokens (pool slots `slots`, oldest first) run through the
  // stack again with full attention, layer by layer, rewriting their K/V in every layer's cache.
  void correct(const std::vector<int64_t>& slots, tidal::DecodeContext& ctx) {
    torch::NoGradGuard no_grad;
    if (a_.projections) {
      std::vector<at::Tensor> xs;
      for (int64_t p : slots) xs.push_back(x_pool_[p]);
      auto x = torch::stack(xs, 1);  // [B, S, hidden]
      for (auto& layer : layers_) x = x + layer->correct(rmsnorm(x), ctx);
      return;
    }
    for (int64_t l = 0; l < a_.layers; ++l) {
      std::vector<at::Tensor> qs, ks, vs;
      for (int64_t p : slots) {
        qs.push_back(q_pool_[l][p]);
        ks.push_back(k_pool_[l][p]);
        vs.push_back(v_pool_[l][p]);
      }
      layers_[l]->correct_qkv(torch::stack(qs, 2), torch::stack(ks, 2), torch::stack(vs, 2), ctx);
    }
  }

  const at::Tensor& pool_x(int64_t p) const { return x_pool_[p]; }

 private:
  Args a_;
  torch::Device device_;
  at::ScalarType dtype_;
  std::vector<tidal::TidalAttention> layers_;
  std::vector<at::Tensor> x_pool_;                                  // [B, hidden] per slot
  std::vector<std::vector<at::Tensor>> q_pool_, k_pool_, v_pool_;  // [layer][slot]
};

struct RunResult {
  std::vector<double> ms;  // measured steps
  at::Tensor first;        // step 1's output (float, CPU)
  at::Tensor first_update; // with projections: step 1's final hidden state minus its input
  int64_t corrections = 0;
};

void keep_first(RunResult& r, const at::Tensor& out, const Stack& stack, const Args& a) {
  r.first = out.to(torch::kCPU, at::kFloat);
  if (a.projections) r.first_update = r.first - stack.pool_x(0).to(torch::kCPU, at::kFloat);
}

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Decode warmup + steps tokens from the filled context with `ctx` (begin_prefill resets it).
RunResult run(Stack& stack, tidal::DecodeContext& ctx, const at::Tensor& prompt_lens, const Args& a,
              const torch::Device& device) {
  RunResult r;
  ctx.begin_prefill(prompt_lens);
  const int64_t stride = ctx.config().correction_stride;
  std::vector<int64_t> history;  // pool slots of the steps so far (the last `stride` are corrected)
  for (int64_t i = 0; i < a.warmup + a.steps; ++i) {
    const int64_t slot = i % Stack::kPool;
    sync(device);
    const auto t0 = std::chrono::steady_clock::now();
    ctx.begin_step();
    const auto out = stack.step(slot, ctx);
    history.push_back(slot);
    if (stride > 0 && ctx.correction_due()) {
      stack.correct(std::vector<int64_t>(history.end() - stride, history.end()), ctx);
      ++r.corrections;
    }
    sync(device);
    const auto t1 = std::chrono::steady_clock::now();
    if (i == 0) keep_first(r, out, stack, a);
    if (i >= a.warmup) r.ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return r;
}

#ifdef TIDAL_EXAMPLE_WITH_CUDA
// CUDA-graph timing: warm-up steps run eagerly on a side stream, then one whole step is captured
// (begin_step + every layer) and replayed per measured step; begin_step advances the context's
// lengths in place, so every replay advances them by one on the device. Inputs: pool slot 0's q/k/v (projections
// off) or one static x that is refreshed per step (projections on).
RunResult run_graph(Stack& stack, tidal::DecodeContext& ctx, const at::Tensor& prompt_lens, const Args& a,
                    const torch::Device& device) {
  RunResult r;
  torch::NoGradGuard no_grad;
  ctx.begin_prefill(prompt_lens);
  auto side = at::cuda::getStreamFromPool(false, device.index());
  at::cuda::CUDAGraph graph;
  at::Tensor x_static;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    for (int64_t i = 0; i < a.warmup; ++i) {
      ctx.begin_step();
      const auto out = stack.step(i % Stack::kPool, ctx);
      if (i == 0) keep_first(r, out, stack, a);
    }
    if (a.projections) x_static = stack.pool_x(0).clone();
    side.synchronize();
    graph.capture_begin();
    ctx.begin_step();
    stack.step(0, ctx, a.projections ? &x_static : nullptr);
    graph.capture_end();
  }
  for (int64_t i = 0; i < a.steps; ++i) {
    sync(device);
    const auto t0 = std::chrono::steady_clock::now();
    if (a.projections) x_static.copy_(stack.pool_x((a.warmup + i) % Stack::kPool));
    graph.replay();
    sync(device);
    const auto t1 = std::chrono::steady_clock::now();
    r.ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return r;
}
#endif

std::string card_name(const torch::Device& device) {
#ifdef TIDAL_EXAMPLE_WITH_CUDA
  if (device.is_cuda()) return at::cuda::getDeviceProperties(device.index() < 0 ? 0 : device.index())->name;
#endif
  return device.is_cuda() ? "cuda" : "cpu";
}

std::string json_list(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  try {
    torch::Device device(a.device);
    const auto dtype = parse_dtype(a.dtype, device);
#ifndef TIDAL_EXAMPLE_WITH_CUDA
    if (a.cuda_graph) fail("--cuda-graph needs a CUDA build of torch");
#endif
    if (a.cuda_graph && !device.is_cuda()) fail("--cuda-graph needs --device cuda");
    if (a.threads > 0) at::set_num_threads(a.threads);
    torch::manual_seed(a.seed);

    // Both schedules, validated for this model (TidalConfig/DecodeContext throw on bad values).
    tidal::TidalConfig full_cfg(a.top_k, /*select_layers=*/{}, a.mode, a.sink, a.recent, 0);
    tidal::TidalConfig tidal_cfg(a.top_k, a.select_layers, a.mode, a.sink, a.recent, a.correction_stride);
    tidal::DecodeContext full_ctx(full_cfg, a.layers), tidal_ctx(tidal_cfg, a.layers), prefill_ctx(full_cfg, a.layers);

    std::vector<int32_t> lens;
    for (int64_t b = 0; b < a.batch; ++b)
      lens.push_back(static_cast<int32_t>(a.ragged ? a.context - b * a.context / (2 * a.batch) : a.context));
    const auto prompt_lens = torch::tensor(lens, torch::TensorOptions().dtype(at::kInt)).to(device);

    std::printf("tidal_decode: %s (%s), %s, B=%lld N=%lld%s, %lld layers, Hq=%lld Hkv=%lld D=%lld, projections %s\n",
                card_name(device).c_str(), device.str().c_str(), c10::toString(dtype), (long long)a.batch,
                (long long)a.context, a.ragged ? " (ragged)" : "", (long long)a.layers, (long long)a.heads,
                (long long)a.kv_heads, (long long)a.head_dim,
                a.projections ? ("on (hidden " + std::to_string(a.hidden) + ")").c_str() : "off");
    std::printf("  tidal: top_k %lld, select layers %s, mode %s, sink %lld, recent %lld, correction stride %lld\n",
                (long long)a.top_k, json_list(a.select_layers).c_str(), a.mode.c_str(), (long long)a.sink,
                (long long)a.recent, (long long)a.correction_stride);

    auto t0 = std::chrono::steady_clock::now();
    Stack stack(a, device, dtype);
    sync(device);
    auto t1 = std::chrono::steady_clock::now();
    stack.fill_context(prefill_ctx);
    sync(device);
    const double build_s = std::chrono::duration<double>(t1 - t0).count();
    const double fill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    if (a.prefill == "run")
      std::printf("  model built in %.2f s; context: chunked prefill of %lld tokens in %.2f s\n", build_s,
                  (long long)a.context, fill_s);
    else
      std::printf("  model built in %.2f s; context: %lld tokens of random K/V (no prefill compute), %.2f s\n",
                  build_s, (long long)a.context, fill_s);

    RunResult full, tidal;
#ifdef TIDAL_EXAMPLE_WITH_CUDA
    if (a.cuda_graph) {
      full = run_graph(stack, full_ctx, prompt_lens, a, device);
      tidal = run_graph(stack, tidal_ctx, prompt_lens, a, device);
    } else
#endif
    {
      full = run(stack, full_ctx, prompt_lens, a, device);
      tidal = run(stack, tidal_ctx, prompt_lens, a, device);
    }

    const double ms_full = median(full.ms), ms_tidal = median(tidal.ms);
    // How close TidalDecode's first step is to full attention's (same inputs, same caches). With
    // projections the final hidden state includes the residual input, so the stack's own
    // contribution (final - input) is shown too.
    const double cos = min_cosine(full.first, tidal.first);
    const double cos_update = a.projections ? min_cosine(full.first_update, tidal.first_update) : cos;
    const double max_diff = (full.first - tidal.first).abs().max().item<double>();
    std::printf("  %-6s %9.3f ms/token (median of %lld steps, mean %.3f)\n", "full", ms_full, (long long)a.steps,
                mean(full.ms));
    std::printf("  %-6s %9.3f ms/token (median of %lld steps, mean %.3f%s)\n", "tidal", ms_tidal,
                (long long)a.steps, mean(tidal.ms),
                tidal.corrections ? (", " + std::to_string(tidal.corrections) + " corrections").c_str() : "");
    std::printf("  speedup %.2fx%s\n", ms_full / ms_tidal, a.cuda_graph ? "   [CUDA graph replays]" : "");
    if (a.projections)
      std::printf("  first step, cosine(full, tidal), min over the batch: final hidden %.6f, its attention part "
                  "(final - input) %.6f; max |diff| %.3g\n", cos, cos_update, max_diff);
    else
      std::printf("  first step, cosine(full, tidal) of every layer's attention output, min over the batch: %.6f; "
                  "max |diff| %.3g\n", cos, max_diff);

    if (!a.json.empty()) {
      std::ofstream f(a.json);
      if (!f) throw std::runtime_error("cannot write " + a.json);
      f << "{\"card\": \"" << card_name(device) << "\", \"device\": \"" << device.str() << "\", \"dtype\": \""
        << c10::toString(dtype) << "\", \"B\": " << a.batch << ", \"N\": " << a.context
        << ", \"ragged\": " << (a.ragged ? "true" : "false") << ", \"layers\": " << a.layers
        << ", \"Hq\": " << a.heads << ", \"Hkv\": " << a.kv_heads << ", \"D\": " << a.head_dim
        << ", \"projections\": " << (a.projections ? "true" : "false") << ", \"hidden\": " << a.hidden
        << ", \"top_k\": " << a.top_k << ", \"select_layers\": " << json_list(a.select_layers) << ", \"mode\": \""
        << a.mode << "\", \"sink\": " << a.sink << ", \"recent\": " << a.recent
        << ", \"correction_stride\": " << a.correction_stride << ", \"prefill\": \"" << a.prefill
        << "\", \"cuda_graph\": " << (a.cuda_graph ? "true" : "false") << ", \"steps\": " << a.steps
        << ", \"warmup\": " << a.warmup << ", \"ms_full\": " << ms_full << ", \"ms_tidal\": " << ms_tidal
        << ", \"speedup\": " << ms_full / ms_tidal << ", \"ms_full_mean\": " << mean(full.ms)
        << ", \"ms_tidal_mean\": " << mean(tidal.ms) << ", \"corrections\": " << tidal.corrections
        << ", \"first_step_cosine\": " << cos << ", \"first_step_cosine_update\": " << cos_update
        << ", \"first_step_max_diff\": " << max_diff << "}\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "tidal_decode: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tidal_decode: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
