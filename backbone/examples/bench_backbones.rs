//! CPU forward timing of the comparison backbones (Swin-T, ResNet-50 classifiers, batch 8 at
//! 224, eval, no grad) for bench/backbones_cmp.sh: warm-up, then the median of several runs.
//! Usage: bench_backbones [MODEL...] (default: swin_tiny resnet50); prints `MODEL MEDIAN_MS`.

use cnx_backbone::config::BackboneConfig;
use cnx_backbone::resnet::ResNet;
use cnx_backbone::swin::SwinTransformer;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn median_ms(f: &dyn Fn() -> Tensor, warmup: usize, runs: usize) -> f64 {
    for _ in 0..warmup {
        let _ = f();
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            let _ = f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn main() {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names = vec!["swin_tiny".into(), "resnet50".into()];
    }
    let batch: i64 = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let x = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
    for n in names {
        let vs = VarStore::new(Device::Cpu);
        let f: Box<dyn Fn() -> Tensor> = match BackboneConfig::by_name(&n).expect("known backbone")
        {
            BackboneConfig::Swin(c) => {
                let m = SwinTransformer::new(&vs.root(), &c.classifier(1000));
                let x = x.shallow_clone();
                Box::new(move || tch::no_grad(|| m.forward_cls(&x, false)))
            }
            BackboneConfig::ResNet(c) => {
                let m = ResNet::new(&vs.root(), &c.classifier(1000));
                let x = x.shallow_clone();
                Box::new(move || tch::no_grad(|| m.forward_cls(&x, false)))
            }
            BackboneConfig::ConvNeXt(_) => panic!("ConvNeXt is benchmarked elsewhere"),
        };
        println!("{n} {:.1}", median_ms(&*f, 2, runs));
    }
}
