//! libtorch operators the training engine needs and tch 0.24 does not bind, reached through the
//! same C++ shim as c10d: the fused AdamW step and the CUDA allocator's memory statistics.

use crate::error::Result;
use crate::ffi;
use std::os::raw::c_void;
use tch::Tensor;

/// AdamW's hyper-parameters for one parameter group at one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// The step count after this step (bias corrections).
    pub step: u64,
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW step, in place, over parameters with their gradients and moments, by libtorch's
/// fused kernel (`torch._fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs on CPU and
/// CUDA): decoupled weight decay, then the moments and the bias-corrected update. The four
/// slices are parallel; all tensors on one device, one dtype.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    h: AdamWStep,
) -> Result<()> {
    let n = params.len();
    assert!(
        grads.len() == n && exp_avgs.len() == n && exp_avg_sqs.len() == n,
        "fused_adamw: parameters, gradients and moments must pair up"
    );
    let ptrs = |ts: &[Tensor]| -> Vec<*mut c_void> { ts.iter().map(ffi::tensor_ptr).collect() };
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    // SAFETY: the pointers are `at::Tensor*` of tensors borrowed for the call; the shim copies
    // the handles before returning.
    unsafe {
        ffi::check(ffi::cnx_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            h.step as f64,
            h.lr,
            h.betas.0,
            h.betas.1,
            h.weight_decay,
            h.eps,
        ))
    }
}

/// The CUDA caching allocator's statistics of one device, in bytes (what
/// `torch.cuda.memory_allocated` / `max_memory_allocated` / `memory_reserved` /
/// `max_memory_reserved` report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: i64,
    pub max_allocated: i64,
    pub reserved: i64,
    pub max_reserved: i64,
}

/// Read device `device`'s allocator statistics; `reset_peak` then starts the peaks afresh
/// (`torch.cuda.reset_peak_memory_stats`). An error when this build has no CUDA headers.
pub fn cuda_memory(device: usize, reset_peak: bool) -> Result<CudaMemory> {
    let mut out = [0i64; 4];
    // SAFETY: `out` has the four slots the shim writes.
    unsafe {
        ffi::check(ffi::cnx_cuda_memory_stats(
            device as i32,
            reset_peak as i32,
            out.as_mut_ptr(),
        ))?;
    }
    Ok(CudaMemory {
        allocated: out[0],
        max_allocated: out[1],
        reserved: out[2],
        max_reserved: out[3],
    })
}
