//! Host↔device traffic of the detection heads: a counter of host reads (a tensor's values or a
//! data-dependent size brought to the host: `nonzero`, `Vec::try_from`, `double_value`, ...) and
//! of uploads (small host-built tensors copied to the device), plus a per-device cache of small
//! constant tensors so that configuration constants are uploaded once instead of per call.
//!
//! On a GPU each host read waits for the stream to drain and each pageable upload synchronises
//! it, so the number per iteration is what decides whether the heads keep the GPU busy. The
//! counts are by call site, not by device: a CPU run counts what a GPU run would wait for, so
//! the budget is testable (and regressions fail) without a GPU.
//!
//! API: [`host_read`] / [`upload`] at each site (one relaxed atomic add each, always on);
//! [`snapshot`] for the totals since the last [`reset`]; [`SyncCounts::since`] for a delta.
//! The counters are process-wide: concurrent runs in one process add up.
//!
//! What the heads still read, and why (`heads/tests/sync_budget.rs` bounds the totals): each
//! is a data-dependent size or plan the host needs to shape the next tensors.
//! - Sampling (RPN and every RoI stage): one read of the positive / negative candidate counts
//!   per image (the random choice draws `k` of `n`).
//! - Proposals: one read for the boxes that survive the min-size filter, one for the NMS
//!   suppression bits (plus one non-blocking upload of the kept positions) per image.
//! - RoI extractor: two per call for all levels (largest adaptive sample count; levels and
//!   window extents, which plan the RoIAlign chunks).
//! - Test post-processing: one for the score threshold, one for NMS (+ upload) per image.
//! - Mask targets (`detector::mask_targets`): the positives' boxes and GT indices go to the
//!   host, where the GT masks are cropped, and the targets come back (2 reads, 1 upload).
//! - Cascade: one per image and stage for dropping the GT boxes from the refined proposals.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Device, Kind, Tensor};

static HOST_READS: AtomicU64 = AtomicU64::new(0);
static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// Totals of the two counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// Tensor values or data-dependent sizes read on the host (each one a stream sync on GPU).
    pub host_reads: u64,
    /// Host-built tensors copied to the device (each one a blocking copy on GPU).
    pub uploads: u64,
}

impl SyncCounts {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &SyncCounts) -> SyncCounts {
        SyncCounts {
            host_reads: self.host_reads - earlier.host_reads,
            uploads: self.uploads - earlier.uploads,
        }
    }
    /// Host reads plus uploads.
    pub fn total(&self) -> u64 {
        self.host_reads + self.uploads
    }
}

/// Records one host read; `what` names the site (kept for readability of call sites and for a
/// future per-site breakdown; not stored).
#[inline]
pub fn host_read(what: &'static str) {
    let _ = what;
    HOST_READS.fetch_add(1, Ordering::Relaxed);
}

/// Records one upload of a host-built tensor to the device.
#[inline]
pub fn upload(what: &'static str) {
    let _ = what;
    UPLOADS.fetch_add(1, Ordering::Relaxed);
}

/// Current totals (since process start or the last [`reset`]).
pub fn snapshot() -> SyncCounts {
    SyncCounts {
        host_reads: HOST_READS.load(Ordering::Relaxed),
        uploads: UPLOADS.load(Ordering::Relaxed),
    }
}

/// Sets both counters to zero.
pub fn reset() {
    HOST_READS.store(0, Ordering::Relaxed);
    UPLOADS.store(0, Ordering::Relaxed);
}

/// Copies host indices to `device` without blocking the stream: a non-blocking copy (from
/// pageable memory CUDA stages the data at once and synchronises nothing; a blocking copy
/// would wait for the whole stream). Counted as an upload.
pub fn upload_i64(values: &[i64], device: Device, what: &'static str) -> Tensor {
    upload(what);
    let t = Tensor::from_slice(values);
    if device == Device::Cpu {
        return t;
    }
    t.to_device_(device, Kind::Int64, true, false)
}

thread_local! {
    static FORCE_DEVICE_PATHS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the heads take their device-resident variants (suppression-matrix NMS, batched
/// mask pasting) for tensors on `device`: always on accelerators; on CPU only inside
/// [`with_device_paths`] or with `CNX_HEADS_DEVICE_PATHS=1` in the environment (the host
/// variants are faster there and the results are the same; the switch lets any CPU test run
/// the GPU code path).
pub fn device_paths(device: Device) -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device != Device::Cpu
        || FORCE_DEVICE_PATHS.with(|f| f.get())
        || *FROM_ENV.get_or_init(|| std::env::var("CNX_HEADS_DEVICE_PATHS").is_ok_and(|v| v == "1"))
}

/// Runs `f` with the device-resident variants forced on CPU too (tests, counting what a GPU
/// run would do).
pub fn with_device_paths<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_DEVICE_PATHS.with(|c| c.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCE_DEVICE_PATHS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(prev);
    f()
}

type ConstKey = (&'static str, Device, Kind, Vec<u64>);

thread_local! {
    // Few entries: one per (device, kind, constant) — box coder means/stds, base anchors,
    // per-level tables of the RoI extractor.
    static CONSTS: RefCell<HashMap<ConstKey, Tensor>> = RefCell::new(HashMap::new());
}

/// The tensor `build()` returns moved to `device`, built and uploaded the first time this
/// thread asks for (`tag`, `key`, `kind`) there and reused afterwards. For configuration
/// constants only (the cache is never emptied). Built outside autograd, so it can be used
/// anywhere.
pub fn cached(
    tag: &'static str,
    key: &[f64],
    kind: Kind,
    device: Device,
    build: impl FnOnce() -> Tensor,
) -> Tensor {
    let key: ConstKey = (tag, device, kind, key.iter().map(|v| v.to_bits()).collect());
    CONSTS.with(|c| {
        if let Some(t) = c.borrow().get(&key) {
            return t.shallow_clone();
        }
        let t = tch::no_grad(|| build().to_kind(kind).to_device(device));
        upload(tag);
        c.borrow_mut().insert(key, t.shallow_clone());
        t
    })
}

/// A constant 1-D tensor of `values` (rounded to f32, then converted to `kind`) on `device`,
/// uploaded once per thread and device (see [`cached`]); per-image values go through
/// [`filled`].
pub fn constant(values: &[f64], kind: Kind, device: Device) -> Tensor {
    cached("constant", values, kind, device, || {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Tensor::from_slice(&v)
    })
}

/// A small 1-D tensor of `values` (rounded to f32, then converted to `kind`) written on
/// `device` by fill kernels instead of a host copy: no synchronisation, for per-image values
/// (scale factors) that a cache would accumulate without bound.
pub fn filled(values: &[f64], kind: Kind, device: Device) -> Tensor {
    if device == Device::Cpu {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        return Tensor::from_slice(&v).to_kind(kind);
    }
    let t = Tensor::empty([values.len() as i64], (kind, device));
    for (i, &v) in values.iter().enumerate() {
        // fill_ converts the scalar to `kind`; going through f32 first keeps the values of the
        // CPU branch (f32 slice, then `to_kind`).
        let _ = t.narrow(0, i as i64, 1).fill_(v as f32 as f64);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_cached_and_match_host_values() {
        let a = constant(&[0.1, 0.2], Kind::Float, Device::Cpu);
        let before = snapshot();
        let b = constant(&[0.1, 0.2], Kind::Float, Device::Cpu);
        assert_eq!(snapshot().since(&before).uploads, 0);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![0.1f32, 0.2]);
        assert_eq!(a.data_ptr(), b.data_ptr());
        let f = filled(&[0.1, 3.0], Kind::Double, Device::Cpu);
        assert_eq!(Vec::<f64>::try_from(&f).unwrap(), vec![0.1f32 as f64, 3.0]);
    }
}
