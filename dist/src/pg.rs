//! `ProcessGroup`: a c10d store plus a Gloo or NCCL backend, with blocking collectives on tch
//! tensors.

use std::ffi::CString;
use std::os::raw::c_void;
use std::ptr::NonNull;
use std::str::FromStr;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::env::DistEnv;
use crate::error::{DistError, Result};
use crate::ffi;

/// The c10d backend doing the communication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, over TCP. Also the only choice for tests and CPU training.
    Gloo,
    /// CUDA tensors, over NVLink/InfiniBand/TCP through NCCL.
    Nccl,
}

impl Backend {
    /// The backend torch.distributed would pick for tensors on `device`.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build can create the backend (NCCL needs CUDA headers at build time).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => true,
            Backend::Nccl => unsafe { ffi::cnx_dist_has_nccl() != 0 },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl FromStr for Backend {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Backend> {
        match s.to_ascii_lowercase().as_str() {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(DistError::Invalid(format!(
                "unknown backend {other:?} (expected \"gloo\" or \"nccl\")"
            ))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One process's membership in a group of `world_size` processes: a c10d `TCPStore` (served by
/// rank 0 at `MASTER_ADDR:MASTER_PORT`) and a `ProcessGroupGloo` or `ProcessGroupNCCL` over it.
///
/// Every collective blocks until c10d's `Work::wait` returns and must be called by every rank in
/// the same order with matching tensors, as in torch.distributed. A failed or timed-out
/// collective leaves the group unusable: drop it and stop.
///
/// `Send` but not `Sync`: c10d matches collectives across ranks by issue order, so issuing them
/// from two threads at once would pair unrelated tensors.
pub struct ProcessGroup {
    raw: NonNull<ffi::CnxPg>,
    rank: usize,
    world_size: usize,
    backend: Backend,
    device: Device,
}

// The shim's object is only reached through &self/&mut self of this owner, and c10d objects may
// be used from any thread.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group described by `env`. Blocks until every rank has joined, up to `timeout`,
    /// which also bounds every later collective (Gloo; NCCL's watchdog uses it too).
    ///
    /// NCCL: this makes `cuda:{env.local_rank}` the current CUDA device of the calling thread.
    pub fn new(backend: Backend, env: &DistEnv, timeout: Duration) -> Result<ProcessGroup> {
        if !backend.is_available() {
            return Err(DistError::Invalid(format!(
                "backend {backend} is not compiled into cnx-dist (NCCL needs nccl.h and CUDA's \
                 headers at build time)"
            )));
        }
        let (rank, world) = (env.rank, env.world_size);
        if world == 0 || rank >= world {
            return Err(DistError::Invalid(format!(
                "rank {rank} is not in a world of {world}"
            )));
        }
        let addr = CString::new(env.master_addr.as_str())
            .map_err(|_| DistError::Invalid("MASTER_ADDR contains a NUL byte".into()))?;
        let (kind, device) = match backend {
            Backend::Gloo => (ffi::BACKEND_GLOO, Device::Cpu),
            Backend::Nccl => (ffi::BACKEND_NCCL, Device::Cuda(env.local_rank)),
        };
        let timeout_ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        // Under torchrun's agent store every rank is a client of the agent's store, prefixed per
        // restart attempt; otherwise rank 0 serves the store.
        let (is_server, prefix) = if env.agent_store {
            (false, format!("/worker/attempt_{}", env.restart_count))
        } else {
            (rank == 0, String::new())
        };
        let prefix = CString::new(prefix).expect("no NUL in the store prefix");
        let mut raw = std::ptr::null_mut();
        unsafe {
            ffi::check(ffi::cnx_pg_new(
                kind,
                addr.as_ptr(),
                env.master_port,
                rank as i32,
                world as i32,
                timeout_ms,
                env.local_rank as i32,
                is_server as i32,
                prefix.as_ptr(),
                &mut raw,
            ))?;
        }
        let raw = NonNull::new(raw)
            .ok_or_else(|| DistError::C10d("creating the process group returned null".into()))?;
        Ok(ProcessGroup {
            raw,
            rank,
            world_size: world,
            backend,
            device,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where this group's own buffers live (`all_gather_bytes`): CPU for Gloo, this rank's GPU
    /// for NCCL.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Overwrites every tensor with rank `root`'s values, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(DistError::Invalid(format!(
                "broadcast root {root} is not in a world of {}",
                self.world_size
            )));
        }
        self.in_place(tensors, |pg, ptrs| unsafe {
            ffi::cnx_pg_broadcast(pg, ptrs.as_ptr(), ptrs.len(), root as i32)
        })
    }

    /// Replaces every tensor with its sum over all ranks, in place.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.in_place(tensors, |pg, ptrs| unsafe {
            ffi::cnx_pg_allreduce_sum(pg, ptrs.as_ptr(), ptrs.len())
        })
    }

    /// Replaces every tensor with its mean over all ranks, in place. Integer tensors get the
    /// sum divided with truncation toward zero.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        self.all_reduce_sum(tensors)?;
        let world = self.world_size as i64;
        tch::no_grad(|| {
            for t in tensors {
                let mut t = t.shallow_clone();
                if t.is_floating_point() || t.is_complex() {
                    let _ = t.f_div_scalar_(world)?;
                } else {
                    let _ = t.f_div_scalar_mode_(world, "trunc")?;
                }
            }
            Ok(())
        })
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        unsafe { ffi::check(ffi::cnx_pg_barrier(self.raw.as_ptr())) }
    }

    /// The shim's object, for the crate's other wrappers (`sync_bn`).
    pub(crate) fn raw(&self) -> *mut ffi::CnxPg {
        self.raw.as_ptr()
    }

    /// Every rank's `bytes`, indexed by rank; lengths may differ between ranks. Two collectives:
    /// the lengths, then the payloads padded to the longest.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let opts = (Kind::Int64, self.device);
        let len = Tensor::from_slice(&[bytes.len() as i64]).f_to_device(self.device)?;
        let lens: Vec<Tensor> = (0..self.world_size)
            .map(|_| Tensor::zeros([1], opts))
            .collect();
        self.all_gather(&len, &lens)?;
        let lens: Vec<usize> = lens.iter().map(|t| t.int64_value(&[0]) as usize).collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        if max == 0 {
            // Every rank sees the same lengths, so every rank skips the payload round.
            return Ok(vec![Vec::new(); self.world_size]);
        }
        let opts = (Kind::Uint8, self.device);
        let mut padded = Tensor::zeros([max as i64], (Kind::Uint8, Device::Cpu));
        if !bytes.is_empty() {
            padded
                .narrow(0, 0, bytes.len() as i64)
                .f_copy_(&Tensor::from_slice(bytes))?;
        }
        padded = padded.f_to_device(self.device)?;
        let outs: Vec<Tensor> = (0..self.world_size)
            .map(|_| Tensor::zeros([max as i64], opts))
            .collect();
        self.all_gather(&padded, &outs)?;
        outs.iter()
            .zip(&lens)
            .map(|(t, &n)| {
                let t = t.narrow(0, 0, n as i64).f_to_device(Device::Cpu)?;
                Ok(Vec::<u8>::try_from(&t)?)
            })
            .collect()
    }

    /// `outputs[r]` = rank r's `input`; all of the same shape, dtype and device.
    fn all_gather(&self, input: &Tensor, outputs: &[Tensor]) -> Result<()> {
        debug_assert_eq!(outputs.len(), self.world_size);
        let outs: Vec<*mut c_void> = outputs.iter().map(ffi::tensor_ptr).collect();
        unsafe {
            ffi::check(ffi::cnx_pg_allgather(
                self.raw.as_ptr(),
                ffi::tensor_ptr(input),
                outs.as_ptr(),
                outs.len(),
            ))
        }
    }

    /// Runs an in-place collective. c10d works on the tensors' memory as one dense block, so a
    /// non-contiguous tensor goes through a contiguous copy that is copied back afterwards.
    fn in_place(
        &self,
        tensors: &[Tensor],
        call: impl FnOnce(*mut ffi::CnxPg, &[*mut c_void]) -> *mut std::os::raw::c_char,
    ) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let staged: Vec<Option<Tensor>> = tensors
            .iter()
            .map(|t| (!t.is_contiguous()).then(|| t.contiguous()))
            .collect();
        let ptrs: Vec<*mut c_void> = tensors
            .iter()
            .zip(&staged)
            .map(|(t, s)| ffi::tensor_ptr(s.as_ref().unwrap_or(t)))
            .collect();
        unsafe { ffi::check(call(self.raw.as_ptr(), &ptrs))? };
        tch::no_grad(|| {
            for (t, s) in tensors.iter().zip(&staged) {
                if let Some(s) = s {
                    t.shallow_clone().f_copy_(s)?;
                }
            }
            Ok(())
        })
    }
}

impl Drop for ProcessGroup {
    /// Shuts the backend down (NCCL: `shutdown()`, so no communicator abort at exit) and closes
    /// the store. Other ranks may already be gone; that is not an error here.
    fn drop(&mut self) {
        unsafe { ffi::cnx_pg_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}
