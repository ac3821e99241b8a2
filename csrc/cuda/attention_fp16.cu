#include "attention_launch.cuh"

namespace tidal::kernels::cuda {
const char* launch_attention_fp16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream) {
  return launch_attention_for<__half>(p, D, out, lse, stream);
}
const char* launch_merge_behind_topk_fp16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  return launch_merge_behind_topk_for<__half>(p, D, out, stream);
}
int ctas_per_sm_fp16(int64_t D, bool sm90, bool digits) { return ctas_per_sm<__half>(D, sm90, digits); }
const char* launch_gather_fp16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  return launch_gather_for<__half>(p, D, out, stream);
}
int gather_ctas_per_sm_fp16(int64_t D, int R) { return gather_ctas_per_sm<__half>(D, R); }
}  // namespace tidal::kernels::cuda
