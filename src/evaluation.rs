//! COCO evaluation of a detector, one loop for every caller: `cnx test`, the training tasks'
//! validation and the demo. Batches of test-pipeline images (padded together as mmdet does),
//! unreadable images skipped and named, detections as COCO result records, then cnx-eval's
//! COCOeval (pycocotools' numbers) against the whole annotation file.

use crate::results::{to_coco, CocoResult};
use anyhow::{Context, Result};
use cnx_datasets::loader::{BrokenSample, TestIter};
use cnx_datasets::pipeline::TestPipeline;
use cnx_datasets::CocoDataset;
use cnx_eval::coco::{evaluate, parse_results, CocoGt, IouType, Summary};
use cnx_heads::TwoStageDetector;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::sync::Arc;
use tch::Device;

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
    let n = opts.limit.unwrap_or(usize::MAX).min(ds.images.len());
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
