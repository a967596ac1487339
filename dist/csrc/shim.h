// C ABI between cnx-dist (Rust) and torch.distributed's c10d (C++).
//
// Every function that can fail returns NULL on success or a heap-allocated error message that the
// caller releases with cnx_dist_free_error: no C++ exception ever crosses into Rust.
// Tensors are passed as `at::Tensor*` (what tch's `Tensor::as_ptr` hands out), typed `void*` here
// so the header stays plain C.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cnx_pg cnx_pg;

enum { CNX_BACKEND_GLOO = 0, CNX_BACKEND_NCCL = 1 };

// 1 when the shim was compiled with ProcessGroupNCCL, else 0.
int cnx_dist_has_nccl(void);
void cnx_dist_free_error(char* err);

// Creates the TCPStore client (and its server when is_server) at master_addr:port, under
// store_prefix when non-empty (torchrun's agent store: one prefix per restart attempt), and the
// backend over it. device_index: the CUDA device of this rank for NCCL (-1: let c10d choose);
// ignored by Gloo.
char* cnx_pg_new(int backend, const char* master_addr, uint16_t port, int rank, int world,
                 int64_t timeout_ms, int device_index, int is_server, const char* store_prefix,
                 cnx_pg** out);
void cnx_pg_free(cnx_pg* pg);

// One collective per tensor, all in flight together, then waited in order.
char* cnx_pg_broadcast(cnx_pg* pg, void* const* tensors, size_t n, int root);
char* cnx_pg_allreduce_sum(cnx_pg* pg, void* const* tensors, size_t n);
// outputs[world] receive every rank's `input` (same shape and dtype on every rank).
char* cnx_pg_allgather(cnx_pg* pg, void* input, void* const* outputs, size_t world);
char* cnx_pg_barrier(cnx_pg* pg);

// Training-mode batch norm over the whole group (torch.nn.SyncBatchNorm), as an autograd op whose
// backward all-reduces too. weight and bias may be NULL (no affine). running_mean/running_var are
// updated in place. *out receives a new `at::Tensor*` owned by the caller. The autograd node holds
// its own reference to the backend, not to `pg`.
char* cnx_sync_batch_norm(cnx_pg* pg, void* input, void* weight, void* bias, void* running_mean,
                          void* running_var, double momentum, double eps, void** out);

// param.grad = grad (tch exposes no setter for .grad; needed to give an undefined grad a value).
char* cnx_set_grad(void* param, void* grad);

// The CUDA caching allocator's bytes on `device`: out[0..4] = allocated current, allocated peak,
// reserved current, reserved peak; then the peaks are reset when reset_peak (torch.cuda.
// reset_peak_memory_stats). An error when the build had no CUDA headers.
char* cnx_cuda_memory_stats(int device, int reset_peak, int64_t* out);

// One AdamW step over n tensors in place with libtorch's fused kernel (torch.optim.AdamW(fused=
// True): one vectorised pass per tensor instead of ~10 kernels). All on one device and dtype;
// `step` is the step count after this step (bias corrections).
char* cnx_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                      void* const* exp_avg_sqs, size_t n, double step, double lr, double beta1,
                      double beta2, double weight_decay, double eps);

// A 3x3 convolution (stride 1, padding 1, no groups, no bias) of CPU tensors by Winograd's
// F(4x4, 3x3) (winograd.cpp): input [N, C, H, W], weight [K, C, 3, 3], float or double; the
// output [N, K, H, W] carries an autograd graph to both.
char* cnx_winograd_conv3x3(void* input, void* weight, void** out);

#ifdef __cplusplus
}
#endif
