//! Parallel, reproducible batching: mmdet's `GroupSampler` order (per seed and epoch), decoding
//! and augmentation on a rayon pool, a bounded prefetch queue fed by a producer thread, and
//! collation into padded normalized `(N, 3, H, W)` buffers. Every sample's randomness comes from
//! a ChaCha RNG keyed by (seed, epoch, position in the epoch), so results do not depend on thread
//! scheduling, and a loader can resume at any iteration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::coco::CocoDataset;
use crate::error::{DatasetError, Result};
use crate::mask::Masks;
use crate::pipeline::{self, pad_up, DetSample, ImageMeta, TestPipeline, TrainPipeline};

/// ChaCha RNG for one purpose keyed by `(seed, epoch, index)`.
pub fn keyed_rng(seed: u64, epoch: u64, index: u64, domain: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..32].copy_from_slice(&domain.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// mmdet `GroupSampler`: indices grouped by `flag` (aspect w/h > 1), each group shuffled and
/// padded to a multiple of `samples_per_gpu` by random repeats, then the chunks permuted.
/// Returns positions into `flags`.
pub fn group_sampler_order(
    flags: &[u8],
    samples_per_gpu: usize,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let mut rng = keyed_rng(seed, epoch, u64::MAX, 1);
    let mut all = Vec::new();
    for g in 0..=1u8 {
        let mut ind: Vec<usize> = (0..flags.len()).filter(|&i| flags[i] == g).collect();
        if ind.is_empty() {
            continue;
        }
        ind.shuffle(&mut rng);
        let n = ind.len().div_ceil(samples_per_gpu) * samples_per_gpu;
        let extra: Vec<usize> = (ind.len()..n)
            .map(|_| ind[rng.gen_range(0..ind.len())])
            .collect();
        ind.extend(extra);
        all.extend(ind);
    }
    let mut chunks: Vec<&[usize]> = all.chunks(samples_per_gpu).collect();
    chunks.shuffle(&mut rng);
    chunks.concat()
}

/// A source of training samples for the [`Loader`].
pub trait Source: Send + Sync + 'static {
    type Sample: Send + 'static;
    type Batch: Send + 'static;
    /// Number of items the sampler draws from.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Group of item `i` (0/1) for aspect-ratio grouping; one group disables grouping.
    fn group(&self, i: usize) -> u8;
    /// Load and augment item `i` with `rng`.
    fn load(&self, i: usize, rng: &mut ChaCha8Rng) -> Result<Self::Sample>;
    /// Collate samples into a batch (`epoch`, `iter` recorded in it).
    fn collate(&self, samples: Vec<Self::Sample>, epoch: usize, iter: usize) -> Self::Batch;
}

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Worker threads for decoding/augmentation (0 = all cores).
    pub threads: usize,
    /// Batches buffered ahead of the consumer.
    pub prefetch: usize,
    /// Skip (and count) samples whose image is missing, truncated or undecodable instead of
    /// failing.
    pub skip_missing: bool,
    /// Stop after this many epochs (`None` = run forever).
    pub max_epochs: Option<usize>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 2,
            seed: 0,
            threads: 0,
            prefetch: 4,
            skip_missing: false,
            max_epochs: None,
        }
    }
}

/// Parallel prefetching loader over epochs `start_epoch..`, starting at iteration `start_iter`
/// of the first epoch. Yields `Result<S::Batch>`.
pub struct Loader<S: Source> {
    rx: Receiver<Result<S::Batch>>,
    handle: Option<JoinHandle<()>>,
    skipped: Arc<AtomicUsize>,
    iters_per_epoch: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: Source> Loader<S> {
    pub fn new(
        source: Arc<S>,
        cfg: LoaderConfig,
        start_epoch: usize,
        start_iter: usize,
    ) -> Result<Self> {
        if source.is_empty() {
            return Err(DatasetError::Invalid("no training samples".into()));
        }
        let bs = cfg.batch_size.max(1);
        let flags: Vec<u8> = (0..source.len()).map(|i| source.group(i)).collect();
        let iters_per_epoch = {
            let g0 = flags.iter().filter(|&&f| f == 0).count();
            let g1 = flags.len() - g0;
            g0.div_ceil(bs) + g1.div_ceil(bs)
        };
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cnx-data-{i}"))
            .build()
            .map_err(|e| DatasetError::Invalid(format!("thread pool: {e}")))?;
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let skipped = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sk, st) = (skipped.clone(), stop.clone());
        // Batches processed together so that small batches still keep every thread busy.
        let group = threads.div_ceil(bs).max(1);
        let handle = std::thread::Builder::new()
            .name("cnx-data-producer".into())
            .spawn(move || {
                let mut epoch = start_epoch;
                let mut first = start_iter;
                loop {
                    if cfg.max_epochs.is_some_and(|m| epoch >= m) {
                        return;
                    }
                    let order = group_sampler_order(&flags, bs, cfg.seed, epoch as u64);
                    let nb = order.len() / bs;
                    let mut it = first;
                    while it < nb {
                        let end = (it + group).min(nb);
                        let jobs: Vec<(usize, usize)> =
                            (it * bs..end * bs).map(|p| (p, order[p])).collect();
                        let results: Vec<Result<S::Sample>> = pool.install(|| {
                            jobs.par_iter()
                                .map(|&(p, i)| {
                                    let mut rng = keyed_rng(cfg.seed, epoch as u64, p as u64, 0);
                                    source.load(i, &mut rng)
                                })
                                .collect()
                        });
                        let mut results = results.into_iter();
                        for b in it..end {
                            let mut samples = Vec::with_capacity(bs);
                            let mut err = None;
                            for r in results.by_ref().take(bs) {
                                match r {
                                    Ok(s) => samples.push(s),
                                    Err(e) if cfg.skip_missing && is_skippable(&e) => {
                                        sk.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) => err = err.or(Some(e)),
                                }
                            }
                            let msg = match err {
                                Some(e) => Err(e),
                                None if samples.is_empty() => continue,
                                None => Ok(pool.install(|| source.collate(samples, epoch, b))),
                            };
                            let failed = msg.is_err();
                            if tx.send(msg).is_err() || failed || st.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        it = end;
                    }
                    epoch += 1;
                    first = 0;
                }
            })
            .map_err(|e| DatasetError::Invalid(format!("producer thread: {e}")))?;
        Ok(Loader {
            rx,
            handle: Some(handle),
            skipped,
            iters_per_epoch,
            stop,
        })
    }

    /// Iterations (batches) per epoch.
    pub fn iters_per_epoch(&self) -> usize {
        self.iters_per_epoch
    }

    /// Samples skipped so far (with `skip_missing`).
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }
}

fn is_skippable(e: &DatasetError) -> bool {
    matches!(
        e,
        DatasetError::MissingImage(_)
            | DatasetError::TruncatedImage(_)
            | DatasetError::Decode { .. }
            | DatasetError::SizeMismatch { .. }
            | DatasetError::LabelSize { .. }
            | DatasetError::Io { .. }
    )
}

impl<S: Source> Iterator for Loader<S> {
    type Item = Result<S::Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl<S: Source> Drop for Loader<S> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Drain so a producer blocked on a full queue wakes up and sees `stop`.
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.handle.take() {
            // Replace the receiver to disconnect the channel, then join.
            let (_tx, rx) = sync_channel(1);
            drop(std::mem::replace(&mut self.rx, rx));
            let _ = h.join();
        }
    }
}

/// Targets of one image in a detection batch.
#[derive(Clone, Debug, Default)]
pub struct DetTargets {
    /// `x1, y1, x2, y2` in padded-image pixels.
    pub boxes: Vec<f32>,
    /// Contiguous labels 0..K-1, one per box.
    pub labels: Vec<i64>,
    /// Crowd (ignored) boxes, `x1, y1, x2, y2`.
    pub ignore: Vec<f32>,
    /// Instance masks (compact), canvas = the image's `pad_shape`; use
    /// [`Masks::crop_and_resize`] for 28x28 targets.
    pub masks: Masks,
}

impl DetTargets {
    pub fn num_boxes(&self) -> usize {
        self.labels.len()
    }
}

/// A detection batch: normalized images padded to the largest one (multiple of 32).
#[derive(Clone, Debug)]
pub struct DetBatch {
    /// `(N, 3, H, W)` row-major.
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub targets: Vec<DetTargets>,
    pub metas: Vec<ImageMeta>,
    pub epoch: usize,
    /// Iteration within the epoch.
    pub iter: usize,
}

/// Collate samples: normalize each image into a zero-padded `(N, 3, H, W)` buffer.
pub fn collate_det(
    samples: Vec<DetSample>,
    size_divisor: usize,
    epoch: usize,
    iter: usize,
) -> DetBatch {
    let ph = pad_up(
        samples.iter().map(|s| s.img.h).max().unwrap_or(1),
        size_divisor,
    );
    let pw = pad_up(
        samples.iter().map(|s| s.img.w).max().unwrap_or(1),
        size_divisor,
    );
    let n = samples.len();
    let mut images = vec![0f32; n * 3 * ph * pw];
    images
        .par_chunks_mut(3 * ph * pw)
        .zip(samples.par_iter())
        .for_each(|(dst, s)| pipeline::normalize_into(&s.img, dst, pw, ph));
    let mut targets = Vec::with_capacity(n);
    let mut metas = Vec::with_capacity(n);
    for s in samples {
        targets.push(DetTargets {
            boxes: s.boxes.iter().flatten().copied().collect(),
            labels: s.labels,
            ignore: s.ignore.iter().flatten().copied().collect(),
            masks: s.masks,
        });
        metas.push(s.meta);
    }
    DetBatch {
        images,
        shape: [n, 3, ph, pw],
        targets,
        metas,
        epoch,
        iter,
    }
}

/// The COCO training source: the filtered training images of a dataset and the train pipeline.
pub struct CocoTrain {
    pub ds: Arc<CocoDataset>,
    pub pipeline: TrainPipeline,
    /// Dataset indices drawn from (mmdet's training filter by default).
    pub indices: Vec<usize>,
}

impl CocoTrain {
    pub fn new(ds: Arc<CocoDataset>, pipeline: TrainPipeline) -> Self {
        let indices = ds.train_indices();
        CocoTrain {
            ds,
            pipeline,
            indices,
        }
    }
}

impl Source for CocoTrain {
    type Sample = DetSample;
    type Batch = DetBatch;
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn group(&self, i: usize) -> u8 {
        let im = &self.ds.images[self.indices[i]];
        (im.width as f64 / im.height as f64 > 1.0) as u8
    }
    fn load(&self, i: usize, rng: &mut ChaCha8Rng) -> Result<DetSample> {
        self.pipeline.run(&self.ds, self.indices[i], rng)
    }
    fn collate(&self, samples: Vec<DetSample>, epoch: usize, iter: usize) -> DetBatch {
        collate_det(samples, self.pipeline.size_divisor, epoch, iter)
    }
}

/// Sequential test-time iterator over every image of a dataset (no filtering), `batch_size`
/// images per batch, decoded in parallel on the global rayon pool.
pub struct TestIter {
    ds: Arc<CocoDataset>,
    pipeline: TestPipeline,
    batch_size: usize,
    pos: usize,
    pub with_masks: bool,
}

impl TestIter {
    pub fn new(ds: Arc<CocoDataset>, pipeline: TestPipeline, batch_size: usize) -> Self {
        TestIter {
            ds,
            pipeline,
            batch_size: batch_size.max(1),
            pos: 0,
            with_masks: false,
        }
    }
}

impl Iterator for TestIter {
    type Item = Result<DetBatch>;
    fn next(&mut self) -> Option<Result<DetBatch>> {
        let n = self.ds.images.len();
        if self.pos >= n {
            return None;
        }
        let end = (self.pos + self.batch_size).min(n);
        let it = self.pos / self.batch_size;
        let samples: Result<Vec<DetSample>> = (self.pos..end)
            .into_par_iter()
            .map(|i| self.pipeline.run(&self.ds, i, self.with_masks))
            .collect();
        self.pos = end;
        Some(samples.map(|s| collate_det(s, self.pipeline.size_divisor, 0, it)))
    }
}
