//! CPU inference timing of UperNet + ConvNeXt-T (upernet_convnext_tiny_512_160k, random weights)
//! on one 512x2048 image, eval mode, no grad: whole-image (`encode_decode`) and sliding-window
//! (crop 512, stride 341) logits. Used by bench/segmentation.sh; prints `mode median_ms` lines.
//! Args: [runs] [warmup] [whole|slide|both].

use cnx_heads::segmentor::{Segmentor, SegmentorConfig, TestMode};
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = argv.iter().filter_map(|a| a.parse().ok()).collect();
    let only = argv
        .iter()
        .find(|a| *a == "whole" || *a == "slide")
        .cloned();
    let runs = args.first().copied().unwrap_or(3);
    let warmup = args.get(1).copied().unwrap_or(1);
    tch::manual_seed(0);
    let cfg = SegmentorConfig::preset("upernet_convnext_tiny_512_160k").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([1, 3, 512, 2048], (Kind::Float, Device::Cpu));
    for (name, mode) in [("whole", TestMode::Whole), ("slide", TestMode::Slide)] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut times = Vec::new();
        for i in 0..warmup + runs {
            let t = Instant::now();
            let y = seg.inference_logits(&x, mode, [512, 2048]);
            assert_eq!(y.size(), [1, 150, 512, 2048]);
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{name} {:.1}", times[times.len() / 2]);
    }
}
