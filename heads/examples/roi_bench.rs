//! Micro-benchmark of RoIAlign forward / backward (CPU): `cargo run --release -p cnx-heads --example roi_bench`.
use cnx_heads::roi_align::roi_align;
use std::time::Instant;
use tch::{Kind, Tensor};

fn main() {
    tch::manual_seed(0);
    let c: i64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let feat =
        Tensor::randn([2, c, 80, 134], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let r = 1024;
    let xy = Tensor::rand([r, 2], (Kind::Float, tch::Device::Cpu)) * 400.0;
    let wh = Tensor::rand([r, 2], (Kind::Float, tch::Device::Cpu)) * 100.0 + 4.0;
    let b = Tensor::randint(2, [r, 1], (Kind::Float, tch::Device::Cpu));
    let rois = Tensor::cat(&[b, xy.shallow_clone(), xy + wh], 1);
    for _ in 0..3 {
        let t = Instant::now();
        let o = roi_align(&feat, &rois, (7, 7), 0.25, 0, true);
        let tf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        o.sum(Kind::Float).backward();
        println!(
            "C={c} R={r}: forward {tf:.3}s backward {:.3}s",
            t.elapsed().as_secs_f64()
        );
    }
}
