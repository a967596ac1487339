// Synchronized batch normalization (torch.nn.SyncBatchNorm's training-mode semantics) as a C++
// autograd Function whose forward and backward each run one all-reduce on the group's c10d
// backend, so the statistics and the input gradient are those of BN over the whole global batch.
//
// ATen's dedicated kernels (batch_norm_stats, batch_norm_gather_stats_with_counts,
// batch_norm_backward_reduce, batch_norm_backward_elemt, ...) are CUDA-only in libtorch 2.11, so
// the same quantities are computed with ordinary ATen ops, which run on every device.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <vector>

#include "common.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Dtype of the per-channel mean/invstd and of the elementwise math: double for double inputs,
// float otherwise (half/bfloat16 inputs are normalized in float, as ATen's BN does).
at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Every dimension but the channel one (1).
std::vector<int64_t> reduce_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// [C] -> [1, C, 1, ...] so that it broadcasts against x.
at::Tensor per_channel(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.size(0);
  return v.reshape(shape);
}

// Blocking in-place sum over the group. Must be reached by every rank in the same order.
void all_reduce_sum(const c10::intrusive_ptr<c10d::Backend>& backend, at::Tensor& t) {
  std::vector<at::Tensor> args{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  backend->allreduce(args, opts)->wait();
}

void check_per_channel(const at::Tensor& t, int64_t channels, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape [", channels,
              "], got ", t.sizes());
}

struct SyncBatchNormFn : public torch::autograd::Function<SyncBatchNormFn> {
  // weight and bias are optional so that, when absent, they are not autograd inputs at all
  // (backward must then return an undefined gradient in their slots).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, at::Tensor running_mean,
                            at::Tensor running_var, double momentum, double eps,
                            c10::intrusive_ptr<c10d::Backend> backend) {
    TORCH_CHECK(input.dim() >= 2, "input must be [N, C, ...], got ", input.sizes());
    TORCH_CHECK(input.is_floating_point(), "input must be floating point, got ",
                input.scalar_type());
    const int64_t channels = input.size(1);
    if (weight) check_per_channel(*weight, channels, "weight");
    if (bias) check_per_channel(*bias, channels, "bias");
    check_per_channel(running_mean, channels, "running_mean");
    check_per_channel(running_var, channels, "running_var");
    const int64_t local_count = channels == 0 ? 0 : input.numel() / channels;
    // As torch: with one rank, one value per channel has no variance (the unbiased running
    // variance would be inf). With several ranks only the global count could tell, and reading
    // it on the host would cost a device sync per layer, so like torch we do not check it.
    TORCH_CHECK(local_count != 1 || backend->getSize() > 1,
                "Expected more than 1 value per channel when training, got input size ",
                input.sizes());

    const auto ct = compute_type(input);
    const auto dims = reduce_dims(input);
    const auto dopts = input.options().dtype(at::kDouble);

    // Local per-channel sum and sum of squares, packed with the count into one double tensor
    // [sum (C) | sum of squares (C) | count (1)] for a single all-reduce. The sum of squares is
    // formed as n·(var + mean²) from a local Welford var_mean rather than as Σx² in the input
    // dtype: Σx² - N·mean² cancels catastrophically when |mean| >> std, var_mean does not, and
    // the remaining subtraction happens in double.
    at::Tensor local_sum, local_sq;
    if (local_count > 0) {
      // var_mean returns the input dtype: for half/bfloat16 that would round the mean to 3
      // significant digits, so those go through a float copy.
      auto [var_l, mean_l] = at::var_mean(input.to(ct), dims, /*correction=*/0, /*keepdim=*/false);
      mean_l = mean_l.to(at::kDouble);
      var_l = var_l.to(at::kDouble);
      local_sum = mean_l * static_cast<double>(local_count);
      local_sq = (var_l + mean_l * mean_l) * static_cast<double>(local_count);
    } else {
      // An empty local batch still joins the all-reduce, contributing nothing.
      local_sum = at::zeros({channels}, dopts);
      local_sq = at::zeros({channels}, dopts);
    }
    at::Tensor packed =
        at::cat({local_sum, local_sq, at::full({1}, static_cast<double>(local_count), dopts)});
    all_reduce_sum(backend, packed);

    const at::Tensor count = packed.narrow(0, 2 * channels, 1);
    // clamp: an all-empty global batch gives zeros rather than NaNs (and updates nothing below).
    const at::Tensor safe_count = count.clamp_min(1.0);
    const at::Tensor mean = packed.narrow(0, 0, channels) / safe_count;
    const at::Tensor var =
        (packed.narrow(0, channels, channels) / safe_count - mean * mean).clamp_min(0.0);
    const at::Tensor invstd = (var + eps).rsqrt();

    // Running statistics, in place, as torch: the unbiased variance over the global count.
    // Left untouched when the global batch is empty.
    {
      const at::Tensor any = count > 0.0;
      const at::Tensor unbiased = var * (count / (count - 1.0));
      auto update = [&](at::Tensor& running, const at::Tensor& stat) {
        const at::Tensor r = running.to(at::kDouble);
        const at::Tensor next = r * (1.0 - momentum) + stat * momentum;
        running.copy_(at::where(any, next, r));
      };
      update(running_mean, mean);
      update(running_var, unbiased);
    }

    // y = x·scale + shift with scale = w·invstd, shift = b - mean·scale (per channel).
    const at::Tensor mean_c = mean.to(ct);
    const at::Tensor invstd_c = invstd.to(ct);
    at::Tensor scale = weight ? invstd_c * weight->to(ct) : invstd_c;
    at::Tensor shift = -mean_c * scale;
    if (bias) shift = shift + bias->to(ct);
    at::Tensor out =
        at::addcmul(per_channel(shift, input), input.to(ct), per_channel(scale, input))
            .to(input.scalar_type());

    ctx->save_for_backward({input, weight.value_or(at::Tensor()), mean_c, invstd_c, count});
    // The node keeps its own reference to the backend: the Rust-side ProcessGroup may be dropped
    // before backward without leaving a dangling pointer here (see sync_bn.rs for what a
    // backward after the drop then does).
    // (An IValue can only hold a non-registered C++ class as a capsule.)
    ctx->saved_data["backend"] = c10::IValue::make_capsule(backend);
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    if (bias) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
    return out;
  }

  // As torch's SyncBatchNorm: local Σdy and Σdy·(x - mean) → one all-reduce → the gradient of
  // the global BN for this rank's slice of the input. grad_weight/grad_bias stay local (DDP
  // averages them like every other parameter gradient).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& mean = saved[2];
    const at::Tensor& invstd = saved[3];
    const at::Tensor& count = saved[4];
    auto backend =
        c10::static_intrusive_pointer_cast<c10d::Backend>(ctx->saved_data["backend"].toCapsule());
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Materialized by the autograd Function (zeros) when the output's gradient is undefined.
    const at::Tensor& dy_in = grad_outputs[0];

    const auto ct = compute_type(input);
    const auto dims = reduce_dims(input);
    const int64_t channels = mean.size(0);
    const at::Tensor dy = dy_in.to(ct);
    const at::Tensor xmu = input.to(ct) - per_channel(mean, input);
    const at::Tensor local_sum_dy = at::sum(dy, dims, false, at::kDouble);
    const at::Tensor local_sum_dy_xmu = at::sum(dy * xmu, dims, false, at::kDouble);

    // Always, whatever needs_input_grad says: every rank must issue the same collectives, and
    // which gradients are needed could differ between ranks.
    at::Tensor packed = at::cat({local_sum_dy, local_sum_dy_xmu});
    all_reduce_sum(backend, packed);

    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor n = count.clamp_min(1.0);
      const at::Tensor mean_dy = (packed.narrow(0, 0, channels) / n).to(ct);
      const at::Tensor mean_dy_xmu = (packed.narrow(0, channels, channels) / n).to(ct);
      const at::Tensor k = invstd * invstd * mean_dy_xmu;
      const at::Tensor a = has_weight ? invstd * weight.to(ct) : invstd;
      grad_input = ((dy - per_channel(mean_dy, input) - xmu * per_channel(k, input)) *
                    per_channel(a, input))
                       .to(input.scalar_type());
    }
    if (has_weight && ctx->needs_input_grad(1)) {
      grad_weight = (local_sum_dy_xmu * invstd.to(at::kDouble)).to(weight.scalar_type());
    }
    const size_t bias_slot = has_weight ? 2 : 1;  // absent inputs have no edge
    if (has_bias && ctx->needs_input_grad(bias_slot)) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      grad_bias = local_sum_dy.to(dtype);
    }
    // One slot per forward argument: input, weight, bias, running_mean, running_var, momentum,
    // eps, backend.
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

char* cnx_sync_batch_norm(cnx_pg* pg, void* input, void* weight, void* bias, void* running_mean,
                          void* running_var, double momentum, double eps, void** out) {
  *out = nullptr;
  return cnx::guarded("sync_batch_norm", [&] {
    std::optional<at::Tensor> w, b;
    if (weight != nullptr) w = cnx::as_tensor(weight);
    if (bias != nullptr) b = cnx::as_tensor(bias);
    at::Tensor y = SyncBatchNormFn::apply(cnx::as_tensor(input), w, b,
                                          cnx::as_tensor(running_mean),
                                          cnx::as_tensor(running_var), momentum, eps, pg->backend);
    // Ownership passes to Rust (tch's Tensor::from_ptr, freed by tch's at_free).
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
