//! `cnx predict --preset P --weights W --out-dir DIR IMAGE...`: run a detector (Mask R-CNN
//! and Cascade Mask R-CNN presets) on image files, writing one annotated PNG per image (boxes, class names, scores,
//! translucent masks) and one `predictions.json` in COCO results format (original category ids,
//! plus each image's `file_name`). Segmentation presets (`upernet_*`) go to `cmd::seg`.
//! An unreadable image is reported by name and counted; the others still run.

use crate::engine::amp;
use crate::engine::config::Amp;
use crate::model_source::ModelSource;
use crate::results::{to_coco, CocoResult};
use anyhow::{bail, Context, Result};
use cnx_datasets::classes::{COCO_CAT_IDS, COCO_CLASSES};

use cnx_datasets::image_io;
use cnx_datasets::pipeline::{chw_into, pad_up, TestPipeline};
use cnx_heads::{Detector, ImgMeta};
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Device, Tensor};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A paper preset (Mask R-CNN, Cascade Mask R-CNN or `upernet_*`, see `cnx presets`), for
    /// mmdet / mmseg checkpoints; cnx checkpoints record their model and need none.
    #[arg(long)]
    pub preset: Option<String>,
    /// Weights: a cnx checkpoint, or with --preset an mmdet/mmseg .pth or `cnx convert`
    /// safetensors. Default with --work-dir: its latest checkpoint.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The training config the model was built from (instead of the one in the weights).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A training run's work dir: its config.toml and latest checkpoint.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Detections below this score are not drawn (all above 0.05 go to predictions.json).
    #[arg(long, default_value_t = 0.3)]
    pub score_thr: f64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, required_unless_present = "bench", default_value = "predictions")]
    pub out_dir: PathBuf,
    /// Load a checkpoint trained for another number of classes without its class-specific layers.
    #[arg(long)]
    pub drop_class_layers: bool,
    /// Segmentors: whole-image or sliding-window inference (default: the preset's).
    #[arg(long)]
    pub mode: Option<String>,
    /// Segmentors: multi-scale + flip test.
    #[arg(long)]
    pub aug_test: bool,
    /// Timing mode (scripts/gpu_check.sh): run the detector N times on a random HxW input
    /// (random weights unless --weights; every RoI kept so the mask head runs on 100 boxes) and
    /// print one JSON line.
    #[arg(long, hide = true)]
    pub bench: Option<usize>,
    /// Timing mode input size HxW.
    #[arg(long, hide = true, default_value = "1280x800", value_parser = crate::cmd::flops::parse_hw)]
    pub input: (i64, i64),
    /// Run the model under bf16 autocast (on CUDA; on the CPU through libtorch's CPU autocast).
    /// Post-processing (box decoding, RoIAlign, NMS) stays in fp32.
    #[arg(long)]
    pub bf16: bool,
    /// Detectors: images per forward pass, padded together as mmdet does (identical detections
    /// to batch 1 when the padded shapes are equal).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Also take the images in subfolders of the folders given (outputs mirror the folders).
    #[arg(long)]
    pub recursive: bool,
    /// End with one JSON object: {"task", "images", "written": [{"image", "outputs"}],
    /// "skipped": [...], "predictions"}.
    #[arg(long)]
    pub json: bool,
    /// Image files and folders (a folder's images; `--recursive` descends).
    #[arg(required_unless_present = "bench")]
    pub images: Vec<PathBuf>,
}

/// The autocast precision `--bf16` asks for.
fn precision(args: &Args) -> Amp {
    if args.bf16 {
        Amp::Bf16
    } else {
        Amp::None
    }
}

fn bench(args: &Args, device: Device, iters: usize) -> Result<()> {
    let Some(preset) = &args.preset else {
        bail!("--bench needs --preset")
    };
    let crate::engine::config::ModelConfig::MaskRcnn(mut cfg) =
        crate::engine::presets::model(preset)?
    else {
        bail!("--bench times Mask R-CNN presets; {preset} is not one")
    };
    cfg.roi.test.score_thr = 0.0;
    let mut vs = VarStore::new(device);
    let det = Detector::new(&vs.root(), &cfg);
    if let Some(w) = &args.weights {
        cnx_heads::weights::load_checkpoint(&mut vs, w, args.drop_class_layers)?;
    }
    let (h, w) = args.input;
    let x = Tensor::randn([1, 3, h, w], (tch::Kind::Float, device));
    let meta = ImgMeta {
        img_shape: (h, w),
        pad_shape: cnx_heads::structures::pad_shape((h, w), 32),
        ori_shape: (h, w),
        scale_factor: (1.0, 1.0),
    };
    let sync = || crate::device::synchronize(device);
    let mut times = Vec::new();
    let mut n = 0;
    // Three warm-up runs (one for single-iteration smoke runs).
    let warm = iters.min(3);
    for k in 0..iters + warm {
        sync();
        let t = std::time::Instant::now();
        let d = amp::autocast(device, precision(args), || {
            det.predict(&x, std::slice::from_ref(&meta))
        });
        sync();
        if k >= warm {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        n = d[0].boxes.size()[0];
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"preset": args.preset, "input": [h, w], "bf16": args.bf16, "median_ms": med,
            "images_per_s": 1e3 / med, "detections": n, "device": crate::device::label(device)})
    );
    Ok(())
}

/// One image through the test pipeline → (batch tensor, meta). Images smaller than 32 px are
/// padded up (the network needs 32), never refused.
pub fn prepare(img: &image_io::Image8, pipe: &TestPipeline, device: Device) -> (Tensor, ImgMeta) {
    let (x, mut metas) = prepare_batch(std::slice::from_ref(img), pipe, device);
    (x, metas.remove(0))
}

/// Images through the test pipeline, padded together to the largest (bottom/right, zeros after
/// normalisation, as mmdet's collate) → (N,3,H,W tensor, metas).
pub fn prepare_batch(
    imgs: &[image_io::Image8],
    pipe: &TestPipeline,
    device: Device,
) -> (Tensor, Vec<ImgMeta>) {
    use rayon::prelude::*;
    let resized: Vec<(image_io::Image8, (f32, f32))> = imgs
        .par_iter()
        .map(|img| pipe.run_image(img.clone()))
        .collect();
    let ph = resized
        .iter()
        .map(|(r, _)| pad_up(r.h, pipe.size_divisor).max(32))
        .max();
    let pw = resized
        .iter()
        .map(|(r, _)| pad_up(r.w, pipe.size_divisor).max(32))
        .max();
    let (ph, pw) = (ph.unwrap_or(32), pw.unwrap_or(32));
    let mut buf = vec![0u8; imgs.len() * 3 * ph * pw];
    buf.par_chunks_mut(3 * ph * pw)
        .zip(resized.par_iter())
        .for_each(|(dst, (r, _))| chw_into(r, dst, pw, ph));
    let sizes: Vec<(usize, usize)> = resized.iter().map(|(r, _)| (r.h, r.w)).collect();
    let t = crate::adapters::images_to_device(&buf, [imgs.len(), 3, ph, pw], &sizes, device);
    let metas = imgs
        .iter()
        .zip(&resized)
        .map(|(img, (r, sf))| ImgMeta {
            img_shape: (r.h as i64, r.w as i64),
            pad_shape: cnx_heads::structures::pad_shape((r.h as i64, r.w as i64), 32),
            ori_shape: (img.h as i64, img.w as i64),
            scale_factor: *sf,
        })
        .collect();
    (t, metas)
}

pub fn run(args: Args) -> Result<()> {
    let device = crate::device::resolve(&args.device)?;
    crate::device::winograd_for(device);
    if let Some(iters) = args.bench {
        return bench(&args, device, iters.max(1));
    }
    let src = ModelSource::resolve(
        args.preset.as_deref(),
        args.config.as_deref(),
        args.work_dir.as_deref(),
        args.weights.as_deref(),
    )?;
    let inputs = crate::cmd::inputs::collect(&args.images, args.recursive)?;
    if src.is_segmentor() {
        let mode = match args.mode.as_deref() {
            None => None,
            Some(m) => Some(m.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?),
        };
        let o = crate::cmd::seg::PredictOpts {
            cfg: src.segmentor_config()?,
            weights: src.weights.clone(),
            mode,
            aug_test: args.aug_test,
            out_dir: args.out_dir.clone(),
            images: inputs.clone(),
            classes: src.classes.clone(),
            device,
        };
        // Autocast is thread state: the segmentor's forward passes run in this thread.
        let done = amp::autocast(device, precision(&args), || {
            crate::cmd::seg::predict_with(&o)
        })?;
        if args.json {
            let written: Vec<serde_json::Value> = done
                .written
                .iter()
                .map(|(i, l, o)| serde_json::json!({"image": i, "outputs": [l, o]}))
                .collect();
            let v = serde_json::json!({"task": "seg", "images": inputs.len(),
                "written": written, "skipped": done.skipped, "predictions": null});
            println!("{v}");
        }
        return crate::cmd::inputs::finish(&done.skipped, inputs.len());
    }
    let (_vs, det) = src.load_detector(args.drop_class_layers, device)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let pipe = src.test_pipeline();
    // Class names and category ids the checkpoint recorded; COCO's for the paper's presets.
    let names: Vec<String> = if src.classes.is_empty() {
        COCO_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        src.classes.clone()
    };
    let cat_ids: Vec<i64> = if src.category_ids.is_empty() {
        COCO_CAT_IDS.to_vec()
    } else {
        src.category_ids.clone()
    };
    let mut all: Vec<CocoResult> = Vec::new();
    let mut skipped: Vec<PathBuf> = Vec::new();
    let mut written: Vec<serde_json::Value> = Vec::new();
    let batch_size = args.batch_size.max(1) as usize;
    let numbered: Vec<(usize, &crate::cmd::inputs::Input)> = inputs.iter().enumerate().collect();
    for chunk in numbered.chunks(batch_size) {
        let (mut read, mut imgs) = (Vec::new(), Vec::new());
        for &(i, input) in chunk {
            match image_io::read_rgb(&input.path) {
                Ok(img) => {
                    read.push((i, input));
                    imgs.push(img);
                }
                Err(e) => {
                    eprintln!("skipping {}: {e}", input.path.display());
                    skipped.push(input.path.clone());
                }
            }
        }
        if read.is_empty() {
            continue;
        }
        let t0 = std::time::Instant::now();
        let (x, metas) = prepare_batch(&imgs, &pipe, device);
        let dets = amp::autocast(device, precision(&args), || det.predict(&x, &metas));
        let secs = t0.elapsed().as_secs_f64() / read.len() as f64;
        for (((i, input), img), d) in read.into_iter().zip(&imgs).zip(&dets) {
            let path = &input.path;
            // The image's name relative to the folder it was found in (unique across inputs).
            let file_name = match path.extension() {
                Some(e) => input.out.with_extension(e),
                None => input.out.clone(),
            }
            .display()
            .to_string();
            let res = to_coco(d, i as i64, Some(&file_name), &|l| {
                cat_ids.get(l as usize).copied().unwrap_or(l)
            });
            // drawing: above --score-thr only
            let canvas = crate::drawing::detections(img, d, &names, args.score_thr);
            let n_all = d.scores.size()[0];
            let n_drawn =
                i64::try_from(d.scores.ge(args.score_thr).sum(tch::Kind::Int64)).unwrap_or(0);
            let out = input.output(&args.out_dir, ".png")?;
            canvas
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}: {} detections ({} drawn, score ≥ {}) in {:.2}s → {}",
                path.display(),
                n_all,
                n_drawn,
                args.score_thr,
                secs,
                out.display()
            );
            written.push(serde_json::json!({"image": path, "outputs": [out]}));
            all.extend(res);
        }
    }
    let json = args.out_dir.join("predictions.json");
    std::fs::write(&json, serde_json::to_vec(&all)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("{} results → {}", all.len(), json.display());
    if args.json {
        let v = serde_json::json!({"task": "det", "images": inputs.len(), "written": written,
            "skipped": skipped, "predictions": json});
        println!("{v}");
    }
    crate::cmd::inputs::finish(&skipped, inputs.len())
}
