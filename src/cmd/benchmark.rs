//! `cnx benchmark PRESET`: speed and peak memory of a preset's whole model on synthetic inputs,
//! what mmdet's `tools/analysis_tools/benchmark.py` and detectron2's `benchmark.py` report.
//! Inference (default) runs the test path (`TwoStageDetector::predict` / UperNet whole-image
//! logits + argmax); `--train` runs forward + backward + AdamW step on synthetic ground truth and
//! splits each iteration into forward / backward / optimizer time. Random weights: the numbers
//! measure the network's cost, not its accuracy.

use crate::cmd::bench_forward::peak_rss_kib;
use crate::engine::amp::{self, LossScaler};
use crate::engine::config::{Amp, Arch, Config};
use crate::engine::optim::{build_groups, AdamW};
use crate::engine::{presets, tasks};
use anyhow::{anyhow, bail, Result};
use cnx_datasets::mask::{BitMask, InstanceMask, Masks};
use cnx_heads::segmentor::{Segmentor, TestMode};
use cnx_heads::structures::pad_shape;
use cnx_heads::{GtInstances, ImgMeta, TwoStageDetector};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Precision of the timed region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AmpArg {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Preset name (`cnx presets` lists them).
    pub preset: String,
    /// Time a training step (forward + backward + AdamW) instead of inference.
    #[arg(long)]
    pub train: bool,
    /// Images per iteration.
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    /// Autocast precision: fp16 (CUDA only; with the engine's dynamic loss scaling under
    /// --train) or bf16; fp32 = no autocast.
    #[arg(long, value_enum, default_value = "fp32")]
    pub amp: AmpArg,
    /// auto, cpu, cuda or cuda:N (auto: cuda:0 when libtorch sees a GPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed iterations first (allocator, cuDNN autotuning, lazy initialisation).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Image size HxW (detection: padded up to a multiple of 32). Default: the preset's test
    /// scale (detection, e.g. 800x1333 padded to 800x1344) or crop size (segmentation).
    #[arg(long, value_parser = super::flops::parse_hw)]
    pub input: Option<(i64, i64)>,
    /// libtorch intra-op threads (0: the preset's `runtime.threads`, else libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Seed of the random weights and synthetic inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
}

enum Model {
    Det(Box<TwoStageDetector>),
    Seg(Box<Segmentor>),
}

/// Synthetic inputs of one iteration (the same every iteration).
struct Inputs {
    images: Tensor,
    metas: Vec<ImgMeta>,
    gts: Vec<GtInstances>,
    labels: Option<Tensor>,
}

/// Milliseconds of one timed iteration.
#[derive(Default, Clone, Copy)]
struct Times {
    total: f64,
    forward: f64,
    backward: f64,
    optimizer: f64,
}

/// splitmix64: deterministic synthetic boxes without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Ground truth of one image: `n` boxes inside `img_shape` (10-60 % of each side) with an
/// elliptical bitmap mask each on the padded canvas, labels in `0..num_classes`.
fn synthetic_gt(
    rng: &mut Rng,
    n: usize,
    img_shape: (i64, i64),
    pad: (i64, i64),
    num_classes: i64,
    device: Device,
) -> GtInstances {
    let (h, w) = (img_shape.0 as f64, img_shape.1 as f64);
    let mut boxes = Vec::with_capacity(4 * n);
    let mut labels = Vec::with_capacity(n);
    let mut masks = Vec::with_capacity(n);
    for _ in 0..n {
        let bw = (w * (0.1 + 0.5 * rng.unit())).max(4.0);
        let bh = (h * (0.1 + 0.5 * rng.unit())).max(4.0);
        let x0 = ((w - bw) * rng.unit()).floor();
        let y0 = ((h - bh) * rng.unit()).floor();
        let (mw, mh) = (bw.floor() as usize, bh.floor() as usize);
        let mut data = vec![0u8; mw * mh];
        let (cx, cy) = (mw as f64 / 2.0, mh as f64 / 2.0);
        for y in 0..mh {
            for x in 0..mw {
                let dx = (x as f64 + 0.5 - cx) / cx;
                let dy = (y as f64 + 0.5 - cy) / cy;
                data[y * mw + x] = (dx * dx + dy * dy <= 1.0) as u8;
            }
        }
        boxes.extend([
            x0 as f32,
            y0 as f32,
            (x0 + mw as f64) as f32,
            (y0 + mh as f64) as f32,
        ]);
        labels.push((rng.next() % num_classes.max(1) as u64) as i64);
        masks.push(InstanceMask::Bitmap(BitMask {
            x0: x0 as usize,
            y0: y0 as usize,
            w: mw,
            h: mh,
            data,
        }));
    }
    GtInstances {
        boxes: Tensor::from_slice(&boxes)
            .view([n as i64, 4])
            .to_device(device),
        labels: Tensor::from_slice(&labels).to_device(device),
        masks: Some(crate::adapters::instance_masks(Masks {
            width: pad.1 as usize,
            height: pad.0 as usize,
            masks,
        })),
    }
}

fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::MaskRcnn => "mask_rcnn",
        Arch::CascadeMaskRcnn => "cascade_mask_rcnn",
        Arch::Upernet => "upernet",
    }
}

/// The image size (before padding) a preset is tested at: detection's keep-ratio scale
/// (long, short) as (short, long), segmentation's crop.
fn default_input(cfg: &Config) -> (i64, i64) {
    match cfg.model.arch() {
        Arch::Upernet => (cfg.data.crop_size[0] as i64, cfg.data.crop_size[1] as i64),
        _ => (cfg.data.img_scale[1] as i64, cfg.data.img_scale[0] as i64),
    }
}

/// Sum of a detector's loss terms, Cascade's per-stage `s{i}.loss_*` included.
fn det_total(losses: cnx_heads::Losses) -> Result<Tensor> {
    losses
        .0
        .into_iter()
        .filter(|(k, _)| k.rsplit('.').next().is_some_and(|t| t.starts_with("loss")))
        .map(|(_, v)| v)
        .reduce(|a, b| a + b)
        .ok_or_else(|| anyhow!("the detector returned no loss terms"))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn rss_mb(key: &str) -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|kib| kib / 1024.0)
        })
}

pub fn run(args: Args) -> Result<()> {
    let preset = presets::find(&args.preset)?;
    let cfg = preset.config();
    let device = crate::device::resolve(&args.device)?;
    if args.batch < 1 {
        bail!("--batch must be at least 1 (got {})", args.batch);
    }
    if args.iters < 1 {
        bail!("--iters must be at least 1");
    }
    let amp_mode = match args.amp {
        AmpArg::Fp32 => Amp::None,
        AmpArg::Bf16 => Amp::Bf16,
        AmpArg::Fp16 if device.is_cuda() => Amp::Fp16,
        AmpArg::Fp16 => bail!(
            "--amp fp16 needs a CUDA device (device is {}); use --amp bf16 for CPU autocast",
            crate::device::label(device)
        ),
    };
    let threads = if args.threads > 0 {
        args.threads
    } else {
        cfg.runtime.threads
    };
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    crate::device::cudnn_benchmark_for(device, cfg.model.arch());
    crate::device::winograd_for(device);
    tch::manual_seed(args.seed as i64);
    let mut rng = Rng(args.seed ^ 0x636e_7862);

    let vs = VarStore::new(device);
    let model = match cfg.model.arch() {
        Arch::Upernet => Model::Seg(Box::new(
            Segmentor::new(&vs.root(), tasks::segmentor_config(&cfg)?)
                .map_err(|e| anyhow!("{}: {e}", cfg.name))?,
        )),
        _ => Model::Det(Box::new(tasks::build_detector(&vs.root(), &cfg)?)),
    };
    let img_shape = args.input.unwrap_or_else(|| default_input(&cfg));
    let n = args.batch;
    let inputs = match &model {
        Model::Det(det) => {
            let pad = pad_shape(img_shape, 32);
            let meta = ImgMeta {
                img_shape,
                pad_shape: pad,
                ori_shape: img_shape,
                scale_factor: (1.0, 1.0),
            };
            let gts = if args.train {
                (0..n)
                    .map(|_| {
                        let k = 2 + (rng.next() % 4) as usize;
                        synthetic_gt(&mut rng, k, img_shape, pad, det.num_classes(), device)
                    })
                    .collect()
            } else {
                vec![]
            };
            Inputs {
                images: Tensor::randn([n, 3, pad.0, pad.1], (Kind::Float, device)),
                metas: vec![meta; n as usize],
                gts,
                labels: None,
            }
        }
        Model::Seg(_) => {
            let (h, w) = img_shape;
            Inputs {
                images: Tensor::randn([n, 3, h, w], (Kind::Float, device)),
                metas: vec![],
                gts: vec![],
                labels: args.train.then(|| {
                    Tensor::randint(cfg.model.num_classes(), [n, h, w], (Kind::Int64, device))
                }),
            }
        }
    };
    let input_hw = {
        let s = inputs.images.size();
        (s[2], s[3])
    };

    // Optimizer over the trainable parameters with the preset's groups (as the trainer builds
    // it); lr after the linear scaling rule for this batch.
    let mut opt_state = if args.train {
        let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, t) in vs.variables() {
            if t.requires_grad() {
                params.insert(name, t.shallow_clone());
            }
        }
        let shapes: Vec<(String, Vec<i64>)> =
            params.iter().map(|(k, t)| (k.clone(), t.size())).collect();
        let o = &cfg.optimizer;
        let lr = if o.scale_lr {
            o.lr * n as f64 / o.base_batch_size.max(1) as f64
        } else {
            o.lr
        };
        let groups = build_groups(&shapes, o, lr);
        Some((
            AdamW::new(groups, params, o)?,
            LossScaler::new(amp_mode == Amp::Fp16),
        ))
    } else {
        None
    };

    let sync = || crate::device::synchronize(device);
    let mut detections = 0i64;
    let mut step = |count: bool| -> Result<Times> {
        let t0 = Instant::now();
        let mut t = Times::default();
        match (&model, opt_state.as_mut()) {
            (Model::Det(det), None) => {
                let dets = amp::autocast(device, amp_mode, || {
                    det.predict(&inputs.images, &inputs.metas)
                });
                sync();
                if count {
                    detections += dets.iter().map(|d| d.scores.size()[0]).sum::<i64>();
                }
            }
            (Model::Seg(seg), None) => {
                let (h, w) = input_hw;
                let pred = amp::autocast(device, amp_mode, || {
                    seg.inference_logits(&inputs.images, TestMode::Whole, [h, w])
                        .argmax(1, false)
                });
                sync();
                drop(pred);
            }
            (m, Some((opt, scaler))) => {
                let loss = amp::autocast(device, amp_mode, || -> Result<Tensor> {
                    Ok(match m {
                        Model::Det(det) => det_total(det.forward_train(
                            &inputs.images,
                            &inputs.metas,
                            &inputs.gts,
                        ))?,
                        Model::Seg(seg) => {
                            let labels = inputs.labels.as_ref().expect("labels under --train");
                            seg.forward_train(&inputs.images, labels).total()
                        }
                    })
                })?;
                sync();
                t.forward = ms_since(t0);
                let t1 = Instant::now();
                (loss * scaler.scale).backward();
                sync();
                t.backward = ms_since(t1);
                let t2 = Instant::now();
                amp::finish_step(opt, scaler, 0.0)?;
                opt.zero_grad();
                sync();
                t.optimizer = ms_since(t2);
            }
        }
        t.total = ms_since(t0);
        Ok(t)
    };

    let total_iters = args.warmup + args.iters;
    let every = (total_iters / 5).max(1);
    let progress = |i: usize, t: &Times| {
        if i.is_multiple_of(every) || i + 1 == total_iters {
            let what = if i < args.warmup { "warm-up" } else { "iter" };
            let (k, of) = if i < args.warmup {
                (i + 1, args.warmup)
            } else {
                (i + 1 - args.warmup, args.iters)
            };
            eprintln!("benchmark: {what} {k}/{of}: {:.1} ms", t.total);
        }
    };
    for i in 0..args.warmup {
        let t = step(false)?;
        progress(i, &t);
    }
    let base_rss_mb = rss_mb("VmRSS:");
    // CUDA: the timed iterations' own peak (the warm-up's cuDNN workspaces tried and dropped
    // excluded), as `torch.cuda.reset_peak_memory_stats()` before a timed loop.
    let cuda_index = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let cuda_reset = cuda_index.map(|i| cnx_dist::ops::cuda_memory(i, true));
    // Host reads and host-to-device copies inside the heads (each one stalls a GPU stream),
    // per measured iteration (cnx_heads::sync_count).
    let syncs0 = cnx_heads::sync_count::snapshot();
    let mut times = Vec::with_capacity(args.iters);
    for i in 0..args.iters {
        let t = step(true)?;
        progress(args.warmup + i, &t);
        times.push(t);
    }
    let syncs = cnx_heads::sync_count::snapshot().since(&syncs0);
    let per_iter = |v: u64| v as f64 / args.iters.max(1) as f64;

    let k = times.len() as f64;
    let mean = |f: fn(&Times) -> f64| times.iter().map(f).sum::<f64>() / k;
    let ms_per_iter = mean(|t| t.total);
    let mut sorted: Vec<f64> = times.iter().map(|t| t.total).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median_ms = sorted[sorted.len() / 2];
    let images_per_s = n as f64 * 1e3 / ms_per_iter;
    let peak_rss_mb = match peak_rss_kib() {
        v if v > 0 => Some(v as f64 / 1024.0),
        _ => None,
    };
    // On CUDA the device's peak (the caching allocator's statistics, read through the shim),
    // never the host's RSS under that name; a build without CUDA headers says so.
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    let cuda_mem = match (cuda_index, cuda_reset) {
        (Some(i), Some(Ok(_))) => Some(cnx_dist::ops::cuda_memory(i, false)),
        (_, Some(Err(e))) => Some(Err(e)),
        _ => None,
    };
    let (peak_mem_mb, peak_reserved_mb, peak_mem_source) = match &cuda_mem {
        None => (
            peak_rss_mb,
            None,
            "VmHWM: peak resident set size of the process".to_string(),
        ),
        Some(Ok(m)) => (
            Some(mib(m.max_allocated)),
            Some(mib(m.max_reserved)),
            "CUDA caching allocator: max allocated (max reserved in peak_reserved_mb) over the timed iterations".to_string(),
        ),
        Some(Err(e)) => (None, None, format!("unavailable: {e}")),
    };
    let amp_name = match args.amp {
        AmpArg::Fp32 => "fp32",
        AmpArg::Fp16 => "fp16",
        AmpArg::Bf16 => "bf16",
    };
    let loss_scaler = opt_state.as_ref().map(|(_, s)| s.enabled);

    if args.json {
        let mut out = serde_json::json!({
            "preset": cfg.name,
            "arch": arch_name(cfg.model.arch()),
            "device": crate::device::label(device),
            "batch": n,
            "train": args.train,
            "images_per_s": images_per_s,
            "ms_per_iter": ms_per_iter,
            "median_ms": median_ms,
            "peak_mem_mb": peak_mem_mb,
            "peak_mem_source": peak_mem_source,
            "peak_reserved_mb": peak_reserved_mb,
            "peak_rss_mb": peak_rss_mb,
            "base_rss_mb": base_rss_mb,
            "amp": amp_name,
            "iters": args.iters,
            "warmup": args.warmup,
            "input": [input_hw.0, input_hw.1],
            "threads": tch::get_num_threads(),
            "host_reads_per_iter": per_iter(syncs.host_reads),
            "uploads_per_iter": per_iter(syncs.uploads),
        });
        let o = out.as_object_mut().expect("object");
        if args.train {
            o.insert("forward_ms".into(), mean(|t| t.forward).into());
            o.insert("backward_ms".into(), mean(|t| t.backward).into());
            o.insert("optimizer_ms".into(), mean(|t| t.optimizer).into());
            o.insert("loss_scaler".into(), loss_scaler.unwrap_or(false).into());
        }
        if let Model::Det(_) = model {
            o.insert(
                "img_shape".into(),
                serde_json::json!([img_shape.0, img_shape.1]),
            );
            if !args.train {
                o.insert(
                    "detections_per_image".into(),
                    (detections as f64 / (k * n as f64)).into(),
                );
            }
        }
        println!("{out}");
        return Ok(());
    }

    let mb = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} MB"));
    println!(
        "{} ({}), {}, {} threads, {}",
        cfg.name,
        arch_name(cfg.model.arch()),
        crate::device::describe(device),
        tch::get_num_threads(),
        amp_name
    );
    println!(
        "{}, batch {n} at {}x{}, {} iterations after {} warm-up",
        if args.train {
            "training step (forward + backward + AdamW)"
        } else {
            "inference"
        },
        input_hw.0,
        input_hw.1,
        args.iters,
        args.warmup
    );
    println!("  {ms_per_iter:.1} ms/iter (median {median_ms:.1}), {images_per_s:.2} images/s");
    println!(
        "  heads: {:.0} host reads, {:.0} host-to-device copies per iteration",
        per_iter(syncs.host_reads),
        per_iter(syncs.uploads)
    );
    if args.train {
        println!(
            "  forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms{}",
            mean(|t| t.forward),
            mean(|t| t.backward),
            mean(|t| t.optimizer),
            if loss_scaler == Some(true) {
                " (fp16 dynamic loss scaling)"
            } else {
                ""
            }
        );
    } else if let Model::Det(_) = model {
        println!(
            "  {:.1} detections per image (random weights)",
            detections as f64 / (k * n as f64)
        );
    }
    if device.is_cuda() {
        println!(
            "  peak memory: CUDA {} allocated, {} reserved ({}); host RSS peak {}",
            mb(peak_mem_mb),
            mb(peak_reserved_mb),
            if peak_reserved_mb.is_some() {
                "timed iterations"
            } else {
                &peak_mem_source
            },
            mb(peak_rss_mb)
        );
    } else {
        println!(
            "  peak memory: RSS {} (process peak, VmHWM; {} after warm-up)",
            mb(peak_rss_mb),
            mb(base_rss_mb)
        );
    }
    Ok(())
}
