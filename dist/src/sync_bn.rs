//! Synchronized batch normalization: `torch.nn.SyncBatchNorm` in training mode, as an autograd
//! op whose statistics and input gradient are those of batch norm over the global batch (all
//! ranks' inputs together), for the SyncBN heads of the Cascade Mask R-CNN and UperNet configs.
//!
//! The op is a C++ `torch::autograd::Function` in the shim (`csrc/sync_bn.cpp`): forward
//! all-reduces one packed tensor of per-channel sums, sums of squares and counts; backward
//! all-reduces Σdy and Σdy·(x - mean), as torch's `SyncBatchNorm` does.

use std::os::raw::c_void;

use tch::Tensor;

use crate::error::{DistError, Result};
use crate::ffi;
use crate::pg::ProcessGroup;

/// Batch norm in training mode over the union of every rank's `input` (`[N, C, ...]`; `N` may
/// differ between ranks and may be 0: an empty rank still joins the collectives).
///
/// - **Output**: this rank's slice of `(x - mean) / sqrt(var + eps) * weight + bias`, with the
///   per-channel `mean` and biased `var` of the global batch. `weight`/`bias` (`[C]`) are
///   optional, as in `Tensor::batch_norm`.
/// - **Running statistics** (`[C]`, any float dtype) are updated in place on every rank alike,
///   as torch does: `running_mean = (1 - momentum)·running_mean + momentum·mean`, and
///   `running_var` likewise with the *unbiased* global variance (global count `N·H·W·…`).
///   An all-empty global batch leaves them untouched.
/// - **Backward** (`weight`/`bias`/`input` requiring grad): `input`'s gradient is that of the
///   global batch norm for this rank's slice; `weight`'s and `bias`'s are this rank's *local*
///   contributions, to be averaged across ranks like any other parameter gradient (e.g. by
///   [`crate::GradBuckets`]; their sum over ranks is the global batch norm's gradient).
///
/// Statistics are reduced in double precision whatever the input dtype; half and bfloat16
/// inputs are normalized in float.
///
/// # Collectives
/// One all-reduce in this call and one when backward reaches this op. Both must be issued by
/// every rank in the same order: every rank calls `sync_batch_norm` for the same layers in the
/// same order, and every rank runs backward through every output it got (an output that does
/// not reach the loss on one rank leaves the others waiting until the group's timeout).
/// With a single-rank group this is plain batch norm (plus a trivial all-reduce).
///
/// # Lifetime of the group
/// The autograd node holds its own reference to the c10d backend, so dropping `pg` before
/// backward is memory-safe; but the group must outlive the backward for it to be *correct*:
/// NCCL's backend is shut down when `pg` is dropped (backward then fails), and with Gloo other
/// ranks may already have left.
///
/// # Errors
/// Shape/dtype mistakes and c10d failures in the forward pass are [`DistError::C10d`]. A failure
/// of the backward's all-reduce (a dead or silent peer) surfaces from tch's backward as a
/// `TchError::Torch` whose message contains c10d's (`f_backward`, `f_run_backward`); tch's
/// panicking `backward()` panics with it. Either way the group is unusable afterwards.
///
/// Double backward is not supported (the backward is not itself differentiable), as in torch.
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm(
    pg: &ProcessGroup,
    input: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f64,
    eps: f64,
) -> Result<Tensor> {
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), ffi::tensor_ptr);
    let mut out: *mut c_void = std::ptr::null_mut();
    unsafe {
        ffi::check(ffi::cnx_sync_batch_norm(
            pg.raw(),
            ffi::tensor_ptr(input),
            opt(weight),
            opt(bias),
            ffi::tensor_ptr(running_mean),
            ffi::tensor_ptr(running_var),
            momentum,
            eps,
            &mut out,
        ))?;
    }
    if out.is_null() {
        return Err(DistError::C10d("sync_batch_norm returned no tensor".into()));
    }
    // The shim hands over a heap `at::Tensor*`, which is what tch's tensors own and free.
    Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}
