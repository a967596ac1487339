//! `cnx bench-seg` (hidden): times UperNet inference on one image size for
//! bench/segmentation.sh and scripts/gpu_check.sh. Random weights of a segmentation preset,
//! eval mode, no grad; prints one JSON object (median / mean ms per image, images/s).

use crate::engine::amp;
use crate::engine::config::Amp;
use anyhow::Result;
use cnx_heads::segmentor::{Segmentor, TestMode};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "upernet_convnext_tiny_512_160k")]
    pub preset: String,
    /// Input height x width.
    #[arg(long, default_value = "512x2048", value_parser = super::flops::parse_hw)]
    pub input: (i64, i64),
    /// whole or slide (the preset's crop and stride).
    #[arg(long, default_value = "whole")]
    pub mode: String,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// auto, cpu, cuda or cuda:N (auto: cuda:0 when libtorch sees a GPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Run under bf16 autocast (CUDA).
    #[arg(long)]
    pub bf16: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device = crate::device::resolve(&args.device)?;
    let mode: TestMode = args.mode.parse()?;
    let cfg = crate::engine::presets::segmentor(&args.preset)?;
    let vs = VarStore::new(device);
    let seg = Segmentor::new(&vs.root(), &cfg)?;
    let (h, w) = args.input;
    let x = Tensor::randn([1, 3, h, w], (Kind::Float, device));
    let amp = if args.bf16 { Amp::Bf16 } else { Amp::None };
    let step = || {
        let y = amp::autocast(device, amp, || seg.inference_logits(&x, mode, [h, w]));
        crate::device::synchronize(device);
        y
    };
    for _ in 0..args.warmup {
        let _ = step();
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters.max(1) {
        let t = Instant::now();
        let _ = step();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let out = serde_json::json!({
        "impl": "cnx",
        "preset": args.preset,
        "input": [h, w],
        "mode": args.mode,
        "device": crate::device::label(device),
        "bf16": args.bf16,
        "threads": tch::get_num_threads(),
        "median_ms": median,
        "mean_ms": mean,
        "images_per_s": 1e3 / median,
    });
    println!("{out}");
    Ok(())
}
