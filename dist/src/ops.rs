//! libtorch operators the training engine needs and tch 0.24 does not bind, reached through the
//! same C++ shim as c10d: the fused AdamW step, the CUDA allocator's memory statistics and a
//! Winograd 3x3 convolution for the CPU.

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

/// A 3x3 convolution with stride 1, padding 1, no groups and no bias — `conv2d(input, weight,
/// padding=1)` — computed on the CPU by Winograd's minimal filtering F(4x4, 3x3) (what cuDNN
/// picks for such layers on GPUs): 2.25 instead of 9 multiply-adds per output and channel pair,
/// forward and both gradients each one batched GEMM (`csrc/winograd.cpp`). `input` [N, C, H, W]
/// and `weight` [K, C, 3, 3], both float or both double, on the CPU, CPU autocast off (under
/// autocast the precision is autocast's: an error); the result is differentiable with respect to
/// both. Float results differ from the direct convolution's by ~1e-5 relative.
pub fn winograd_conv3x3(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: both pointers are `at::Tensor*` borrowed for the call; on success the shim hands
    // over a new `at::Tensor*`, which tch then owns and frees.
    unsafe {
        ffi::check(ffi::cnx_winograd_conv3x3(
            ffi::tensor_ptr(input),
            ffi::tensor_ptr(weight),
            &mut out,
        ))?;
        Ok(Tensor::from_ptr(out as *mut torch_sys::C_tensor))
    }
}

/// Whether [`winograd_conv3x3`] beats libtorch's direct convolution for this layer: float CPU
/// tensors, at least 256 input and output channels, and at least 4096 output pixels in the batch
/// (FPN and RPN at strides 4-8, UperNet's 1/4-scale layers, the RoI heads' 7x7 and 14x14
/// convolutions over hundreds of RoIs). Forward + backward on 2 AVX-512 cores with cnx's
/// allocator policy, direct vs Winograd, seconds: 2048→512 at 2x128x128 9.0 vs 4.1, 256→256 at
/// 2x200x272 1.9 vs 1.0, 512→512 at 2x64x64 0.56 vs 0.37, 256→256 at 1024x7x7 (Cascade's box
/// head) 0.78 vs 0.51, at 64x14x14 0.21 vs 0.14, at 2x50x68 0.12 vs 0.10. Below the bounds the
/// transforms cost more than they save (256→256 at 2x25x34 0.031 vs 0.048; UperNet's PSP
/// bottleneck 2816→512 at 2x16x16 0.21 vs 0.46, whose weight transform alone outweighs it).
pub fn winograd_pays(input: &Tensor, weight: &Tensor) -> bool {
    let (s, w) = (input.size(), weight.size());
    input.device() == tch::Device::Cpu
        && input.kind() == tch::Kind::Float
        && weight.kind() == tch::Kind::Float
        && s.len() == 4
        && w.len() == 4
        && s[1] >= 256
        && w[0] >= 256
        && s[0] * s[2] * s[3] >= 4096
}

/// [`winograd_conv3x3`] where [`winograd_pays`], `None` elsewhere (the layer then runs
/// libtorch's convolution): the shape of `cnx_backbone::nn::Conv3x3Kernel`.
pub fn winograd_where_it_pays(input: &Tensor, weight: &Tensor) -> Option<Tensor> {
    if !winograd_pays(input, weight) {
        return None;
    }
    // The shapes and dtypes were checked; what remains is CPU autocast (bf16), whose precision
    // policy libtorch's convolution then applies.
    winograd_conv3x3(input, weight).ok()
}
