//! `cnx test --weights W --coco ANN.json --images DIR [--out RES.json] [--eval bbox segm]`:
//! run a detector over a COCO-format dataset (test pipeline 1333x800, progress bar), write the
//! COCO results file and evaluate it with cnx-eval (pycocotools' numbers). The model comes from
//! the checkpoint itself (cnx checkpoints record their config and classes), `--config`,
//! `--work-dir`, or `--preset` for published mmdet / mmseg files ([`crate::model_source`]).
//! Images that cannot be read are named, counted and skipped. Segmentors run ADE-layout data
//! through `cmd::seg`.

use crate::evaluation::{coco_evaluate, coco_inference, InferenceOpts};
use crate::model_source::ModelSource;
use anyhow::{bail, Context, Result};
use cnx_datasets::pipeline::TestPipeline;
use cnx_datasets::CocoDataset;
use cnx_eval::coco::{IouType, Summary};
use cnx_heads::TwoStageDetector;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A paper preset (`cnx presets`), for mmdet / mmseg checkpoints; cnx checkpoints need none.
    #[arg(long)]
    pub preset: Option<String>,
    /// Weights: a cnx checkpoint (`iter_N.safetensors`, `best_*.safetensors`), or with --preset
    /// an mmdet / mmseg .pth or `cnx convert` safetensors. Default with --work-dir: its latest.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The training config the model was built from (instead of the one in the weights).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A training run's work dir: its config.toml and latest checkpoint.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// COCO annotation file (detectors).
    #[arg(long)]
    pub coco: Option<PathBuf>,
    /// Image directory of the annotation file (detectors).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Where to write the COCO results JSON (default: results.json next to nothing else).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Metrics: bbox and/or segm.
    #[arg(long, num_args = 1.., default_values_t = vec!["bbox".to_string(), "segm".to_string()])]
    pub eval: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Load a checkpoint trained for another number of classes without its class-specific layers.
    #[arg(long)]
    pub drop_class_layers: bool,
    /// Stop after this many images (quick checks).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Detectors: images per forward pass, padded together as mmdet does (identical detections
    /// to batch 1 when the padded shapes are equal).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Segmentors: whole-image or sliding-window inference (default: the preset's).
    #[arg(long)]
    pub mode: Option<String>,
    /// Segmentors: multi-scale + flip test.
    #[arg(long)]
    pub aug_test: bool,
    /// Segmentors: ADE20K root (ADEChallengeData2016 layout).
    #[arg(long)]
    pub ade_root: Option<PathBuf>,
    /// Segmentors: also write each prediction as an 8-bit label PNG here (`cnx eval seg` input).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Print one JSON object: {"task", "model", "metrics", ...} (`metrics` with the names of the
    /// training log: bbox_mAP, bbox_mAP_50, ..., segm_mAP_l; mIoU, mAcc, aAcc).
    #[arg(long)]
    pub json: bool,
    /// Evaluate with N local ranks (processes), each running every N-th image; rank 0 gathers
    /// the results and reports exactly the single-process numbers. Under torchrun / SLURM the
    /// ranks come from the environment.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Port of the rank-0 store for --nproc-per-node (default: a free one).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Collective backend: nccl or gloo (default: nccl on CUDA devices, gloo on the CPU).
    #[arg(long)]
    pub dist_backend: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    // `--nproc-per-node N` launches N ranks of this command; under torchrun / SLURM / that
    // launcher each rank runs its share of the images and rank 0 reports.
    if let Some(done) =
        crate::engine::distributed::launch_local(args.nproc_per_node, args.master_port, 0)
    {
        return done;
    }
    let device = crate::engine::distributed::resolve_device(&args.device)?;
    crate::device::winograd_for(device);
    let dp =
        crate::engine::distributed::DataParallel::from_env(args.dist_backend.as_deref(), device)?;
    let shard = dp.as_ref().map(|d| d.eval_shard());
    let main = shard.as_ref().is_none_or(|s| s.is_main());
    let src = ModelSource::resolve(
        args.preset.as_deref(),
        args.config.as_deref(),
        args.work_dir.as_deref(),
        args.weights.as_deref(),
    )?;
    if src.is_segmentor() {
        let mode = match args.mode.as_deref() {
            None => None,
            Some(m) => Some(m.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?),
        };
        let Some(ade_root) = args.ade_root.clone() else {
            bail!("--ade-root is required for {}", src.name())
        };
        let o = crate::cmd::seg::TestOpts {
            cfg: src.segmentor_config()?,
            weights: src.weights.clone(),
            ade_root,
            mode,
            aug_test: args.aug_test,
            out_dir: args.out_dir.clone(),
            device,
            shard,
        };
        let r = crate::cmd::seg::test_with(&o)?;
        if args.json && main {
            let v = serde_json::json!({"task": "seg", "model": src.name(),
                "images": r.evaluated + r.skipped_no_label, "skipped": r.skipped_no_label,
                "metrics": r.summary.metrics()});
            println!("{v}");
        }
        return Ok(());
    }
    let (Some(ann), Some(img_dir)) = (args.coco.clone(), args.images.clone()) else {
        bail!(
            "--coco ANN.json and --images DIR are required for {}",
            src.name()
        )
    };
    let mut types = Vec::new();
    for e in &args.eval {
        types.push(match e.as_str() {
            "bbox" => IouType::Bbox,
            "segm" => IouType::Segm,
            o => bail!("unknown --eval '{o}' (bbox, segm)"),
        });
    }
    let (_vs, det) = src.load_detector(args.drop_class_layers, device)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("results.json"));
    let pipe = src.test_pipeline();
    let mut metrics = std::collections::BTreeMap::new();
    for (t, summary) in coco_test(
        &det,
        &pipe,
        &ann,
        &img_dir,
        args.limit,
        args.batch_size as usize,
        &out,
        &types,
        device,
        shard,
    )? {
        if args.json {
            metrics.extend(summary.metrics(t.name()));
        } else {
            println!("Evaluate annotation type *{}*", t.name());
            println!("{}", summary.format_pycocotools());
        }
    }
    if args.json && main {
        let v = serde_json::json!({"task": "det", "model": src.name(), "results": out,
            "metrics": metrics});
        println!("{v}");
    }
    Ok(())
}

/// Run `det` over the COCO dataset `ann` / `img_dir` (the first `limit` images, `batch_size`
/// per pass), write the results file `out` and evaluate it against all of `ann`'s ground truth,
/// one summary per type.
#[allow(clippy::too_many_arguments)]
pub fn coco_test(
    det: &TwoStageDetector,
    pipe: &TestPipeline,
    ann: &Path,
    img_dir: &Path,
    limit: Option<usize>,
    batch_size: usize,
    out: &Path,
    types: &[IouType],
    device: Device,
    shard: Option<crate::evaluation::Shard>,
) -> Result<Vec<(IouType, Summary)>> {
    let main = shard.as_ref().is_none_or(|s| s.is_main());
    let ds = Arc::new(
        CocoDataset::load(ann, img_dir).with_context(|| format!("reading {}", ann.display()))?,
    );
    let opts = InferenceOpts {
        pipeline: pipe.clone(),
        batch_size,
        limit,
        device,
        progress: main,
        shard,
    };
    let r = coco_inference(det, &ds, &opts).with_context(|| ann.display().to_string())?;
    if !main {
        return Ok(Vec::new());
    }
    crate::evaluation::report_skipped(&r.skipped, "");
    eprintln!(
        "{} detections on {} images → {}",
        r.results.len(),
        r.images,
        out.display()
    );
    coco_evaluate(ann, &r.results, out, types)
}
