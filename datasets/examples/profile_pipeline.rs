//! Time the stages of the COCO train pipeline on one thread (decode, resize, normalize):
//! `cargo run --release -p cnx-datasets --example profile_pipeline -- ANN IMG_DIR`.

use std::time::Instant;

use cnx_datasets::image_io;
use cnx_datasets::pipeline::{normalize_into, pad_up};
use cnx_datasets::CocoDataset;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let ds = CocoDataset::load(&a[1], &a[2]).unwrap();
    let n = ds.images.len();
    let t = Instant::now();
    let imgs: Vec<_> = (0..n)
        .map(|i| image_io::read_rgb(&ds.image_path(i)).unwrap())
        .collect();
    let dec = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    let res: Vec<_> = imgs
        .iter()
        .map(|im| {
            let ((w, h), _) = image_io::rescale_size(im.w, im.h, (640, 1333));
            image_io::resize_bilinear(im, w, h)
        })
        .collect();
    let rs = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for r in &res {
        let (ph, pw) = (pad_up(r.h, 32), pad_up(r.w, 32));
        let mut buf = vec![0f32; 3 * ph * pw];
        normalize_into(r, &mut buf, pw, ph);
    }
    let nm = t.elapsed().as_secs_f64() / n as f64;
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(ds.masks(i, cnx_datasets::MaskMode::Bitmap));
    }
    let mk = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "per image: decode {:.2} ms, resize {:.2} ms, normalize+pad {:.2} ms, masks {:.2} ms",
        dec * 1e3,
        rs * 1e3,
        nm * 1e3,
        mk * 1e3
    );
}
