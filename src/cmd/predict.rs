//! `cnx predict --preset P --weights W --out-dir DIR IMAGE...`: run a detector (Mask R-CNN
//! and Cascade Mask R-CNN presets) on image files, writing one annotated PNG per image (boxes, class names, scores,
//! translucent masks) and one `predictions.json` in COCO results format (original category ids,
//! plus each image's `file_name`). Segmentation presets (`upernet_*`) go to `cmd::seg`.
//! An unreadable image is reported by name and counted; the others still run.

use anyhow::{bail, Context, Result};
use cnx_datasets::draw;
use cnx_datasets::image_io;
use cnx_datasets::pipeline::{normalize_into, pad_up, TestPipeline};
use cnx_heads::cascade::{CascadeConfig, CascadeDetector};
use cnx_heads::coco_classes::{COCO_CAT_IDS, COCO_CLASSES};
use cnx_heads::results::{to_coco, CocoResult};
use cnx_heads::{Detections, Detector, DetectorConfig, ImgMeta};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Tensor};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Model preset: a Mask R-CNN or Cascade Mask R-CNN detector, or an `upernet_*` segmentor (see `cnx presets`).
    #[arg(long)]
    pub preset: String,
    /// Checkpoint (mmdet/mmseg .pth, or safetensors from `cnx convert`).
    #[arg(long, required_unless_present = "bench")]
    pub weights: Option<PathBuf>,
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
    /// Run under bf16 autocast (CUDA).
    #[arg(long)]
    pub bf16: bool,
    #[arg(required_unless_present = "bench")]
    pub images: Vec<PathBuf>,
}

fn bench(args: &Args, device: Device, iters: usize) -> Result<()> {
    let mut cfg = DetectorConfig::preset(&args.preset)?;
    cfg.roi.test.score_thr = 0.0;
    let mut vs = VarStore::new(device);
    let det = Detector::new(&vs.root(), &cfg);
    if let Some(w) = &args.weights {
        cnx_heads::weights::load_checkpoint(&mut vs, w, args.drop_class_layers)?;
    }
    if args.bf16 {
        crate::engine::amp::set_cuda_autocast_dtype(crate::engine::config::Amp::Bf16)?;
    }
    let (h, w) = args.input;
    let x = Tensor::randn([1, 3, h, w], (tch::Kind::Float, device));
    let meta = ImgMeta {
        img_shape: (h, w),
        ori_shape: (h, w),
        scale_factor: (1.0, 1.0),
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    let mut n = 0;
    for k in 0..iters + 3 {
        sync();
        let t = std::time::Instant::now();
        let d = if args.bf16 {
            tch::autocast(true, || det.predict(&x, std::slice::from_ref(&meta)))
        } else {
            det.predict(&x, std::slice::from_ref(&meta))
        };
        sync();
        if k >= 3 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        n = d[0].boxes.size()[0];
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"preset": args.preset, "input": [h, w], "bf16": args.bf16, "median_ms": med,
            "images_per_s": 1e3 / med, "detections": n, "device": format!("{device:?}")})
    );
    Ok(())
}

/// Either detector the COCO presets name: the two share inputs and outputs at test time.
pub enum AnyDetector {
    MaskRcnn(Box<Detector>),
    Cascade(Box<CascadeDetector>),
}

impl AnyDetector {
    pub fn predict(&self, images: &Tensor, metas: &[ImgMeta]) -> Vec<Detections> {
        match self {
            Self::MaskRcnn(d) => d.predict(images, metas),
            Self::Cascade(d) => d.predict(images, metas),
        }
    }

    /// Foreground classes the detector predicts.
    pub fn num_classes(&self) -> i64 {
        match self {
            Self::MaskRcnn(d) => d.config.roi.num_classes,
            Self::Cascade(d) => d.config.base.roi.num_classes,
        }
    }

    /// mmdet's `forward_dummy` (what `get_flops` counts and `cnx compare --fps` times).
    pub fn forward_dummy(&self, images: &Tensor) -> Tensor {
        match self {
            Self::MaskRcnn(d) => d.forward_dummy(images),
            Self::Cascade(d) => d.forward_dummy(images),
        }
    }

    pub fn predict_batch(&self, batch: &cnx_datasets::DetBatch, device: Device) -> Vec<Detections> {
        match self {
            Self::MaskRcnn(d) => d.predict_batch(batch, device),
            Self::Cascade(d) => d.predict_batch(batch, device),
        }
    }
}

/// Build the detector of `preset` (Mask R-CNN or Cascade Mask R-CNN) on `device` and load
/// `weights`.
pub fn load_detector(
    preset: &str,
    weights: &Path,
    drop_class_layers: bool,
    device: Device,
) -> Result<(VarStore, AnyDetector)> {
    let mut vs = VarStore::new(device);
    let (det, backbone) = if preset.starts_with("cascade_") {
        let cfg = CascadeConfig::preset(preset)?;
        let bb = cfg.base.backbone.dense()?;
        let det = CascadeDetector::new(&vs.root(), &cfg);
        (AnyDetector::Cascade(Box::new(det)), bb)
    } else {
        let cfg = DetectorConfig::preset(preset)?;
        let bb = cfg.backbone.dense()?;
        let det = Detector::new(&vs.root(), &cfg);
        (AnyDetector::MaskRcnn(Box::new(det)), bb)
    };
    let report =
        cnx_heads::weights::load_checkpoint_for(&mut vs, weights, drop_class_layers, &backbone)
            .with_context(|| format!("loading {}", weights.display()))?;
    eprintln!("{}: {}", weights.display(), report.summary());
    Ok((vs, det))
}

/// One image through the test pipeline → (batch tensor, meta). Images smaller than 32 px are
/// padded up (the network needs 32), never refused.
pub fn prepare(img: &image_io::Image8, pipe: &TestPipeline, device: Device) -> (Tensor, ImgMeta) {
    let (resized, sf) = pipe.run_image(img.clone());
    let ph = pad_up(resized.h, pipe.size_divisor).max(32);
    let pw = pad_up(resized.w, pipe.size_divisor).max(32);
    let mut buf = vec![0f32; 3 * ph * pw];
    normalize_into(&resized, &mut buf, pw, ph);
    let t = Tensor::from_slice(&buf)
        .view([1, 3, ph as i64, pw as i64])
        .to_device(device);
    let meta = ImgMeta {
        img_shape: (resized.h as i64, resized.w as i64),
        ori_shape: (img.h as i64, img.w as i64),
        scale_factor: sf,
    };
    (t, meta)
}

pub fn run(args: Args) -> Result<()> {
    let device = crate::cmd::seg::parse_device(&args.device)?;
    if let Some(iters) = args.bench {
        return bench(&args, device, iters.max(1));
    }
    let weights = args.weights.clone().expect("clap requires --weights");
    if args.preset.starts_with("upernet_") {
        let mode = match args.mode.as_deref() {
            None => None,
            Some(m) => Some(m.parse().map_err(|e| anyhow::anyhow!("--mode: {e}"))?),
        };
        let o = crate::cmd::seg::PredictOpts {
            cfg: cnx_heads::segmentor::SegmentorConfig::preset(&args.preset)?,
            weights: weights.clone(),
            mode,
            aug_test: args.aug_test,
            out_dir: args.out_dir.clone(),
            images: args.images.clone(),
            device,
        };
        return crate::cmd::seg::predict_with(&o);
    }
    let (_vs, det) = load_detector(&args.preset, &weights, args.drop_class_layers, device)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let pipe = TestPipeline::default();
    let names: Vec<String> = COCO_CLASSES.iter().map(|s| s.to_string()).collect();
    let mut all: Vec<CocoResult> = Vec::new();
    let mut failed = 0usize;
    for (i, path) in args.images.iter().enumerate() {
        let img = match image_io::read_rgb(path) {
            Ok(img) => img,
            Err(e) => {
                eprintln!("skipping {}: {e}", path.display());
                failed += 1;
                continue;
            }
        };
        let (x, meta) = prepare(&img, &pipe, device);
        let t0 = std::time::Instant::now();
        let dets = det.predict(&x, std::slice::from_ref(&meta));
        let d = &dets[0];
        let file_name = path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let res = to_coco(d, i as i64, Some(&file_name), &|l| {
            COCO_CAT_IDS.get(l as usize).copied().unwrap_or(l)
        });
        // drawing: above --score-thr only
        let mut canvas = draw::to_rgb_image(&img);
        let masks = d.masks.as_ref().map(|m| {
            Vec::<u8>::try_from(
                &m.to_device(Device::Cpu)
                    .to_kind(tch::Kind::Uint8)
                    .contiguous()
                    .view([-1]),
            )
            .unwrap_or_default()
        });
        let b = cnx_heads::boxes::to_vec_f32(&d.boxes);
        let s = cnx_heads::boxes::to_vec_f32(&d.scores);
        let l = cnx_heads::boxes::to_vec_i64(&d.labels);
        let hw = img.h * img.w;
        let inst: Vec<draw::Instance> = (0..s.len())
            .filter(|&k| s[k] as f64 >= args.score_thr)
            .map(|k| draw::Instance {
                bbox: [b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]],
                label: l[k] as usize,
                score: Some(s[k]),
                mask: masks.as_ref().map(|m| &m[k * hw..(k + 1) * hw]),
            })
            .collect();
        draw::draw_instances(&mut canvas, &inst, &names);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| format!("image{i}"));
        let out = args.out_dir.join(format!("{stem}.png"));
        canvas
            .save(&out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "{}: {} detections ({} drawn, score ≥ {}) in {:.2}s → {}",
            path.display(),
            s.len(),
            inst.len(),
            args.score_thr,
            t0.elapsed().as_secs_f64(),
            out.display()
        );
        all.extend(res);
    }
    let json = args.out_dir.join("predictions.json");
    std::fs::write(&json, serde_json::to_vec(&all)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("{} results → {}", all.len(), json.display());
    if failed > 0 {
        eprintln!("{failed} of {} images could not be read", args.images.len());
        if failed == args.images.len() {
            bail!("no image could be read");
        }
    }
    Ok(())
}
