//! What a model replica of a data-parallel run needs from the trainer, so that N ranks × k
//! images reproduce 1 process × N·k images (same losses and gradients up to float summation
//! order):
//!
//! * **Batch keys** ([`with_batch_keys`]): every random draw of the model (drop path, dropout,
//!   the RoI/anchor samplers) comes from a ChaCha8 stream keyed by (seed, iteration, global
//!   sample index, call site) instead of libtorch's global generator, so an image's draws do
//!   not depend on which other images share its batch or rank.
//! * **Count reducer** ([`with_count_reducer`], [`global_count`], [`batch_mean`]): losses that
//!   are means over a batch-dependent count divide by the count summed over ranks (over the
//!   world size), so averaging the ranks' gradients gives the gradient of the global mean.
//! * **Synchronized BatchNorm** ([`with_sync_batch_norm`]): a hook that the heads' BatchNorm
//!   layers (ConvModule) call in training instead of local batch statistics.
//!
//! All three are thread-local and scoped: installed around one forward (and the backward that
//! follows, which draws nothing and reduces nothing itself) on the thread that runs the model.
//! With nothing installed every layer behaves exactly as before (global generator, local means,
//! plain BatchNorm), which inference, the parity tests and single-process training rely on.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// The keys of one data-parallel batch on this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKeys {
    /// The run's seed (the same on every rank).
    pub seed: u64,
    /// The optimizer step (the same on every rank; distinct per step so draws change).
    pub iteration: u64,
    /// Global sample index of each image in this rank's batch, in batch order: image `i` of the
    /// model's input draws from streams keyed by `samples[i]`.
    pub samples: Vec<u64>,
}

/// A count reducer: maps this rank's count (a 0-dim f64 tensor on the loss's device) to the
/// sum over all ranks (an all-reduce in the trainer). Every rank must reach the same call
/// sites in the same order, which the heads guarantee by calling [`global_count`] even when
/// their local count is zero.
pub type CountReduce = dyn Fn(&Tensor) -> Tensor;

/// What a BatchNorm layer holds, handed to the synchronized-BatchNorm hook. `running_mean` and
/// `running_var` are the layer's buffers: the hook updates them in place (with `momentum`, as
/// `torch.nn.SyncBatchNorm` does) from the global batch statistics.
#[derive(Debug)]
pub struct BatchNormParams<'a> {
    /// Affine scale (`weight`), absent for a non-affine BatchNorm.
    pub weight: Option<&'a Tensor>,
    /// Affine shift (`bias`).
    pub bias: Option<&'a Tensor>,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    /// Running-statistics momentum (PyTorch convention: new = (1-m)·old + m·batch).
    pub momentum: f64,
    pub eps: f64,
}

/// momentum / eps of [`crate::nn::BatchNorm2d::new`] (tch keeps its config private, so the
/// values are repeated here; a unit test checks them against the layer's behaviour).
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

impl<'a> BatchNormParams<'a> {
    /// The parameters of one of the project's BatchNorm layers.
    pub fn of(bn: &'a crate::nn::BatchNorm2d) -> Self {
        Self {
            weight: bn.inner.ws.as_ref(),
            bias: bn.inner.bs.as_ref(),
            running_mean: &bn.inner.running_mean,
            running_var: &bn.inner.running_var,
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
        }
    }
}

/// A synchronized-BatchNorm implementation: `(input N,C,..., params) -> output`, training
/// mode only (batch statistics over all ranks, running statistics updated in place).
pub type SyncBatchNorm = dyn Fn(&Tensor, &BatchNormParams) -> Tensor;

struct Reducer {
    reduce: Box<CountReduce>,
    world_size: usize,
}

thread_local! {
    static KEYS: RefCell<Option<Rc<BatchKeys>>> = const { RefCell::new(None) };
    static NEXT_SITE: Cell<u64> = const { Cell::new(0) };
    static REDUCER: RefCell<Option<Rc<Reducer>>> = const { RefCell::new(None) };
    static SYNC_BN: RefCell<Option<Rc<SyncBatchNorm>>> = const { RefCell::new(None) };
}

/// Restores a thread-local to its previous value when dropped (also on panic), so scopes nest.
struct Restore<F: FnMut()>(F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Runs `f` (one forward, normally followed by its backward) with `keys` installed and the
/// call-site counter at 0. Every random op reached in `f` in training mode draws per image
/// from its keyed stream. The previous keys and counter are restored afterwards.
pub fn with_batch_keys<R>(keys: BatchKeys, f: impl FnOnce() -> R) -> R {
    let prev = KEYS.with(|k| k.replace(Some(Rc::new(keys))));
    let prev_site = NEXT_SITE.with(|s| s.replace(0));
    let mut prev = Some(prev);
    let _restore = Restore(move || {
        KEYS.with(|k| *k.borrow_mut() = prev.take().flatten());
        NEXT_SITE.with(|s| s.set(prev_site));
    });
    f()
}

/// The batch keys installed on this thread, if any.
pub fn batch_keys() -> Option<BatchKeys> {
    KEYS.with(|k| k.borrow().as_deref().cloned())
}

/// One random op's call in the forward pass: the batch keys plus the site number the call
/// took. Site numbers count batch-level calls in forward order, which is the same on every
/// rank because every rank runs the same model.
#[derive(Debug, Clone)]
pub struct Site {
    keys: Rc<BatchKeys>,
    site: u64,
}

/// Separates these streams from other users of `(seed, a, b, c)`-keyed ChaCha8 streams (the
/// data loader keys its augmentation draws the same way): "replica" in ASCII.
const STREAM: u64 = 0x0061_6369_6c70_6572;

impl Site {
    /// The site number (0 for the first random op of the forward).
    pub fn number(&self) -> u64 {
        self.site
    }

    /// Number of images in the keyed batch.
    pub fn batch_len(&self) -> usize {
        self.keys.samples.len()
    }

    /// The stream of image `pos` of the batch (its position in the model's input), keyed by
    /// (seed, iteration, global sample index, site).
    pub fn stream(&self, pos: usize) -> KeyedStream {
        let k = &self.keys;
        let sample = *k.samples.get(pos).unwrap_or_else(|| {
            panic!(
                "batch keys hold {} sample indices but the model drew for image {pos}",
                k.samples.len()
            )
        });
        KeyedStream(keyed_rng(k.seed, k.iteration, sample, self.site))
    }
}

fn keyed_rng(seed: u64, iteration: u64, sample: u64, site: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&iteration.to_le_bytes());
    key[16..24].copy_from_slice(&sample.to_le_bytes());
    key[24..32].copy_from_slice(&site.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(STREAM);
    rng
}

/// With batch keys installed, takes the next call-site number; `None` (and no counter change)
/// without keys, where the caller uses the global generator as before. Call once per
/// batch-level random op, whether or not any image ends up drawing.
pub fn next_site() -> Option<Site> {
    let keys = KEYS.with(|k| k.borrow().clone())?;
    let site = NEXT_SITE.with(|s| {
        let v = s.get();
        s.set(v + 1);
        v
    });
    Some(Site { keys, site })
}

/// The random stream of one image at one call site.
#[derive(Debug, Clone)]
pub struct KeyedStream(ChaCha8Rng);

impl KeyedStream {
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.gen::<f64>()
    }

    /// True with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// `k` distinct indices of `0..n` in random order (all of `0..n`, shuffled, when `k >= n`):
    /// what `randperm(n)[:k]` gives, at O(k) cost for small `k` (Floyd / rejection sampling),
    /// so the RPN's ~200k-anchor negative pool is never shuffled whole.
    pub fn choose(&mut self, n: usize, k: usize) -> Vec<i64> {
        rand::seq::index::sample(&mut self.0, n, k.min(n))
            .into_iter()
            .map(|i| i as i64)
            .collect()
    }
}

/// With batch keys installed: takes the next site and returns a keep mask of `shape`
/// (`shape[0]` = batch) whose entries are 1 with probability `keep`, image `i`'s
/// `shape[1..].product()` draws coming from its own stream, built on the host and copied to
/// `opts`' device. `None` without keys (the caller draws from the global generator).
pub fn keyed_keep_mask(shape: &[i64], keep: f64, opts: (Kind, Device)) -> Option<Tensor> {
    let site = next_site()?;
    let n = shape[0] as usize;
    let per: i64 = shape[1..].iter().product();
    let mut v = Vec::with_capacity(n * per as usize);
    for i in 0..n {
        let mut s = site.stream(i);
        v.extend((0..per).map(|_| if s.bernoulli(keep) { 1f32 } else { 0f32 }));
    }
    Some(
        Tensor::from_slice(&v)
            .view(shape)
            .to_kind(opts.0)
            .to_device(opts.1),
    )
}

/// Runs `f` with a count reducer installed for a world of `world_size` ranks: `reduce` maps a
/// local count to its sum over ranks (the trainer's all-reduce). Restored afterwards.
pub fn with_count_reducer<R>(
    world_size: usize,
    reduce: impl Fn(&Tensor) -> Tensor + 'static,
    f: impl FnOnce() -> R,
) -> R {
    assert!(world_size >= 1, "world size must be at least 1");
    let r = Rc::new(Reducer {
        reduce: Box::new(reduce),
        world_size,
    });
    let prev = REDUCER.with(|c| c.replace(Some(r)));
    let mut prev = Some(prev);
    let _restore = Restore(move || REDUCER.with(|c| *c.borrow_mut() = prev.take().flatten()));
    f()
}

/// Whether a count reducer is installed on this thread.
pub fn has_count_reducer() -> bool {
    REDUCER.with(|c| c.borrow().is_some())
}

/// The installed reducer's world size (1 without one).
pub fn world_size() -> usize {
    REDUCER.with(|c| c.borrow().as_ref().map_or(1, |r| r.world_size))
}

/// The normalizer that makes a rank's `local_sum / normalizer` average over ranks to
/// `global_sum / global_count`: the count summed over ranks divided by the world size. Without
/// a reducer, `local` itself. `local` is a 0-dim tensor; the result is f64 on its device.
pub fn global_count(local: &Tensor) -> Tensor {
    let r = REDUCER.with(|c| c.borrow().clone());
    let local = local.to_kind(Kind::Double);
    match r {
        None => local,
        Some(r) => (r.reduce)(&local).to_kind(Kind::Double) / r.world_size as f64,
    }
}

/// The divisor of a mean whose denominator is `max(count, min_count)` over the batch, where
/// `count` is batch-dependent (sampled anchors, RoIs, pixels). Without a reducer it is the
/// local `max(count, min_count)` and [`MeanDivisor::divide`] is exactly the single-process
/// `sum / max(count, min_count)` (same op, same bits). With one it is
/// `max(global_count, min_count) / world_size`, so that `local_sum / divisor` averaged over
/// ranks is `global_sum / max(global_count, min_count)`.
#[derive(Debug)]
pub struct MeanDivisor {
    local: f64,
    global: Option<Tensor>,
}

impl MeanDivisor {
    /// Calls the reducer (when installed) once: every rank must build its divisors at the same
    /// points of the forward, also when its local count is 0.
    pub fn new(local_count: f64, min_count: f64, device: Device) -> Self {
        let global = has_count_reducer().then(|| {
            let local = Tensor::from(local_count).to_device(device);
            global_count(&local)
                .clamp_min(min_count / world_size() as f64)
                .to_kind(Kind::Float)
        });
        Self {
            local: local_count.max(min_count),
            global,
        }
    }

    /// `sum / divisor`.
    pub fn divide(&self, sum: &Tensor) -> Tensor {
        match &self.global {
            None => sum / self.local,
            Some(g) => sum / g,
        }
    }
}

/// `sum / max(count, min_count)` in its data-parallel form (see [`MeanDivisor`]);
/// `local_count` is this rank's count.
pub fn batch_mean(sum: &Tensor, local_count: f64, min_count: f64) -> Tensor {
    MeanDivisor::new(local_count, min_count, sum.device()).divide(sum)
}

/// Runs `f` with a synchronized-BatchNorm implementation installed: the heads' BatchNorm layers
/// that the official configs make `SyncBN` (ConvModule in UperNet's heads and Cascade's box
/// heads) call it in training mode instead of `batch_norm` with local statistics. Eval mode and
/// frozen layers never call it. Restored afterwards.
pub fn with_sync_batch_norm<R>(
    sync_bn: impl Fn(&Tensor, &BatchNormParams) -> Tensor + 'static,
    f: impl FnOnce() -> R,
) -> R {
    let prev = SYNC_BN.with(|c| c.replace(Some(Rc::new(sync_bn))));
    let mut prev = Some(prev);
    let _restore = Restore(move || SYNC_BN.with(|c| *c.borrow_mut() = prev.take().flatten()));
    f()
}

/// BatchNorm as a `SyncBN` layer runs it: through the installed hook while training (unless
/// the layer is frozen), the layer itself otherwise.
pub fn sync_batch_norm(bn: &crate::nn::BatchNorm2d, xs: &Tensor, train: bool) -> Tensor {
    use tch::nn::ModuleT;
    if train && !bn.frozen {
        if let Some(h) = SYNC_BN.with(|c| c.borrow().clone()) {
            return h(xs, &BatchNormParams::of(bn));
        }
    }
    bn.forward_t(xs, train)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, ModuleT};

    fn keys(samples: &[u64]) -> BatchKeys {
        BatchKeys {
            seed: 7,
            iteration: 3,
            samples: samples.to_vec(),
        }
    }

    #[test]
    fn sites_count_in_order_and_reset_per_scope() {
        assert!(next_site().is_none());
        with_batch_keys(keys(&[0]), || {
            assert_eq!(next_site().unwrap().number(), 0);
            assert_eq!(next_site().unwrap().number(), 1);
            // A nested scope starts over and gives the outer one its counter back.
            with_batch_keys(keys(&[1]), || assert_eq!(next_site().unwrap().number(), 0));
            assert_eq!(next_site().unwrap().number(), 2);
        });
        assert!(next_site().is_none() && batch_keys().is_none());
    }

    #[test]
    fn choose_is_keyed_distinct_and_in_range() {
        let draw = |samples: &[u64], pos: usize| {
            with_batch_keys(keys(samples), || {
                next_site().unwrap().stream(pos).choose(200_000, 128)
            })
        };
        let a = draw(&[4], 0);
        assert_eq!(a, draw(&[9, 2, 4], 2));
        assert_ne!(a, draw(&[5], 0));
        let mut s = a.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 128);
        assert!(a.iter().all(|&i| (0..200_000).contains(&i)));
        let all = with_batch_keys(keys(&[4]), || next_site().unwrap().stream(0).choose(10, 20));
        let mut all_sorted = all.clone();
        all_sorted.sort();
        assert_eq!(all_sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn batch_mean_without_reducer_is_the_plain_division() {
        let s = Tensor::from_slice(&[1.2345f32, 2.5, 3.75]).sum(Kind::Float);
        let got = batch_mean(&s, 7.0, 1.0);
        assert_eq!(got.kind(), Kind::Float);
        assert_eq!(
            f32::try_from(&got).unwrap(),
            f32::try_from(&(&s / 7.0)).unwrap()
        );
        let zero = batch_mean(&s, 0.0, 1.0);
        assert_eq!(f32::try_from(&zero).unwrap(), f32::try_from(&s).unwrap());
    }

    #[test]
    fn batch_mean_with_reducer_divides_by_the_global_count_over_world() {
        // Two ranks with counts 3 and 5: rank 0's loss = sum * 2 / 8.
        let s = Tensor::from(4.0f32);
        let got = with_count_reducer(2, |c| c + 5.0, || batch_mean(&s, 3.0, 1.0));
        assert!((f64::try_from(&got).unwrap() - 1.0).abs() < 1e-7);
        // The floor applies to the global count: 0 + 0 over 2 ranks → divide by 1 globally.
        let got = with_count_reducer(2, |c| c * 2.0, || batch_mean(&s, 0.0, 1.0));
        assert!((f64::try_from(&got).unwrap() - 8.0).abs() < 1e-7);
        assert!(!has_count_reducer() && world_size() == 1);
    }

    #[test]
    fn batch_norm_params_match_the_layer() {
        // BN_MOMENTUM / BN_EPS must be what BatchNorm2d::new configures: check both against
        // one training step of the layer (running-mean update and normalized output).
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = crate::nn::BatchNorm2d::new(vs.root() / "bn", 2);
        // Channel 1's variance (1.9e-5) is of the order of eps, so a wrong eps shows.
        let x =
            Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0]).view([2, 2, 2, 1]);
        // tch initialises the scale uniformly in [0, 1); 1 keeps the eps check sensitive.
        tch::no_grad(|| {
            let _ = bn.inner.ws.as_ref().unwrap().shallow_clone().fill_(1.0);
        });
        let y = bn.forward_t(&x, true);
        let mean = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let rm = Vec::<f32>::try_from(&bn.inner.running_mean).unwrap();
        let mv = Vec::<f32>::try_from(&mean).unwrap();
        for (r, m) in rm.iter().zip(&mv) {
            assert!((*r as f64 - BN_MOMENTUM * *m as f64).abs() < 1e-6);
        }
        let centered = &x - mean.view([1, 2, 1, 1]);
        let var = centered
            .square()
            .mean_dim([0i64, 2, 3].as_slice(), true, Kind::Float);
        let w = bn.inner.ws.as_ref().unwrap().view([1, 2, 1, 1]);
        let b = bn.inner.bs.as_ref().unwrap().view([1, 2, 1, 1]);
        let want = centered / (var + BN_EPS).sqrt() * w + b;
        let diff = f64::try_from((y - want).abs().max()).unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
