//! Data-parallel gradient averaging: DDP's bucketed all-reduce, run once after `backward()`.
//!
//! torch's DistributedDataParallel overlaps communication with the backward pass by firing a
//! bucket's all-reduce from autograd hooks as soon as its last gradient is ready. tch's autograd
//! exposes no gradient hooks, so here the all-reduce runs after `backward()` returns, bucket by
//! bucket. The result is the same averaged gradient; only the overlap is lost (on a fast
//! interconnect, a few percent of step time for ConvNeXt-sized models).

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::ffi;
use crate::pg::ProcessGroup;

/// DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Parameters grouped into flat all-reduce buckets.
///
/// Buckets hold parameters of one dtype and device, in reverse parameter order (gradients of the
/// last layers are ready first in backward; kept for parity with DDP, and so that a future
/// overlapped version keeps the same buckets), each closed once it reaches the byte cap (a
/// parameter larger than the cap gets a bucket of its own). Every rank must build its
/// `GradBuckets` from the same parameter list, so that all ranks issue identical collectives.
pub struct GradBuckets {
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
}

struct Bucket {
    /// Indices into `params`.
    members: Vec<usize>,
    kind: Kind,
    device: Device,
}

impl GradBuckets {
    /// Buckets of [`DEFAULT_BUCKET_BYTES`].
    pub fn new(params: &[Tensor]) -> GradBuckets {
        Self::with_bucket_bytes(params, DEFAULT_BUCKET_BYTES)
    }

    /// Buckets closed once they hold at least `bucket_bytes` of gradients.
    pub fn with_bucket_bytes(params: &[Tensor], bucket_bytes: usize) -> GradBuckets {
        let params: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let mut buckets = Vec::new();
        // Open buckets, one per (dtype, device), in order of first appearance.
        let mut open: Vec<(Bucket, usize)> = Vec::new();
        for (i, p) in params.iter().enumerate().rev() {
            let (kind, device) = (p.kind(), p.device());
            let bytes = p.numel() * p.kind().elt_size_in_bytes();
            let slot = match open
                .iter()
                .position(|(b, _)| b.kind == kind && b.device == device)
            {
                Some(s) => s,
                None => {
                    let bucket = Bucket {
                        members: Vec::new(),
                        kind,
                        device,
                    };
                    open.push((bucket, 0));
                    open.len() - 1
                }
            };
            let (bucket, filled) = &mut open[slot];
            bucket.members.push(i);
            *filled += bytes;
            if *filled >= bucket_bytes {
                buckets.push(open.remove(slot).0);
            }
        }
        buckets.extend(open.into_iter().map(|(b, _)| b));
        GradBuckets { params, buckets }
    }

    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Parameter indices (into the list given to the constructor) of each bucket, in the order
    /// they are all-reduced.
    pub fn bucket_members(&self) -> Vec<Vec<usize>> {
        self.buckets.iter().map(|b| b.members.clone()).collect()
    }

    /// Averages every parameter's `.grad()` over the group, in place; call it on every rank after
    /// `backward()` and before the optimizer step.
    ///
    /// A parameter without a gradient on this rank contributes zeros, so that every rank issues
    /// the same collectives; it then receives the averaged gradient like the others (a `.grad`
    /// is created for it), keeping the parameters identical on all ranks after the step.
    pub fn all_reduce_grads(&self, pg: &ProcessGroup) -> Result<()> {
        let world = pg.world_size() as f64;
        tch::no_grad(|| {
            for bucket in &self.buckets {
                let grads: Vec<Tensor> = bucket
                    .members
                    .iter()
                    .map(|&i| self.params[i].grad())
                    .collect();
                let flat_parts: Vec<Tensor> = grads
                    .iter()
                    .zip(&bucket.members)
                    .map(|(g, &i)| {
                        if g.defined() {
                            g.reshape([-1])
                        } else {
                            Tensor::zeros(
                                [self.params[i].numel() as i64],
                                (bucket.kind, bucket.device),
                            )
                        }
                    })
                    .collect();
                let mut flat = Tensor::f_cat(&flat_parts, 0)?;
                pg.all_reduce_sum(std::slice::from_ref(&flat))?;
                let _ = flat.f_div_scalar_(world)?;
                let mut offset = 0i64;
                for (g, &i) in grads.iter().zip(&bucket.members) {
                    let p = &self.params[i];
                    let n = p.numel() as i64;
                    let averaged = flat.narrow(0, offset, n).view_(p.size());
                    offset += n;
                    if g.defined() {
                        g.shallow_clone().f_copy_(&averaged)?;
                    } else {
                        // A fresh tensor, not a view into `flat`: optimizers update grads in
                        // place (weight decay) and must not write into each other's.
                        let grad = averaged.copy();
                        unsafe {
                            ffi::check(ffi::cnx_set_grad(
                                ffi::tensor_ptr(p),
                                ffi::tensor_ptr(&grad),
                            ))?
                        };
                    }
                }
            }
            Ok(())
        })
    }
}

/// Copies rank 0's parameter values to every rank (before training, so all replicas start equal).
pub fn broadcast_parameters(pg: &ProcessGroup, params: &[Tensor]) -> Result<()> {
    tch::no_grad(|| pg.broadcast(params, 0))
}
