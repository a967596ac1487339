//! Parallel, reproducible batching: mmdet's `GroupSampler` order (per seed and epoch), decoding
//! and augmentation on a rayon pool, a bounded prefetch queue fed by a producer thread, and
//! collation into padded normalized `(N, 3, H, W)` buffers. Every sample's randomness comes from
//! a ChaCha RNG keyed by (seed, epoch, position in the epoch), so results do not depend on thread
//! scheduling, and a loader can resume at any iteration. A sample whose image cannot be read is
//! replaced by another of its aspect group drawn from the same keyed RNG ([`load_or_replace`]),
//! so even a run over a damaged dataset stays reproducible and independent of thread count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
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
    /// failing; the batch comes out smaller.
    pub skip_missing: bool,
    /// Replace a sample whose image (or label map) cannot be read by another sample of the same
    /// aspect group ([`load_or_replace`]): batches keep their size. Takes precedence over
    /// `skip_missing`.
    pub replace_broken: bool,
    /// Where the unreadable samples met are recorded; shared by every loader built from clones of
    /// this config (a run builds a new loader at each epoch).
    pub broken: Arc<BrokenLog>,
    /// Stop after this many epochs (`None` = run forever).
    pub max_epochs: Option<usize>,
    /// Data-parallel replicas (processes) sharing each global batch, and this one's rank. The
    /// sampler orders the epoch in global batches of `batch_size x replicas` images (one aspect
    /// group each, as mmdet's group samplers intend) and replica `rank` takes images
    /// `rank*batch_size ..` of every global batch, so the order (and each image's augmentation,
    /// keyed by its global position) does not depend on how the global batch is split.
    pub replicas: usize,
    pub rank: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 2,
            seed: 0,
            threads: 0,
            prefetch: 4,
            skip_missing: false,
            replace_broken: false,
            broken: Arc::new(BrokenLog::default()),
            replicas: 1,
            rank: 0,
            max_epochs: None,
        }
    }
}

/// A training sample that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenSample {
    /// Position in the source (what [`Source::load`] takes).
    pub index: usize,
    /// The unreadable file (image or label map), or the sample index when the error names none.
    pub file: String,
    /// Why it could not be read.
    pub error: String,
}

/// The unreadable samples a loader met: each one recorded once, with the ones not yet reported
/// kept for [`BrokenLog::take_new`], and the number of replacements made.
#[derive(Debug, Default)]
pub struct BrokenLog {
    inner: Mutex<BrokenInner>,
}

#[derive(Debug, Default)]
struct BrokenInner {
    known: BTreeMap<usize, BrokenSample>,
    unreported: Vec<BrokenSample>,
    replacements: usize,
}

impl BrokenLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, BrokenInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record that sample `index` failed with `e` (once per sample).
    pub fn record(&self, index: usize, e: &DatasetError) {
        let mut g = self.lock();
        if g.known.contains_key(&index) {
            return;
        }
        let b = BrokenSample {
            index,
            file: e
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("sample {index}")),
            error: e.to_string(),
        };
        g.known.insert(index, b.clone());
        g.unreported.push(b);
    }

    /// Whether sample `index` is known to be unreadable.
    pub fn is_known(&self, index: usize) -> bool {
        self.lock().known.contains_key(&index)
    }

    /// The samples recorded since the last call, in the order they were met.
    pub fn take_new(&self) -> Vec<BrokenSample> {
        std::mem::take(&mut self.lock().unreported)
    }

    /// Every unreadable sample recorded, by index.
    pub fn all(&self) -> Vec<BrokenSample> {
        self.lock().known.values().cloned().collect()
    }

    /// Samples replaced so far (a broken image drawn in several epochs counts each time).
    pub fn replacements(&self) -> usize {
        self.lock().replacements
    }
}

/// Load item `i`, drawn at position `p` of epoch `epoch`'s order, with the augmentation RNG of
/// that position. When it cannot be read ([`DatasetError::is_unreadable_input`]) and a
/// `broken` log is given (replacement on), the failure is recorded there and the other items of `i`'s aspect group
/// (`flags`) are tried in an order shuffled by `keyed_rng(seed, epoch, p, 2)`, each with the
/// position's augmentation RNG, until one loads. The choice depends only on (seed, epoch, p) and
/// on which files are unreadable, never on threads or timing; a position whose item is readable
/// is loaded exactly as without this rule. Known-broken items are passed over without a retry
/// (the same outcome as failing again). Fails when every item of the group is unreadable.
pub fn load_or_replace<S: Source>(
    source: &S,
    flags: &[u8],
    i: usize,
    seed: u64,
    epoch: u64,
    p: u64,
    broken: Option<&BrokenLog>,
) -> Result<S::Sample> {
    let Some(broken) = broken else {
        return source.load(i, &mut keyed_rng(seed, epoch, p, 0));
    };
    let first = if broken.is_known(i) {
        None
    } else {
        let mut rng = keyed_rng(seed, epoch, p, 0);
        match source.load(i, &mut rng) {
            Ok(s) => return Ok(s),
            Err(e) if e.is_unreadable_input() => {
                broken.record(i, &e);
                Some(e)
            }
            Err(e) => return Err(e),
        }
    };
    let g = flags[i];
    let mut candidates: Vec<usize> = (0..flags.len())
        .filter(|&j| j != i && flags[j] == g)
        .collect();
    candidates.shuffle(&mut keyed_rng(seed, epoch, p, 2));
    for &j in &candidates {
        if broken.is_known(j) {
            continue;
        }
        let mut rng = keyed_rng(seed, epoch, p, 0);
        match source.load(j, &mut rng) {
            Ok(s) => {
                broken.lock().replacements += 1;
                return Ok(s);
            }
            Err(e) if e.is_unreadable_input() => broken.record(j, &e),
            Err(e) => return Err(e),
        }
    }
    let what = match first {
        Some(e) => e.to_string(),
        None => broken
            .all()
            .into_iter()
            .find(|b| b.index == i)
            .map(|b| b.error)
            .unwrap_or_else(|| format!("sample {i} is unreadable")),
    };
    let group = if flags.iter().any(|&f| f != g) {
        format!(
            "of its aspect group ({}, {} images)",
            if g == 1 {
                "landscape"
            } else {
                "portrait or square"
            },
            candidates.len() + 1
        )
    } else {
        format!("of the training set ({} images)", candidates.len() + 1)
    };
    Err(DatasetError::Invalid(format!(
        "{what}; no other image {group} could be read in its place (`cnx data check` lists every problem)"
    )))
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
        let replicas = cfg.replicas.max(1);
        if cfg.rank >= replicas {
            return Err(DatasetError::Invalid(format!(
                "rank {} of {replicas} replicas",
                cfg.rank
            )));
        }
        // The global batch: what one optimizer step sees over all replicas.
        let gbs = bs * replicas;
        let flags: Vec<u8> = (0..source.len()).map(|i| source.group(i)).collect();
        let iters_per_epoch = {
            let g0 = flags.iter().filter(|&&f| f == 0).count();
            let g1 = flags.len() - g0;
            g0.div_ceil(gbs) + g1.div_ceil(gbs)
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
                    let order = group_sampler_order(&flags, gbs, cfg.seed, epoch as u64);
                    let nb = order.len() / gbs;
                    let mut it = first;
                    while it < nb {
                        let end = (it + group).min(nb);
                        // This replica's slice of each global batch, by global position.
                        let jobs: Vec<(usize, usize)> = (it..end)
                            .flat_map(|b| {
                                let p0 = b * gbs + cfg.rank * bs;
                                p0..p0 + bs
                            })
                            .map(|p| (p, order[p]))
                            .collect();
                        let results: Vec<Result<S::Sample>> = pool.install(|| {
                            jobs.par_iter()
                                .map(|&(p, i)| {
                                    load_or_replace(
                                        &*source,
                                        &flags,
                                        i,
                                        cfg.seed,
                                        epoch as u64,
                                        p as u64,
                                        cfg.replace_broken.then_some(&*cfg.broken),
                                    )
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
    e.is_unreadable_input()
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

/// A detection batch: images padded to the largest one (multiple of 32).
#[derive(Clone, Debug)]
pub struct DetBatch {
    /// `(N, 3, H, W)` row-major RGB bytes, zero padded: normalised on the device
    /// ([`crate::pipeline::chw_into`]).
    pub images: Vec<u8>,
    pub shape: [usize; 4],
    /// `(h, w)` of each image before padding (where its normalised pixels end).
    pub sizes: Vec<(usize, usize)>,
    pub targets: Vec<DetTargets>,
    pub metas: Vec<ImageMeta>,
    pub epoch: usize,
    /// Iteration within the epoch.
    pub iter: usize,
}

/// Collate samples: each image into a zero-padded `(N, 3, H, W)` byte buffer.
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
    let mut images = vec![0u8; n * 3 * ph * pw];
    images
        .par_chunks_mut(3 * ph * pw)
        .zip(samples.par_iter())
        .for_each(|(dst, s)| pipeline::chw_into(&s.img, dst, pw, ph));
    let sizes = samples.iter().map(|s| (s.img.h, s.img.w)).collect();
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
        sizes,
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
    /// Leave out images that cannot be read (recorded in `skipped`) instead of failing the batch.
    pub skip_broken: bool,
    /// Images left out (with `skip_broken`), in dataset order.
    pub skipped: Vec<BrokenSample>,
    /// Stop after the first `limit` images of the dataset (quick checks); `None` = all.
    pub limit: Option<usize>,
    /// Only batches `b` with `b % world == rank` (`(rank, world)`): one rank's share of a
    /// sharded evaluation.
    pub shard: Option<(usize, usize)>,
}

impl TestIter {
    pub fn new(ds: Arc<CocoDataset>, pipeline: TestPipeline, batch_size: usize) -> Self {
        TestIter {
            ds,
            pipeline,
            batch_size: batch_size.max(1),
            pos: 0,
            with_masks: false,
            skip_broken: false,
            skipped: Vec::new(),
            limit: None,
            shard: None,
        }
    }
}

impl Iterator for TestIter {
    type Item = Result<DetBatch>;
    fn next(&mut self) -> Option<Result<DetBatch>> {
        let n = self.ds.images.len().min(self.limit.unwrap_or(usize::MAX));
        let (rank, world) = self.shard.unwrap_or((0, 1));
        let world = world.max(1);
        // Sharded by batch: batch `b` (images b*bs..) is rank `b % world`'s, so every batch is
        // padded exactly as one process pads it. `pos` counts this rank's batches.
        loop {
            let b = rank + self.pos * world;
            let start = b * self.batch_size;
            if start >= n {
                return None;
            }
            let end = (start + self.batch_size).min(n);
            let it = b;
            self.pos += 1;
            let idx: Vec<usize> = (start..end).collect();
            let results: Vec<Result<DetSample>> = idx
                .par_iter()
                .map(|&i| self.pipeline.run(&self.ds, i, self.with_masks))
                .collect();
            let mut samples = Vec::with_capacity(results.len());
            for (i, r) in idx.into_iter().zip(results) {
                match r {
                    Ok(s) => samples.push(s),
                    Err(e) if self.skip_broken && e.is_unreadable_input() => {
                        self.skipped.push(BrokenSample {
                            index: i,
                            file: self.ds.images[i].file_name.clone(),
                            error: e.to_string(),
                        })
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
            if !samples.is_empty() {
                return Some(Ok(collate_det(samples, self.pipeline.size_divisor, 0, it)));
            }
        }
    }
}

#[cfg(test)]
mod replace_tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    /// Items `0..n` with the given groups; `broken` ones fail as truncated files. A sample is
    /// `(item, first draw of its rng)` so the augmentation RNG it was given can be checked.
    struct Fake {
        groups: Vec<u8>,
        broken: BTreeSet<usize>,
    }

    impl Source for Fake {
        type Sample = (usize, u64);
        type Batch = Vec<(usize, u64)>;
        fn len(&self) -> usize {
            self.groups.len()
        }
        fn group(&self, i: usize) -> u8 {
            self.groups[i]
        }
        fn load(&self, i: usize, rng: &mut ChaCha8Rng) -> Result<(usize, u64)> {
            if self.broken.contains(&i) {
                return Err(DatasetError::TruncatedImage(PathBuf::from(format!(
                    "img{i}.jpg"
                ))));
            }
            Ok((i, rng.gen()))
        }
        fn collate(&self, s: Vec<(usize, u64)>, _epoch: usize, _iter: usize) -> Self::Batch {
            s
        }
    }

    fn fake(n: usize, broken: &[usize]) -> Fake {
        Fake {
            groups: (0..n).map(|i| (i % 3 == 0) as u8).collect(),
            broken: broken.iter().copied().collect(),
        }
    }

    #[test]
    fn replacement_is_another_item_of_the_same_group_and_deterministic() {
        let src = fake(30, &[3, 4]);
        let flags: Vec<u8> = (0..30).map(|i| src.group(i)).collect();
        let mut seen = BTreeSet::new();
        for p in 0..20u64 {
            for &i in &[3usize, 4] {
                let log = BrokenLog::default();
                let (j, draw) = load_or_replace(&src, &flags, i, 7, 1, p, Some(&log)).unwrap();
                assert_ne!(j, i);
                assert!(!src.broken.contains(&j));
                assert_eq!(flags[j], flags[i], "item {j} replaced {i} across groups");
                // The replacement gets the augmentation RNG of the position.
                assert_eq!(draw, keyed_rng(7, 1, p, 0).gen::<u64>());
                // Same key, same choice: with a fresh log and with one that knows more.
                let again = load_or_replace(&src, &flags, i, 7, 1, p, Some(&log)).unwrap();
                assert_eq!(again.0, j);
                let other = BrokenLog::default();
                other.record(4, &DatasetError::TruncatedImage("img4.jpg".into()));
                other.record(3, &DatasetError::TruncatedImage("img3.jpg".into()));
                let known = load_or_replace(&src, &flags, i, 7, 1, p, Some(&other)).unwrap();
                assert_eq!(known.0, j);
                assert_eq!(log.all().iter().map(|b| b.index).collect::<Vec<_>>(), [i]);
                assert_eq!(log.replacements(), 2);
                seen.insert((i, j));
            }
        }
        // The key spreads the replacements over the group rather than always picking one.
        assert!(seen.len() > 4, "{seen:?}");
        // Readable items load as without the rule.
        let log = BrokenLog::default();
        assert_eq!(
            load_or_replace(&src, &flags, 5, 7, 1, 9, Some(&log)).unwrap(),
            load_or_replace(&src, &flags, 5, 7, 1, 9, None).unwrap()
        );
        assert!(log.all().is_empty());
        // Without a log the error comes back as it was.
        let e = load_or_replace(&src, &flags, 3, 7, 1, 9, None).unwrap_err();
        assert!(matches!(e, DatasetError::TruncatedImage(_)), "{e}");
    }

    #[test]
    fn gives_up_when_every_image_of_the_group_is_broken() {
        // Group 1 = items 0, 3, 6, 9: all broken; group 0 is fine.
        let src = fake(10, &[0, 3, 6, 9]);
        let flags: Vec<u8> = (0..10).map(|i| src.group(i)).collect();
        let log = BrokenLog::default();
        let e = load_or_replace(&src, &flags, 6, 0, 0, 0, Some(&log)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("img6.jpg") && m.contains("aspect group") && m.contains("4 images"),
            "{m}"
        );
        assert_eq!(log.all().len(), 4);
        // Each broken file is reported once.
        assert_eq!(log.take_new().len(), 4);
        assert!(log.take_new().is_empty());
        // A known-broken item fails the same way without being read again.
        let e = load_or_replace(&src, &flags, 3, 0, 0, 5, Some(&log)).unwrap_err();
        assert!(e.to_string().contains("img3.jpg"), "{e}");
        assert!(log.take_new().is_empty());
    }

    #[test]
    fn replicas_split_each_global_batch_without_changing_the_order() {
        // 1 process x 4 images per step vs 2 replicas x 2 and 4 replicas x 1: rank r's batch b is
        // images r*k.. of the single process's batch b, with the same augmentation draws, from a
        // resumed position too.
        let run = |replicas: usize, rank: usize, start_iter: usize| {
            let cfg = LoaderConfig {
                batch_size: 4 / replicas,
                seed: 5,
                threads: 2,
                max_epochs: Some(2),
                replicas,
                rank,
                ..Default::default()
            };
            let l = Loader::new(Arc::new(fake(23, &[])), cfg, 0, start_iter).unwrap();
            let ipe = l.iters_per_epoch();
            (ipe, l.map(|b| b.unwrap()).collect::<Vec<_>>())
        };
        let (ipe, one) = run(1, 0, 0);
        for replicas in [2, 4] {
            type Run = (usize, Vec<Vec<(usize, u64)>>);
            let ranks: Vec<Run> = (0..replicas).map(|r| run(replicas, r, 0)).collect();
            for (r, (ipe_r, batches)) in ranks.iter().enumerate() {
                assert_eq!(*ipe_r, ipe, "iterations per epoch are the global batch's");
                assert_eq!(batches.len(), one.len());
                let k = 4 / replicas;
                for (b, (mine, all)) in batches.iter().zip(&one).enumerate() {
                    assert_eq!(mine[..], all[r * k..(r + 1) * k], "replica {r}, batch {b}");
                }
            }
        }
        let (_, resumed) = run(2, 1, 3);
        let (_, full) = run(2, 1, 0);
        assert_eq!(resumed[..], full[3..]);
        assert!(Loader::new(
            Arc::new(fake(4, &[])),
            LoaderConfig {
                replicas: 2,
                rank: 2,
                ..Default::default()
            },
            0,
            0
        )
        .is_err());
    }

    #[test]
    fn loader_keeps_batches_full_and_order_independent_of_threads() {
        let run = |broken: &[usize], threads: usize| {
            let cfg = LoaderConfig {
                batch_size: 2,
                seed: 3,
                threads,
                prefetch: 2,
                replace_broken: true,
                max_epochs: Some(2),
                ..Default::default()
            };
            let log = cfg.broken.clone();
            let batches: Vec<Vec<(usize, u64)>> =
                Loader::new(Arc::new(fake(13, broken)), cfg, 0, 0)
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect();
            (batches, log.all().len(), log.replacements())
        };
        let (clean, n, r) = run(&[], 1);
        assert_eq!((n, r), (0, 0));
        let (bad, n, r) = run(&[2, 9], 1);
        let (bad4, n4, r4) = run(&[2, 9], 4);
        assert_eq!(bad, bad4, "thread count changed the data");
        assert_eq!((n, n4), (2, 2));
        // Two broken images, each drawn once per epoch (group padding may add more draws).
        assert!(r >= 4 && r == r4, "{r} {r4}");
        assert_eq!(clean.len(), bad.len());
        let mut differ = 0;
        for (c, b) in clean.iter().zip(&bad) {
            assert_eq!(b.len(), 2, "batches keep their size");
            for (x, y) in c.iter().zip(b) {
                if [2, 9].contains(&x.0) {
                    assert_ne!(y.0, x.0);
                    assert_eq!(y.1, x.1, "the replacement gets the position's rng");
                    differ += 1;
                } else {
                    assert_eq!(x, y, "readable samples are untouched");
                }
            }
        }
        assert_eq!(differ, r);
    }
}
