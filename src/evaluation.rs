//! COCO evaluation of a detector, one loop for every caller: `cnx test`, the training tasks'
//! validation and the demo. Batches of test-pipeline images (padded together as mmdet does),
//! unreadable images skipped and named, detections as COCO result records, then cnx-eval's
//! COCOeval (pycocotools' numbers) against the whole annotation file. Under data parallel
//! ([`Shard`]) each rank runs every world-th image and rank 0 gathers the records back into the
//! single-process order, so the numbers are exactly a single process's.

use crate::results::{to_coco, CocoResult};
use anyhow::{Context, Result};
use cnx_datasets::loader::{BrokenSample, TestIter};
use cnx_datasets::pipeline::TestPipeline;
use cnx_datasets::CocoDataset;
use cnx_eval::coco::{evaluate, parse_results, CocoGt, IouType, Summary};
use cnx_heads::TwoStageDetector;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use tch::Device;

/// One rank's part of a sharded evaluation: batches (or images) `i % world == rank`, results
/// gathered to every rank (rank 0 evaluates and writes).
#[derive(Clone)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    gather: Rc<AllGather>,
}

/// Every rank's bytes, in rank order.
type AllGather = dyn Fn(&[u8]) -> Result<Vec<Vec<u8>>>;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({} of {})", self.rank, self.world)
    }
}

impl Shard {
    /// `gather` returns every rank's bytes in rank order (an all-gather).
    pub fn new(
        rank: usize,
        world: usize,
        gather: impl Fn(&[u8]) -> Result<Vec<Vec<u8>>> + 'static,
    ) -> Self {
        Shard {
            rank,
            world,
            gather: Rc::new(gather),
        }
    }
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    /// Whether item (batch or image) `i` is this rank's.
    pub fn owns(&self, i: usize) -> bool {
        i % self.world == self.rank
    }
    /// Every rank's `value`, in rank order.
    pub fn gather<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        value: &T,
    ) -> Result<Vec<T>> {
        let all = (self.gather)(&serde_json::to_vec(value)?)?;
        all.iter().map(|b| Ok(serde_json::from_slice(b)?)).collect()
    }
}

/// How [`coco_inference`] runs.
#[derive(Debug, Clone)]
pub struct InferenceOpts {
    pub pipeline: TestPipeline,
    /// Images per forward pass. With equal padded shapes the detections equal batch 1's; images
    /// of different sizes are padded to the largest, which moves the features near the smaller
    /// images' bottom/right border slightly (as in mmdet).
    pub batch_size: usize,
    /// Only the first `limit` images of the dataset.
    pub limit: Option<usize>,
    pub device: Device,
    /// A progress bar with images/s on stderr.
    pub progress: bool,
    /// This rank's share under data parallel (`None`: every image).
    pub shard: Option<Shard>,
}

/// What a pass over a dataset produced.
#[derive(Debug, Default)]
pub struct CocoInference {
    pub results: Vec<CocoResult>,
    /// Images run through the model.
    pub images: usize,
    /// Images that could not be read, named with the reason ([`report_skipped`]).
    pub skipped: Vec<BrokenSample>,
}

/// Run `det` over `ds` (category ids from the dataset's own categories).
pub fn coco_inference(
    det: &TwoStageDetector,
    ds: &Arc<CocoDataset>,
    opts: &InferenceOpts,
) -> Result<CocoInference> {
    if ds.num_classes() as i64 != det.num_classes() {
        anyhow::bail!(
            "the dataset has {} categories but the detector predicts {} classes (labels could not \
             be mapped to category ids); use an annotation file with the model's categories",
            ds.num_classes(),
            det.num_classes()
        );
    }
    let mut batches = TestIter::new(ds.clone(), opts.pipeline.clone(), opts.batch_size);
    batches.skip_broken = true;
    batches.limit = opts.limit;
    batches.shard = opts.shard.as_ref().map(|s| (s.rank, s.world));
    let n = opts.limit.unwrap_or(usize::MAX).min(ds.images.len());
    let n = match &opts.shard {
        // This rank's batches' images (the progress bar's length).
        Some(s) => (0..n)
            .filter(|i| s.owns(i / opts.batch_size.max(1)))
            .count(),
        None => n,
    };
    let pb = if opts.progress {
        let pb = ProgressBar::new(n as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("progress template"),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let t0 = std::time::Instant::now();
    let mut out = CocoInference::default();
    while let Some(b) = batches.next() {
        let b = b?;
        let dets = crate::adapters::predict_batch(det, &b, opts.device);
        for (d, m) in dets.iter().zip(&b.metas) {
            out.results
                .extend(to_coco(d, m.image_id, Some(&m.file_name), &|l| {
                    ds.label_to_cat(l as usize)
                }));
        }
        out.images += b.metas.len();
        pb.set_position((out.images + batches.skipped.len()) as u64);
        pb.set_message(format!(
            "{:.2} img/s",
            out.images as f64 / t0.elapsed().as_secs_f64()
        ));
    }
    pb.finish_and_clear();
    out.skipped = batches.skipped;
    match &opts.shard {
        None => Ok(out),
        Some(s) => gather_shards(s, ds, out),
    }
}

/// Every rank's records and skipped images, in the order one process makes them: by dataset
/// position, each image's records as its rank produced them (COCOeval's stable sort by score
/// keeps ties in this order, so the numbers equal a single process's exactly).
fn gather_shards(s: &Shard, ds: &CocoDataset, mine: CocoInference) -> Result<CocoInference> {
    type Part = (Vec<CocoResult>, usize, Vec<(usize, String, String)>);
    let part: Part = (
        mine.results,
        mine.images,
        mine.skipped
            .into_iter()
            .map(|b| (b.index, b.file, b.error))
            .collect(),
    );
    let parts = s.gather(&part)?;
    let position: std::collections::HashMap<i64, usize> = ds
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.id, i))
        .collect();
    let mut out = CocoInference::default();
    for (results, images, skipped) in parts {
        out.results.extend(results);
        out.images += images;
        out.skipped.extend(
            skipped
                .into_iter()
                .map(|(index, file, error)| BrokenSample { index, file, error }),
        );
    }
    out.results
        .sort_by_key(|r| position.get(&r.image_id).copied().unwrap_or(usize::MAX));
    out.skipped.sort_by_key(|b| b.index);
    Ok(out)
}

/// Name every image an evaluation left out (`what`: "" or e.g. "validation "), then the count;
/// returns the count.
pub fn report_skipped(skipped: &[BrokenSample], what: &str) -> usize {
    for b in skipped {
        eprintln!("skipping {what}image {}: {}", b.file, b.error);
    }
    if !skipped.is_empty() {
        eprintln!(
            "{} {what}images could not be read and were skipped",
            skipped.len()
        );
    }
    skipped.len()
}

/// The per-class areas of every rank's share added up (they are sums, so rank 0 gets a single
/// process's counts exactly) with every rank's skipped images in dataset order; `None` on the
/// other ranks.
pub fn gather_miou(
    shard: &Shard,
    acc: &cnx_eval::miou::Accumulator,
    skipped: &[BrokenSample],
) -> Result<Option<(cnx_eval::miou::Accumulator, Vec<BrokenSample>)>> {
    type Part = (
        Vec<u64>,
        Vec<u64>,
        Vec<u64>,
        Vec<u64>,
        usize,
        Vec<(usize, String, String)>,
    );
    let part: Part = (
        acc.intersect.clone(),
        acc.union.clone(),
        acc.pred_area.clone(),
        acc.label_area.clone(),
        acc.num_images,
        skipped
            .iter()
            .map(|b| (b.index, b.file.clone(), b.error.clone()))
            .collect(),
    );
    let parts = shard.gather(&part)?;
    if !shard.is_main() {
        return Ok(None);
    }
    let mut all = acc.clone();
    all.intersect.iter_mut().for_each(|v| *v = 0);
    all.union.iter_mut().for_each(|v| *v = 0);
    all.pred_area.iter_mut().for_each(|v| *v = 0);
    all.label_area.iter_mut().for_each(|v| *v = 0);
    all.num_images = 0;
    let mut broken = Vec::new();
    for (i, u, p, l, n, sk) in parts {
        let mut a = all.clone();
        (
            a.intersect,
            a.union,
            a.pred_area,
            a.label_area,
            a.num_images,
        ) = (i, u, p, l, n);
        all.merge(&a);
        broken.extend(sk.into_iter().map(|(index, file, error)| BrokenSample {
            index,
            file,
            error,
        }));
    }
    broken.sort_by_key(|b| b.index);
    Ok(Some((all, broken)))
}

/// Write `results` to `out` and evaluate them against all of `ann`'s ground truth (skipped or
/// un-run images count as missed), one pycocotools summary per type.
pub fn coco_evaluate(
    ann: &Path,
    results: &[CocoResult],
    out: &Path,
    types: &[IouType],
) -> Result<Vec<(IouType, Summary)>> {
    let bytes = serde_json::to_vec(results)?;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    let gt = CocoGt::load(ann).with_context(|| format!("reading {}", ann.display()))?;
    let dets = parse_results(&bytes, &out.display().to_string())?;
    types
        .iter()
        .map(|&t| Ok((t, evaluate(&gt, &dets, t)?.summary)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generated COCO set whose images all share one file (so one padded shape) and a small
    /// randomly initialised detector with its six classes.
    fn same_size_set(dir: &Path, n: usize) -> Arc<CocoDataset> {
        cnx_datasets::synth::coco(dir, 5, 3).unwrap();
        let ann_path = dir.join("annotations/instances_train.json");
        let mut ann: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ann_path).unwrap()).unwrap();
        let first = ann["images"][0].clone();
        let images: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                let mut im = first.clone();
                im["id"] = serde_json::json!(i + 1);
                im
            })
            .collect();
        ann["images"] = serde_json::Value::Array(images);
        ann["annotations"] = serde_json::json!([]);
        let same = dir.join("same.json");
        std::fs::write(&same, serde_json::to_vec(&ann).unwrap()).unwrap();
        Arc::new(CocoDataset::load(&same, dir.join("train")).unwrap())
    }

    #[test]
    fn batched_inference_equals_batch_one_when_padded_shapes_are_equal() {
        let tmp = std::env::temp_dir().join(format!("cnx-eval-batch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ds = same_size_set(&tmp, 4);
        let cfg = crate::engine::presets::find("demo_mask_rcnn_convnext_nano")
            .unwrap()
            .config();
        tch::manual_seed(7);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let det = crate::engine::tasks::build_detector(&vs.root(), &cfg).unwrap();
        let run = |batch_size| {
            let opts = InferenceOpts {
                pipeline: TestPipeline {
                    scale: (320, 512),
                    size_divisor: 32,
                },
                batch_size,
                limit: None,
                device: Device::Cpu,
                progress: false,
                shard: None,
            };
            coco_inference(&det, &ds, &opts).unwrap()
        };
        let (one, two) = (run(1), run(3));
        assert_eq!((one.images, two.images), (4, 4));
        assert!(!one.results.is_empty(), "a random detector still detects");
        assert_eq!(one.results.len(), two.results.len());
        for (a, b) in one.results.iter().zip(&two.results) {
            assert_eq!((a.image_id, a.category_id), (b.image_id, b.category_id));
            for k in 0..4 {
                assert!((a.bbox[k] - b.bbox[k]).abs() < 1e-3, "{a:?} vs {b:?}");
            }
            assert!((a.score - b.score).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
