//! `cnx bench-forward` (hidden): times a backbone forward for bench/backbone.sh and
//! scripts/gpu_check.sh. Prints one JSON object: median / mean milliseconds per forward and the
//! process's peak RSS, measured the same way as the PyTorch side (bench/backbone.py).

use crate::engine::amp;
use crate::engine::config::Amp;
use anyhow::Result;
use cnx_backbone::convnext::{ConvNeXt, ConvNeXtConfig};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "convnext_tiny")]
    pub model: String,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    #[arg(long, default_value_t = 224)]
    pub size: i64,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// auto, cpu, cuda or cuda:N (auto: cuda:0 when libtorch sees a GPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Run under bf16 autocast (CUDA).
    #[arg(long)]
    pub bf16: bool,
    /// Convert model and input to channels-last memory format.
    #[arg(long)]
    pub channels_last: bool,
    /// intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Write the freshly initialised classifier's weights (official names, safetensors) here
    /// and exit: a checkpoint for checks on machines without Python.
    #[arg(long)]
    pub save_weights: Option<std::path::PathBuf>,
}

/// Peak resident set size of this process in KiB (VmHWM), as getrusage's ru_maxrss reports it.
pub fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(-1)
}

fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn run(args: Args) -> Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = crate::device::resolve(&args.device)?;
    let cfg = ConvNeXtConfig::by_name(&args.model)?;
    let vs = VarStore::new(device);
    let net = ConvNeXt::new(vs.root(), &cfg);
    if let Some(path) = &args.save_weights {
        let mut sd = cnx_backbone::checkpoint::StateDict::new();
        for (k, v) in vs.variables() {
            sd.insert(k, v.detach());
        }
        sd.write_safetensors(path)?;
        println!("wrote {} tensors to {}", sd.len(), path.display());
        return Ok(());
    }
    let mut x = Tensor::randn([args.batch, 3, args.size, args.size], (Kind::Float, device));
    if args.channels_last {
        // tch has no memory-format argument; NCHW logical shape with NHWC strides is exactly
        // what `.to(memory_format=torch.channels_last)` produces.
        x = channels_last(&x);
        tch::no_grad(|| {
            for (_, v) in vs.variables() {
                if v.dim() == 4 {
                    v.shallow_clone().set_data(&channels_last(&v));
                }
            }
        });
    }
    let amp = if args.bf16 { Amp::Bf16 } else { Amp::None };
    let step = || {
        tch::no_grad(|| {
            let y = amp::autocast(device, amp, || net.forward_logits(&x, false));
            crate::device::synchronize(device);
            y
        })
    };
    for _ in 0..args.warmup {
        let _ = step();
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t = Instant::now();
        let _ = step();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = if times.is_empty() {
        f64::NAN
    } else {
        times[times.len() / 2]
    };
    let out = serde_json::json!({
        "impl": "cnx",
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "device": crate::device::label(device),
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "threads": tch::get_num_threads(),
        "median_ms": median,
        "mean_ms": mean,
        "peak_rss_kib": peak_rss_kib(),
    });
    println!("{out}");
    Ok(())
}
