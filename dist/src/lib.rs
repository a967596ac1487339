//! Data-parallel training and evaluation for cnx on torch.distributed's own c10d process groups.
//!
//! Design, as with `torchrun` + `DistributedDataParallel` in Python:
//!
//! - **One process per device.** A launcher starts `world_size` copies of the program; each
//!   learns its rank, its node-local rank (= its CUDA device) and the rendezvous address from the
//!   environment: [`DistEnv::from_env`] reads torchrun's variables (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `MASTER_ADDR`, ...) or, failing those, SLURM's (`SLURM_PROCID`,
//!   `SLURM_NTASKS`, the first host of `SLURM_JOB_NODELIST`, ...). No variables: one process.
//! - **The store.** [`ProcessGroup::new`] creates c10d's `TCPStore` (served by rank 0 at
//!   `MASTER_ADDR:MASTER_PORT`, joined by the others) through which the ranks find each other.
//! - **Gloo vs NCCL.** Over the store, libtorch's own `ProcessGroupGloo` (CPU tensors, TCP) or
//!   `ProcessGroupNCCL` (CUDA tensors) does the communication, so the wire behaviour, timeouts
//!   and environment knobs (`GLOO_SOCKET_IFNAME`, `NCCL_*`) are torch.distributed's.
//!   [`Backend::for_device`] picks as torch does. They are reached through a small C++ shim
//!   (`csrc/`) compiled against the same wheel's headers; C++ exceptions become [`DistError`]s.
//! - **Gradients.** [`GradBuckets`] averages gradients with DDP's bucketing (~25 MB flat buffers
//!   per dtype/device, reverse parameter order), but after `backward()` rather than overlapped
//!   with it: tch's autograd offers no gradient hooks to start a bucket early.
//!   [`broadcast_parameters`] makes all replicas start from rank 0's weights.
//! - **Synchronized BatchNorm.** [`sync_batch_norm`] is `torch.nn.SyncBatchNorm` in training
//!   mode: an autograd op (C++ `torch::autograd::Function`) whose forward and backward each
//!   all-reduce per-channel statistics, so BN sees the global batch.
//! - **Results.** [`ProcessGroup::all_gather_bytes`] collects serialized per-rank results (e.g.
//!   evaluation detections) of any length, for rank 0 to merge.
//!
//! - **Operators tch does not bind.** [`ops::fused_adamw`] (the fused AdamW step) and
//!   [`ops::winograd_conv3x3`] (3x3 convolutions on the CPU by Winograd's F(4x4, 3x3), an
//!   autograd Function in `csrc/winograd.cpp`) go through the same shim.
//!
//! All collectives block until complete and must be issued by every rank in the same order.

mod env;
mod error;
mod ffi;
mod grads;
pub mod ops;
mod pg;
mod sync_bn;

pub use env::{expand_nodelist, DistEnv, Launcher, DEFAULT_MASTER_PORT};
pub use error::{DistError, Result};
pub use grads::{broadcast_parameters, GradBuckets, DEFAULT_BUCKET_BYTES};
pub use pg::{Backend, ProcessGroup};
pub use sync_bn::sync_batch_norm;
