//! Mixed precision on CUDA: tch's autocast (fp16 by default) plus the autocast dtype switch for
//! bf16, which tch does not expose (called from libtorch directly), and a dynamic loss scaler
//! with PyTorch GradScaler's defaults (init 2^16, x2 every 2000 good steps, x0.5 on overflow).

use super::config::Amp;
use anyhow::{bail, Result};

/// Set the CUDA autocast dtype (at::autocast::set_autocast_dtype(kCUDA, dtype)).
pub fn set_cuda_autocast_dtype(amp: Amp) -> Result<()> {
    // c10::ScalarType: Half = 5, BFloat16 = 15; c10::DeviceType::CUDA = 1.
    let dtype: i8 = match amp {
        Amp::Fp16 => 5,
        Amp::Bf16 => 15,
        Amp::None => return Ok(()),
    };
    unsafe {
        let lib = libloading::os::unix::Library::this();
        let f: libloading::os::unix::Symbol<unsafe extern "C" fn(i8, i8)> = match lib
            .get(b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0")
        {
            Ok(f) => f,
            Err(e) => bail!("cannot select the autocast dtype in libtorch: {e}"),
        };
        f(1, dtype);
    }
    Ok(())
}

/// Dynamic loss scaling for fp16 (identity for bf16 / fp32).
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub growth_tracker: u64,
    pub growth_interval: u64,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            growth_tracker: 0,
            growth_interval: 2000,
        }
    }

    /// Update after a step: `finite` = all unscaled gradients were finite. Returns whether the
    /// optimizer step should be taken.
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.enabled {
            return true;
        }
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker >= self.growth_interval {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
            true
        } else {
            self.scale *= 0.5;
            self.growth_tracker = 0;
            false
        }
    }
}
