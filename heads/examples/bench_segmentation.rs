//! CPU inference timing of UperNet + ConvNeXt-T (upernet_convnext_tiny_512_160k, random weights)
//! on one 512x2048 image, eval mode, no grad: whole-image (`encode_decode`) and sliding-window
//! (crop 512, stride 341) logits, rescaled to 512x2048. Driven by bench/segmentation.py, which
//! alternates it run by run with the reference: prints `ready` once built, then for each stdin
//! line `whole` or `slide` runs that mode once and prints the milliseconds it took.

use cnx_heads::segmentor::{Segmentor, SegmentorConfig, TestMode};
use std::io::{BufRead, Write};
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn main() {
    tch::manual_seed(0);
    let cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new(&vs.root(), &cfg).unwrap();
    let x = Tensor::randn([1, 3, 512, 2048], (Kind::Float, Device::Cpu));
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let mode = match line.unwrap().trim() {
            "whole" => TestMode::Whole,
            "slide" => TestMode::Slide,
            other => panic!("unknown mode {other:?} (whole | slide)"),
        };
        let t = Instant::now();
        let y = seg.inference_logits(&x, mode, [512, 2048]);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(y.size(), [1, 150, 512, 2048]);
        writeln!(out, "{ms:.1}").unwrap();
        out.flush().unwrap();
    }
}
