//! How the process's C allocator treats freed memory. libtorch allocates every CPU tensor with
//! `posix_memalign`, and glibc serves blocks above 32 MB by `mmap` and returns them with
//! `munmap` on free, so a training step that allocates the same few GB of activations every
//! iteration page-faults them in afresh each time (zeroed by the kernel: ~0.2 s per GB here).
//! PyTorch's CPU performance guide answers this by preloading jemalloc or tcmalloc with decay
//! off; glibc can do the same itself: no `mmap` for large blocks (they come from the heap and are
//! reused after free) and no trimming of the heap's top. Measured on
//! 2 cores, UperNet-T training step at 512x512: 12.7 → 10.9 s (Mask R-CNN-T 15.5 → 12.1 s);
//! peak RSS 5.6 → 7.1 GB, which then stays the process's working set.
//! `CNX_KEEP_FREED_MEMORY=0` keeps glibc's defaults.

/// Applies the policy (Linux with glibc; elsewhere nothing). `main` calls it first thing.
pub fn keep_freed_memory() {
    if std::env::var("CNX_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is safe at any time.
    unsafe {
        // The main thread's blocks (libtorch's tensors) then come from the heap. Other threads
        // keep their own arenas, which still map their rare blocks above 64 MB; one arena for
        // all (M_ARENA_MAX=1) made Mask R-CNN's step slower here (oneDNN's per-thread
        // scratchpads then contend for one lock).
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // An int: the heap's top is returned only once more than 2 GB of it are free.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Whether a freed large block comes back without page faults on this thread: 64 MB allocated,
/// written, freed, then allocated and written again, counting the minor faults of the second
/// round (fresh memory faults once per 4 KB page: 16384 times). `None` off Linux. For
/// `cnx doctor`, on the main thread (other threads allocate from their own arenas).
pub fn freed_blocks_reused() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        const SIZE: usize = 64 << 20;
        let minor_faults = || {
            // SAFETY: getrusage fills the struct it is given.
            unsafe {
                let mut u: libc::rusage = std::mem::zeroed();
                libc::getrusage(libc::RUSAGE_THREAD, &mut u);
                u.ru_minflt
            }
        };
        let touch = || {
            let mut v: Vec<u8> = Vec::with_capacity(SIZE);
            // SAFETY: writes SIZE bytes into the capacity just reserved.
            unsafe {
                std::ptr::write_bytes(v.as_mut_ptr(), 1, SIZE);
                v.set_len(SIZE);
            }
            std::hint::black_box(&v);
        };
        touch();
        let before = minor_faults();
        touch();
        Some(minor_faults() - before < (SIZE / 4096 / 100) as i64)
    }
    #[cfg(not(target_os = "linux"))]
    None
}
