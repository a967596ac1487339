//! Training mode on CPU with a small model on real coco-tiny images: every mmdet loss is
//! present and finite, gradients reach the backbone, and a few SGD steps on one batch lower
//! the total loss.

use cnx_datasets::loader::{keyed_rng, Source};
use cnx_datasets::{CocoDataset, CocoTrain, TrainPipeline};
use cnx_heads::{Detector, DetectorConfig};
use std::sync::Arc;
use tch::nn::{OptimizerConfig, VarStore};
use tch::Device;

const COCO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/coco-tiny");

fn small_config() -> DetectorConfig {
    let mut c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    c.backbone.depths = vec![1, 1, 2, 1];
    c.backbone.dims = vec![16, 32, 64, 128];
    c.backbone.drop_path_rate = 0.0;
    c.neck.out_channels = 64;
    c.roi.fc_dim = 128;
    c.roi.mask_conv_channels = 64;
    c
}

#[test]
fn losses_are_finite_and_decrease() {
    tch::manual_seed(0);
    let ds = Arc::new(
        CocoDataset::load(
            format!("{COCO}/annotations/instances_train2017.json"),
            format!("{COCO}/train2017"),
        )
        .unwrap(),
    );
    let src = CocoTrain::new(ds, TrainPipeline::scaled(0.4));
    let samples = (0..2)
        .map(|i| src.load(i, &mut keyed_rng(0, 0, i as u64, 0)).unwrap())
        .collect();
    let batch = src.collate(samples, 0, 0);
    let vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &small_config());
    let mut opt = tch::nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, 0.005)
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for step in 0..4 {
        tch::manual_seed(1); // same samples of anchors / RoIs every step
        let t0 = std::time::Instant::now();
        let losses = cnx::adapters::forward_train_batch(&det, &batch, Device::Cpu);
        let v = losses.values();
        for k in [
            "loss_rpn_cls",
            "loss_rpn_bbox",
            "loss_cls",
            "loss_bbox",
            "loss_mask",
            "acc",
        ] {
            assert!(v[k].is_finite(), "{k} = {}", v[k]);
        }
        let total = losses.total();
        opt.zero_grad();
        total.backward();
        if step == 0 {
            let g = vs.variables()["backbone.downsample_layers.0.0.weight"].grad();
            assert!(
                g.defined() && g.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0,
                "no gradient in the backbone"
            );
        }
        opt.step();
        let t = total.double_value(&[]);
        println!(
            "step {step}: {v:?} total {t:.4} ({:.2}s)",
            t0.elapsed().as_secs_f64()
        );
        first.get_or_insert(t);
        last = t;
    }
    assert!(
        last < first.unwrap(),
        "loss did not decrease: {} -> {last}",
        first.unwrap()
    );
}
