//! Build script of cnx-dist: links libtorch like every cnx crate and compiles the C++ shim in
//! `csrc/` against the headers of the same PyTorch wheel, so the c10d classes we instantiate are
//! exactly the ones libtorch exports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    // As in build/torch_link.rs (which cannot be `include!`d: it has inner doc comments):
    // an rpath so test binaries run without LD_LIBRARY_PATH, and libtorch_cuda kept as a needed
    // library although no symbol of ours references it, or libtorch never registers CUDA.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report the libtorch directory (is torch-sys a direct dependency?)",
    ));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let torch_root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let include = torch_root.join("include");
    for f in [
        "csrc/shim.cpp",
        "csrc/shim.h",
        "csrc/common.h",
        "csrc/backends.h",
        "csrc/nccl.cpp",
        "csrc/sync_bn.cpp",
        "csrc/cuda.cpp",
        "csrc/winograd.cpp",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CNX_DIST_NO_NCCL");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    for v in ["CNX_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    // ProcessGroupGloo.hpp needs Gloo's own headers, which the wheel does not ship.
    let gloo = ["/usr/include", "/usr/local/include"]
        .iter()
        .map(Path::new)
        .find(|d| d.join("gloo/config.h").exists());
    let Some(gloo) = gloo else {
        panic!(
            "Gloo headers (gloo/config.h) not found: install them with \
             `sudo apt-get install -y libgloo-dev` (or run `make setup`)"
        );
    };

    let mut build = cc::Build::new();
    if gloo != Path::new("/usr/include") {
        // Never `-I/usr/include`: it reorders the compiler's system directories.
        build.include(gloo);
    }
    build
        .cpp(true)
        .std("c++17")
        .files([
            "csrc/shim.cpp",
            "csrc/nccl.cpp",
            "csrc/sync_bn.cpp",
            "csrc/cuda.cpp",
        ])
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi())
        // Torch's headers are not warning-clean; their warnings are not ours to fix.
        .flag_if_supported("-w")
        .opt_level(2);

    // NCCL: needs nccl.h (the nvidia-nccl wheel next to torch), CUDA's headers and libtorch_cuda.
    // Without them nccl.cpp compiles to a stub that reports the missing build-time support.
    // CNX_DIST_NO_NCCL=1 forces the stub (the NCCL translation unit is the slow one to compile).
    let site = torch_root.parent().expect("torch dir has a parent");
    let nccl_inc = site.join("nvidia/nccl/include");
    let nccl = if std::env::var_os("CNX_DIST_NO_NCCL").is_some()
        || !lib.join("libtorch_cuda.so").exists()
    {
        None
    } else if !nccl_inc.join("nccl.h").exists() {
        println!(
            "cargo:warning=cnx-dist: building without NCCL: {} not found",
            nccl_inc.join("nccl.h").display()
        );
        None
    } else {
        cuda_includes(site)
    };
    if let Some(cuda_inc) = nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .include(&nccl_inc)
            .includes(cuda_inc);
        // c10::cuda::set_device lives there (the NCCL backend itself is in libtorch_cuda).
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=cnx_dist_nccl");
    }
    println!("cargo::rustc-check-cfg=cfg(cnx_dist_nccl)");
    build.compile("cnx_dist_shim");

    // The CPU convolution kernels: libtorch's headers only, at -O3 so that the transforms'
    // inner loops vectorize (their float versions are multiversioned for AVX-512/AVX2).
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/winograd.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi())
        .flag_if_supported("-w")
        .opt_level(3)
        .compile("cnx_kernels");

    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// `1` or `0`, as the wheel was built: mixing ABIs makes every std::string in c10d's API
/// mismatch at link time. The wheel records it only in Python (`torch._C`), so ask the Python that
/// torch-sys used (the virtual environment's, first on PATH under `make`).
fn cxx11_abi() -> &'static str {
    let python = std::env::var("VIRTUAL_ENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(python)
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match out.as_deref() {
        Some("0") => "0",
        // PyTorch wheels have used the new ABI since 2.6, so it is also the fallback.
        _ => "1",
    }
}

/// Include directories for CUDA's headers, or None when some are missing. ATen's CUDA headers
/// (pulled in by ProcessGroupNCCL.hpp) need the runtime API, nvcc's host glue (`crt/`) and libcu++
/// (`nv/target`). The nvidia-* wheels torch depends on carry only the first; the other two come
/// from a CUDA toolkit (CUDA_HOME, /usr/local/cuda), from the `nvidia-cuda-crt` and
/// `nvidia-cuda-cccl` wheels installed next to torch, or from directories listed in
/// CNX_CUDA_INCLUDE (colon-separated).
fn cuda_includes(site: &Path) -> Option<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("CNX_CUDA_INCLUDE")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let mut wheels: Vec<PathBuf> = std::fs::read_dir(site.join("nvidia"))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("include")))
                .collect()
        })
        .unwrap_or_default();
    wheels.sort();
    dirs.extend(wheels);
    dirs.extend(
        ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(|v| std::env::var_os(v).map(|p| PathBuf::from(p).join("include"))),
    );
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    let needed = ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"];
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|h| !dirs.iter().any(|d| d.join(h).exists()))
        .collect();
    if missing.is_empty() {
        Some(dirs)
    } else {
        println!(
            "cargo:warning=cnx-dist: building without NCCL: CUDA headers not found: {}",
            missing.join(", ")
        );
        None
    }
}
