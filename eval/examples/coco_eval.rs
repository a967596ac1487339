//! Minimal COCO evaluation driver without the `cnx` binary (no libtorch), for profiling:
//! `cargo run --release -p cnx-eval --example coco_eval -- GT.json RES.json bbox|segm`.

use cnx_eval::coco::{self, CocoGt, IouType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        return Err("usage: coco_eval GT.json RES.json bbox|segm".into());
    }
    let t0 = std::time::Instant::now();
    let (gt, dets) = rayon::join(|| CocoGt::load(&a[1]), || coco::load_results(&a[2]));
    let (gt, dets) = (gt?, dets?);
    eprintln!("load: {:.3}s", t0.elapsed().as_secs_f64());
    let t = if a[3] == "segm" {
        IouType::Segm
    } else {
        IouType::Bbox
    };
    let ev = coco::evaluate(&gt, &dets, t)?;
    eprintln!("total: {:.3}s", t0.elapsed().as_secs_f64());
    print!("{}", ev.summary.format_pycocotools());
    Ok(())
}
