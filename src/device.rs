//! The one device parser of every command (`--device`, `runtime.device`): `cpu`, `cuda`,
//! `cuda:N` or `auto`. An explicit CUDA device that libtorch cannot see is an error, never a
//! silent fall back to the CPU; `auto` takes cuda:0 when there is one and says (on stderr) what
//! it chose, so a GPU machine whose binary cannot load libtorch_cuda shows it at once.

use anyhow::{bail, Result};
use tch::Device;

/// The accepted spellings, for messages and `--help`.
pub const CHOICES: &str = "auto, cpu, cuda, cuda:N";

/// What the user asked for, before looking at the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    Auto,
    Cpu,
    Cuda(usize),
}

/// Parse a device string (surrounding whitespace ignored, otherwise exact).
pub fn parse_spec(s: &str) -> Result<Spec> {
    Ok(match s.trim() {
        "auto" => Spec::Auto,
        "cpu" => Spec::Cpu,
        "cuda" => Spec::Cuda(0),
        t => match t.strip_prefix("cuda:").map(|i| i.parse::<usize>()) {
            Some(Ok(i)) => Spec::Cuda(i),
            _ => bail!("unknown device {s:?} (expected one of: {CHOICES})"),
        },
    })
}

/// The device `spec` names on a machine where libtorch sees `cuda_devices` CUDA devices.
pub fn select(spec: Spec, cuda_devices: i64) -> Result<Device> {
    Ok(match spec {
        Spec::Cpu => Device::Cpu,
        Spec::Auto if cuda_devices > 0 => Device::Cuda(0),
        Spec::Auto => Device::Cpu,
        Spec::Cuda(i) if cuda_devices <= 0 => bail!(
            "device {} requested but libtorch sees no CUDA device (a CPU-only libtorch, no \
             driver, or libtorch_cuda not loaded: check `cnx doctor` and LD_LIBRARY_PATH); \
             use --device cpu or auto",
            label(Device::Cuda(i))
        ),
        Spec::Cuda(i) if i as i64 >= cuda_devices => bail!(
            "device cuda:{i} requested but libtorch sees {cuda_devices} CUDA device(s) \
             (cuda:0..cuda:{})",
            cuda_devices - 1
        ),
        Spec::Cuda(i) => Device::Cuda(i),
    })
}

/// CUDA devices libtorch sees (0 without a usable CUDA runtime).
pub fn cuda_device_count() -> i64 {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    }
}

/// Parse and select on this machine; `auto` reports its choice on stderr.
pub fn resolve(s: &str) -> Result<Device> {
    let spec = parse_spec(s)?;
    let n = cuda_device_count();
    let d = select(spec, n)?;
    if spec == Spec::Auto {
        eprintln!("device: auto -> {}", describe(d));
    }
    Ok(d)
}

/// `cpu` / `cuda:N` (the spelling `resolve` accepts back).
pub fn label(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `cuda:0 (NVIDIA H200)` / `cpu (no CUDA device)` / `cpu`.
pub fn describe(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i} ({})", crate::cmd::doctor::device_name(i as i32)),
        Device::Cpu if cuda_device_count() == 0 => "cpu (no CUDA device)".into(),
        d => label(d),
    }
}

/// Wait for the work queued on `d` (timing); nothing to do on the CPU.
pub fn synchronize(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// cuDNN autotuning (`torch.backends.cudnn.benchmark`) as the official recipes set it: on for
/// segmentation, whose training crops and test windows have fixed sizes (mmseg's configs say
/// `cudnn_benchmark = True`), off for detection, whose image sizes vary batch by batch (mmdet's
/// leave it off: every new shape would be tuned again). No-op off CUDA.
pub fn cudnn_benchmark_for(d: Device, arch: crate::engine::config::Arch) {
    if d.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(arch == crate::engine::config::Arch::Upernet);
    }
}

/// 3x3 convolutions on the CPU by Winograd's F(4x4, 3x3) where it pays
/// (`cnx_dist::ops::winograd_pays`: >= 256 channels in and out, >= 4096 output pixels per batch:
/// FPN, RPN, UperNet's 1/4-scale layers, the RoI heads' convolutions),
/// libtorch's direct convolution elsewhere — the choice cuDNN makes for such layers on GPUs.
/// Results differ from the direct convolution's by ~1e-5 relative. `CNX_WINOGRAD=0` keeps
/// libtorch's convolution everywhere. No-op off the CPU.
pub fn winograd_for(d: Device) {
    let on = d == Device::Cpu && winograd_enabled();
    cnx_backbone::nn::set_conv3x3_kernel(if on {
        Some(cnx_dist::ops::winograd_where_it_pays)
    } else {
        None
    });
}

/// Whether [`winograd_for`] uses Winograd on the CPU: unless `CNX_WINOGRAD=0`.
pub fn winograd_enabled() -> bool {
    std::env::var("CNX_WINOGRAD").map_or(true, |v| v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(parse_spec("auto").unwrap(), Spec::Auto);
        assert_eq!(parse_spec(" cpu ").unwrap(), Spec::Cpu);
        assert_eq!(parse_spec("cuda").unwrap(), Spec::Cuda(0));
        assert_eq!(parse_spec("cuda:3").unwrap(), Spec::Cuda(3));
        for bad in [
            "", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:x", "cuda0", "mps",
        ] {
            let e = parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains("auto, cpu, cuda, cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn selection_without_and_with_cuda() {
        assert_eq!(select(Spec::Auto, 0).unwrap(), Device::Cpu);
        assert_eq!(select(Spec::Cpu, 0).unwrap(), Device::Cpu);
        let e = select(Spec::Cuda(0), 0).unwrap_err().to_string();
        assert!(e.contains("cuda:0") && e.contains("no CUDA device"), "{e}");
        assert_eq!(select(Spec::Auto, 2).unwrap(), Device::Cuda(0));
        assert_eq!(select(Spec::Cpu, 2).unwrap(), Device::Cpu);
        assert_eq!(select(Spec::Cuda(1), 2).unwrap(), Device::Cuda(1));
        let e = select(Spec::Cuda(2), 2).unwrap_err().to_string();
        assert!(
            e.contains("cuda:2") && e.contains("2 CUDA device(s)"),
            "{e}"
        );
    }

    /// On this machine: `cuda` is an error exactly when libtorch sees no device.
    #[test]
    fn resolve_matches_this_machine() {
        assert_eq!(resolve("cpu").unwrap(), Device::Cpu);
        let n = cuda_device_count();
        assert_eq!(resolve("cuda").is_ok(), n > 0);
        assert!(resolve(&format!("cuda:{n}")).is_err());
        assert_eq!(
            label(resolve("auto").unwrap()),
            if n > 0 { "cuda:0" } else { "cpu" }
        );
    }
}
