//! How one training process shares the machine's cores between libtorch's intra-op threads and
//! the data loader's workers. The rule (`runtime.threads = 0` / `data.workers = 0` mean "by this
//! rule"; a value set in the config is used as given):
//!
//! - **Cores of this process** = the cores the process may use (cgroup / affinity aware) divided
//!   by the processes of this node (torchrun's `LOCAL_WORLD_SIZE`, SLURM's tasks per node), at
//!   least 1: ranks on one node never compete for the same cores.
//! - **CUDA**: the GPU runs the model, the host decodes and augments. Loader workers = the cores
//!   less one, at most 8; intra-op threads = the cores the workers leave, at least 1 (host-side
//!   tensor work is small: pinned copies, target building).
//! - **CPU**: the cores run the model. Intra-op threads = every core; loader workers = a quarter
//!   of the cores, at least 1. The workers run in bursts between steps and sleep while the
//!   prefetch queue is full, so they take little from the model.

use super::config::Config;
use tch::Device;

/// Threads of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPlan {
    /// Cores this process may use (its node's share).
    pub cores: usize,
    /// libtorch intra-op threads.
    pub intra_op: usize,
    /// Data loader worker threads.
    pub workers: usize,
}

impl ThreadPlan {
    /// The rule above for `cfg` on `device` with `local_ranks` processes on this node.
    pub fn new(cfg: &Config, device: Device, local_ranks: usize) -> Self {
        let available = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Self::for_cores(cfg, device, (available / local_ranks.max(1)).max(1))
    }

    /// The rule for this process in its environment (the node's ranks from torchrun / SLURM).
    pub fn from_env(cfg: &Config, device: Device) -> Self {
        let local = cnx_dist::DistEnv::from_env()
            .ok()
            .flatten()
            .map_or(1, |e| e.local_world_size);
        Self::new(cfg, device, local)
    }

    fn for_cores(cfg: &Config, device: Device, cores: usize) -> Self {
        let (threads, workers) = (cfg.runtime.threads.max(0) as usize, cfg.data.workers);
        if device.is_cuda() {
            let workers = if workers > 0 {
                workers
            } else {
                (cores - 1).clamp(1, 8)
            };
            let intra_op = if threads > 0 {
                threads
            } else {
                cores.saturating_sub(workers).max(1)
            };
            Self {
                cores,
                intra_op,
                workers,
            }
        } else {
            Self {
                cores,
                intra_op: if threads > 0 { threads } else { cores },
                workers: if workers > 0 {
                    workers
                } else {
                    (cores / 4).max(1)
                },
            }
        }
    }

    /// Set libtorch's intra-op threads.
    pub fn apply(&self) {
        tch::set_num_threads(self.intra_op as i32);
    }

    pub fn describe(&self) -> String {
        format!(
            "{} intra-op threads, {} data workers ({} cores for this process)",
            self.intra_op, self.workers, self.cores
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threads: i32, workers: usize) -> Config {
        let mut c = crate::engine::presets::find("demo_mask_rcnn_convnext_nano")
            .unwrap()
            .config();
        c.runtime.threads = threads;
        c.data.workers = workers;
        c
    }

    #[test]
    fn cpu_gives_the_model_every_core_and_the_loader_a_quarter() {
        let p = ThreadPlan::for_cores(&cfg(0, 0), Device::Cpu, 16);
        assert_eq!((p.intra_op, p.workers), (16, 4));
        let p = ThreadPlan::for_cores(&cfg(0, 0), Device::Cpu, 2);
        assert_eq!((p.intra_op, p.workers), (2, 1));
    }

    #[test]
    fn cuda_gives_the_loader_the_cores_and_keeps_one_for_torch() {
        let p = ThreadPlan::for_cores(&cfg(0, 0), Device::Cuda(0), 16);
        assert_eq!((p.intra_op, p.workers), (8, 8));
        let p = ThreadPlan::for_cores(&cfg(0, 0), Device::Cuda(0), 4);
        assert_eq!((p.intra_op, p.workers), (1, 3));
        let p = ThreadPlan::for_cores(&cfg(0, 0), Device::Cuda(0), 1);
        assert_eq!((p.intra_op, p.workers), (1, 1));
    }

    #[test]
    fn configured_values_win_and_ranks_split_the_node() {
        let p = ThreadPlan::for_cores(&cfg(3, 5), Device::Cuda(0), 16);
        assert_eq!((p.intra_op, p.workers), (3, 5));
        let n = std::thread::available_parallelism().unwrap().get();
        let p = ThreadPlan::new(&cfg(0, 0), Device::Cpu, n * 2);
        assert_eq!(
            p.cores, 1,
            "more ranks than cores still leaves each one core"
        );
    }
}
