//! Process-wide settings of the libtorch runtime that a binary applies once, at start-up.

/// Ask libtorch's CPU allocator for transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`):
/// allocations of 2 MiB and more are then 2 MiB aligned and `madvise(MADV_HUGEPAGE)`d.
///
/// Dense prediction allocates many activations of hundreds of MiB (UperNet's 2048-channel
/// fusion at 1/4 scale is 512 MiB for one 512x2048 image); with 4 KiB pages each one costs
/// hundreds of thousands of page faults, a tenth of CPU inference time. libtorch reads the
/// variable once, at its first CPU allocation, so this must run before any tensor exists and
/// while the process has one thread. A value the user already set (`0` turns it off) wins.
/// Returns whether huge pages were requested.
pub fn prefer_huge_pages() -> bool {
    const VAR: &str = "THP_MEM_ALLOC_ENABLE";
    match std::env::var(VAR) {
        Ok(v) => v == "1",
        Err(_) => {
            std::env::set_var(VAR, "1");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_requested_unless_the_user_chose() {
        // One test touches the variable, so no other test in this binary races with it.
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "0");
        assert!(!prefer_huge_pages());
        assert_eq!(std::env::var("THP_MEM_ALLOC_ENABLE").unwrap(), "0");
        std::env::remove_var("THP_MEM_ALLOC_ENABLE");
        assert!(prefer_huge_pages());
        assert_eq!(std::env::var("THP_MEM_ALLOC_ENABLE").unwrap(), "1");
    }
}
