#include "attention_launch.cuh"

namespace tidal::kernels::cuda {
const char* launch_attention_bf16(const AttnParams& p, int64_t D, void* out, float* lse, cudaStream_t stream) {
  return launch_attention_for<__nv_bfloat16>(p, D, out, lse, stream);
}
const char* launch_merge_behind_topk_bf16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  return launch_merge_behind_topk_for<__nv_bfloat16>(p, D, out, stream);
}
int ctas_per_sm_bf16(int64_t D, bool sm90, bool digits) { return ctas_per_sm<__nv_bfloat16>(D, sm90, digits); }
const char* launch_gather_bf16(const AttnParams& p, int64_t D, void* out, cudaStream_t stream) {
  return launch_gather_for<__nv_bfloat16>(p, D, out, stream);
}
int gather_ctas_per_sm_bf16(int64_t D, int R) { return gather_ctas_per_sm<__nv_bfloat16>(D, R); }
}  // namespace tidal::kernels::cuda
