//! Raw bindings to the C++ shim (`csrc/shim.h`); the safe API is in `pg.rs`, `grads.rs` and
//! `sync_bn.rs`.
//!
//! Every fallible function returns null on success or an owned C string with the error, which
//! [`check`] turns into a [`DistError`] and frees.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};

use crate::error::{DistError, Result};

#[repr(C)]
pub struct CnxPg {
    _private: [u8; 0],
}

pub const BACKEND_GLOO: c_int = 0;
pub const BACKEND_NCCL: c_int = 1;

extern "C" {
    pub fn cnx_dist_has_nccl() -> c_int;
    pub fn cnx_dist_free_error(err: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    pub fn cnx_pg_new(
        backend: c_int,
        master_addr: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device_index: c_int,
        is_server: c_int,
        store_prefix: *const c_char,
        out: *mut *mut CnxPg,
    ) -> *mut c_char;
    pub fn cnx_pg_free(pg: *mut CnxPg);
    pub fn cnx_pg_broadcast(
        pg: *mut CnxPg,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
    ) -> *mut c_char;
    pub fn cnx_pg_allreduce_sum(
        pg: *mut CnxPg,
        tensors: *const *mut c_void,
        n: usize,
    ) -> *mut c_char;
    pub fn cnx_pg_allgather(
        pg: *mut CnxPg,
        input: *mut c_void,
        outputs: *const *mut c_void,
        world: usize,
    ) -> *mut c_char;
    pub fn cnx_pg_barrier(pg: *mut CnxPg) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn cnx_sync_batch_norm(
        pg: *mut CnxPg,
        input: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn cnx_set_grad(param: *mut c_void, grad: *mut c_void) -> *mut c_char;
    pub fn cnx_cuda_memory_stats(device: c_int, reset_peak: c_int, out: *mut i64) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub fn cnx_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
    pub fn cnx_winograd_conv3x3(
        input: *mut c_void,
        weight: *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
}

/// Converts the shim's error convention into a `Result`.
///
/// # Safety
/// `err` must be null or a string returned by the shim that nothing else frees.
pub unsafe fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
    cnx_dist_free_error(err);
    Err(DistError::C10d(msg))
}

/// The `at::Tensor*` behind a tch tensor, as the shim takes it. The shim copies the `at::Tensor`
/// handle (a refcount) before the call returns, so the pointer only needs to live for the call.
pub fn tensor_ptr(t: &tch::Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}
