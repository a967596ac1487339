//! Build script shared by every crate that links libtorch.
//!
//! Two things the linker will not do on its own:
//! - embed an rpath to the libtorch directory, so binaries (and test binaries) run without
//!   LD_LIBRARY_PATH;
//! - keep `libtorch_cuda` as a needed library although no symbol of ours references it: without it
//!   libtorch never registers its CUDA backend and a GPU machine looks CPU-only.
//!
//! torch-sys (`links = "tch"`) hands us the library directory as `DEP_TCH_LIBTORCH_LIB`.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report the libtorch directory (is torch-sys a direct dependency?)",
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // The version string of the PyTorch build we link (e.g. "2.11.0+cu130"), for `cnx doctor`.
    let version_py = std::path::Path::new(&lib).join("..").join("version.py");
    let version = std::fs::read_to_string(&version_py)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rerun-if-changed={}", version_py.display());
    println!("cargo:rustc-env=CNX_TORCH_VERSION={version}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
