//! Times `predict` of a ConvNeXt-T detector on one preprocessed image (for bench/detection.sh):
//! `bench_detect ARCH DIR THREADS RUNS`, ARCH `mask_rcnn` or `cascade`, DIR from
//! `bench/detection.py prepare ARCH DIR`. Prints the median seconds and the number of detections.
use cnx_heads::cascade::{CascadeConfig, CascadeDetector};
use cnx_heads::{Detections, Detector, DetectorConfig, ImgMeta};
use std::collections::HashMap;
use tch::{nn::VarStore, Device, Tensor};

/// `predict` of either detector.
type Predict = Box<dyn Fn(&Tensor, &[ImgMeta]) -> Vec<Detections>>;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (arch, dir, threads, runs): (&str, &str, i32, usize) =
        (&a[1], &a[2], a[3].parse().unwrap(), a[4].parse().unwrap());
    tch::set_num_threads(threads);
    let mut vs = VarStore::new(Device::Cpu);
    // Both architectures share the input and timing; only the network differs.
    let predict: Predict = match arch {
        "mask_rcnn" => {
            let cfg = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
            let det = Detector::new(&vs.root(), &cfg);
            Box::new(move |x, m| det.predict(x, m))
        }
        "cascade" => {
            let cfg = CascadeConfig::cascade_mask_rcnn_convnext("tiny").unwrap();
            let det = CascadeDetector::new(&vs.root(), &cfg);
            Box::new(move |x, m| det.predict(x, m))
        }
        other => panic!("unknown ARCH {other:?} (mask_rcnn | cascade)"),
    };
    cnx_heads::weights::load_checkpoint(&mut vs, format!("{dir}/weights.safetensors"), false)
        .unwrap();
    let inp: HashMap<String, Tensor> = Tensor::read_safetensors(format!("{dir}/input.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let v = |k: &str| cnx_heads::boxes::to_vec_f32(&inp[k]);
    let (is, os, sf) = (v("img_shape"), v("ori_shape"), v("scale_factor"));
    let meta = ImgMeta {
        img_shape: (is[0] as i64, is[1] as i64),
        pad_shape: cnx_heads::structures::pad_shape((is[0] as i64, is[1] as i64), 32),
        ori_shape: (os[0] as i64, os[1] as i64),
        scale_factor: (sf[0], sf[1]),
    };
    let mut times = Vec::new();
    let mut n = 0;
    for _ in 0..runs + 1 {
        let t = std::time::Instant::now();
        let d = tch::no_grad(|| predict(&inp["image"], std::slice::from_ref(&meta)));
        times.push(t.elapsed().as_secs_f64());
        n = d[0].boxes.size()[0];
    }
    let mut t = times[1..].to_vec();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{:.4} {n}", t[t.len() / 2]);
}
