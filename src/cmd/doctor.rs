//! `cnx doctor`: what this binary runs on — cnx and libtorch versions, CPU threads, CUDA devices.

use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    cnx: String,
    /// Release of the linked libtorch, without the local build tag ("2.11.0").
    torch: String,
    /// Full build string of the linked PyTorch ("2.11.0+cu130").
    torch_build: String,
    cpu_threads: i32,
    /// libtorch's CPU allocator asks for transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`, the
    /// user's choice; off by default).
    cpu_huge_pages: bool,
    /// A freed large block is reused without page faults (`cnx::host_memory`; off with
    /// `CNX_KEEP_FREED_MEMORY=0`); null where it cannot be probed.
    freed_memory_reused: Option<bool>,
    /// 3x3 convolutions on the CPU by Winograd where it pays (off with `CNX_WINOGRAD=0`).
    cpu_winograd: bool,
    cuda_available: bool,
    cudnn_available: bool,
    devices: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let build = env!("CNX_TORCH_VERSION").to_string();
    let cuda = tch::Cuda::is_available();
    let n = if cuda { tch::Cuda::device_count() } else { 0 };
    let report = Report {
        cnx: env!("CARGO_PKG_VERSION").to_string(),
        torch: build.split('+').next().unwrap_or(&build).to_string(),
        torch_build: build.clone(),
        cpu_threads: tch::get_num_threads(),
        cpu_huge_pages: std::env::var("THP_MEM_ALLOC_ENABLE").is_ok_and(|v| v == "1"),
        freed_memory_reused: crate::host_memory::freed_blocks_reused(),
        cpu_winograd: crate::device::winograd_enabled(),
        cuda_available: cuda,
        cudnn_available: cuda && tch::Cuda::cudnn_is_available(),
        devices: (0..n).map(|i| device_name(i as i32)).collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("cnx          {}", report.cnx);
    println!("libtorch     {}", report.torch_build);
    println!("cpu threads  {}", report.cpu_threads);
    println!(
        "huge pages   {}",
        if report.cpu_huge_pages {
            "on (THP_MEM_ALLOC_ENABLE=1)"
        } else {
            "off (libtorch default; THP_MEM_ALLOC_ENABLE=1 turns it on)"
        }
    );
    println!(
        "host memory  {}",
        match report.freed_memory_reused {
            Some(true) => "freed blocks reused (CNX_KEEP_FREED_MEMORY=0 restores glibc's defaults)",
            Some(false) =>
                "fresh pages for every large block (CNX_KEEP_FREED_MEMORY=0 or not glibc)",
            None => "not probed on this system",
        }
    );
    println!(
        "cpu conv 3x3 {}",
        if report.cpu_winograd {
            "Winograd F(4x4,3x3) where it pays (CNX_WINOGRAD=0 turns it off)"
        } else {
            "libtorch's direct convolution (CNX_WINOGRAD=0)"
        }
    );
    println!(
        "cuda         {}",
        if cuda { "available" } else { "not available" }
    );
    if cuda {
        println!(
            "cudnn        {}",
            if report.cudnn_available {
                "available"
            } else {
                "not available"
            }
        );
    }
    for (i, d) in report.devices.iter().enumerate() {
        println!("cuda:{i}       {d}");
    }
    Ok(())
}

/// libtorch's C API (as tch exposes it) has no device-name call, so ask the CUDA driver directly.
/// Only reached when libtorch already found a device, so the driver library is present.
pub(crate) fn device_name(index: i32) -> String {
    let fallback = || format!("cuda:{index}");
    // SAFETY: the three driver entry points have these C signatures in every CUDA release.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return fallback();
        };
        type Init = unsafe extern "C" fn(u32) -> i32;
        type Get = unsafe extern "C" fn(*mut i32, i32) -> i32;
        type Name = unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> i32;
        let (Ok(init), Ok(get), Ok(name)) = (
            lib.get::<Init>(b"cuInit\0"),
            lib.get::<Get>(b"cuDeviceGet\0"),
            lib.get::<Name>(b"cuDeviceGetName\0"),
        ) else {
            return fallback();
        };
        let mut dev = 0i32;
        let mut buf = [0 as std::ffi::c_char; 256];
        if init(0) != 0 || get(&mut dev, index) != 0 || name(buf.as_mut_ptr(), 256, dev) != 0 {
            return fallback();
        }
        std::ffi::CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}
