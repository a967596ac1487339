//! Autocast (mixed precision) switches through libtorch's current, per-device-type entry points.
//!
//! tch 0.24's `tch::autocast` goes through `at::autocast::is_enabled()` / `set_enabled(bool)`,
//! which libtorch 2.4+ keeps only as inline wrappers that `TORCH_WARN_DEPRECATION` on every call
//! (compiled into torch-sys's C++ shim, so every autocast region of every iteration would print
//! the warning on a CUDA build). The functions here call the non-deprecated
//! `at::autocast::{is,set}_autocast_enabled(DeviceType, ...)` directly instead, and also let a
//! region opt out of autocast (the fp32 islands PyTorch and mmcv keep: RoIAlign, box coding).
//!
//! The symbols are exported by `libtorch_cpu` (TORCH_API); they take `c10::DeviceType` (an
//! `int8_t` enum) and `bool`, which pass as C `i8` / `bool` in the x86-64 and AArch64 ABIs.

use tch::Tensor;

/// `c10::DeviceType` values of the device types autocast knows here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i8)]
pub enum DeviceType {
    Cpu = 0,
    Cuda = 1,
}

mod ffi {
    extern "C" {
        #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
        pub fn is_autocast_enabled(device_type: i8) -> bool;
        #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
        pub fn set_autocast_enabled(device_type: i8, enabled: bool);
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        pub fn set_autocast_dtype(device_type: i8, dtype: i8);
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        pub fn get_autocast_dtype(device_type: i8) -> i8;
        #[link_name = "_ZN2at8autocast17increment_nestingEv"]
        pub fn increment_nesting() -> i32;
        #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
        pub fn decrement_nesting() -> i32;
        #[link_name = "_ZN2at8autocast11clear_cacheEv"]
        pub fn clear_cache();
    }
}

/// Whether autocast is on for `device` in this thread.
pub fn is_enabled(device: DeviceType) -> bool {
    // SAFETY: plain thread-local flag read in libtorch.
    unsafe { ffi::is_autocast_enabled(device as i8) }
}

/// Turn autocast on or off for `device` in this thread; returns the previous state.
pub fn set_enabled(device: DeviceType, enabled: bool) -> bool {
    let prev = is_enabled(device);
    // SAFETY: plain thread-local flag write in libtorch.
    unsafe { ffi::set_autocast_enabled(device as i8, enabled) };
    prev
}

/// Select the reduced precision autocast uses on `device` in this thread: `Half` or `BFloat16`
/// (CUDA's default is fp16, the CPU's bf16). Other kinds are ignored.
pub fn set_dtype(device: DeviceType, kind: tch::Kind) {
    // c10::ScalarType numbering.
    let code: i8 = match kind {
        tch::Kind::Half => 5,
        tch::Kind::BFloat16 => 15,
        _ => return,
    };
    // SAFETY: thread-local dtype slot in libtorch.
    unsafe { ffi::set_autocast_dtype(device as i8, code) }
}

/// The reduced precision autocast uses on `device` in this thread.
pub fn dtype(device: DeviceType) -> Option<tch::Kind> {
    // SAFETY: thread-local dtype slot in libtorch.
    match unsafe { ffi::get_autocast_dtype(device as i8) } {
        5 => Some(tch::Kind::Half),
        15 => Some(tch::Kind::BFloat16),
        6 => Some(tch::Kind::Float),
        _ => None,
    }
}

/// Run `f` with autocast on `device` set to `enabled` (nesting-aware like `torch.autocast`: the
/// cast cache is cleared when the outermost autocast region ends), then restore the previous
/// state. Unlike `tch::autocast` this prints no deprecation warning and works for CPU too.
pub fn with_autocast<T>(device: DeviceType, enabled: bool, f: impl FnOnce() -> T) -> T {
    let prev = set_enabled(device, enabled);
    // SAFETY: counter updates and cache clear in libtorch's autocast state (thread-local).
    unsafe { ffi::increment_nesting() };
    struct Restore(DeviceType, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above; runs on unwind too so a panic cannot leave autocast on.
            unsafe {
                if ffi::decrement_nesting() == 0 {
                    ffi::clear_cache();
                }
                ffi::set_autocast_enabled(self.0 as i8, self.1);
            }
        }
    }
    let _restore = Restore(device, prev);
    f()
}

/// Run `f` with autocast off for both CPU and CUDA (an fp32 island inside an autocast region,
/// like torchvision's `roi_align` autocast wrapper or mmcv's `force_fp32`). Cheap when autocast
/// is already off: nothing is changed then.
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> T {
    let cuda = is_enabled(DeviceType::Cuda);
    let cpu = is_enabled(DeviceType::Cpu);
    if !cuda && !cpu {
        return f();
    }
    struct Restore(bool, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_enabled(DeviceType::Cuda, self.0);
            set_enabled(DeviceType::Cpu, self.1);
        }
    }
    set_enabled(DeviceType::Cuda, false);
    set_enabled(DeviceType::Cpu, false);
    let _restore = Restore(cuda, cpu);
    f()
}

/// `t` in fp32 when it is a reduced-precision float (fp16 / bf16); otherwise unchanged (fp32 and
/// fp64 inputs keep their precision).
pub fn upcast(t: &Tensor) -> Tensor {
    match t.kind() {
        tch::Kind::Half | tch::Kind::BFloat16 => t.to_kind(tch::Kind::Float),
        _ => t.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn cpu_autocast_switches_and_restores() {
        assert!(!is_enabled(DeviceType::Cpu));
        let inner = with_autocast(DeviceType::Cpu, true, || {
            let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
            let m = a.matmul(&a);
            let off = without_autocast(|| (is_enabled(DeviceType::Cpu), a.matmul(&a).kind()));
            (is_enabled(DeviceType::Cpu), m.kind(), off)
        });
        // CPU autocast runs matmul in bf16; inside without_autocast it is fp32 again.
        assert_eq!(inner, (true, Kind::BFloat16, (false, Kind::Float)));
        // The dtype switch is read back as set, and fp16 then applies to CPU matmul.
        let before = dtype(DeviceType::Cpu);
        set_dtype(DeviceType::Cpu, Kind::Half);
        assert_eq!(dtype(DeviceType::Cpu), Some(Kind::Half));
        let k = with_autocast(DeviceType::Cpu, true, || {
            let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
            a.matmul(&a).kind()
        });
        assert_eq!(k, Kind::Half);
        set_dtype(DeviceType::Cpu, before.unwrap_or(Kind::BFloat16));
        assert_eq!(dtype(DeviceType::Cuda), Some(Kind::Half));
        assert!(!is_enabled(DeviceType::Cpu));
        assert_eq!(
            upcast(&Tensor::ones([2], (Kind::Half, Device::Cpu))).kind(),
            Kind::Float
        );
        assert_eq!(
            upcast(&Tensor::ones([2], (Kind::Double, Device::Cpu))).kind(),
            Kind::Double
        );
    }
}
