//! Whole-network parity with mmdetection 2.28's own Mask R-CNN (reduced ConvNeXt, seeded random
//! weights, coco-tiny images; fixtures from tools/reference/gen_detection.py): the same RPN
//! proposals, detections and pasted masks.

use cnx_eval::Rle;
use cnx_heads::weights::load_checkpoint;
use cnx_heads::{Detector, DetectorConfig, ImgMeta};
use serde_json::Value;
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/heads/tests/fixtures/detection"
);

pub fn small_config() -> DetectorConfig {
    let mut c = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    c.backbone.depths = vec![1, 1, 2, 1];
    c.backbone.dims = vec![16, 32, 64, 128];
    c.neck.out_channels = 64;
    c.roi.fc_dim = 128;
    c.roi.mask_conv_channels = 64;
    c
}

struct Case {
    images: Tensor,
    metas: Vec<ImgMeta>,
    exp: HashMap<String, Tensor>,
    info: Value,
}

fn case() -> Case {
    let exp: HashMap<String, Tensor> =
        Tensor::read_safetensors(format!("{DIR}/maskrcnn_expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DIR}/maskrcnn_expected.json")).unwrap(),
    )
    .unwrap();
    let pad = info["pad_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect::<Vec<_>>();
    let n = info["images"].as_array().unwrap().len() as i64;
    let images = Tensor::zeros([n, 3, pad[0], pad[1]], (Kind::Float, Device::Cpu));
    let mean = Tensor::from_slice(&[123.675f32, 116.28, 103.53]);
    let std = Tensor::from_slice(&[58.395f32, 57.12, 57.375]);
    let mut metas = Vec::new();
    for (i, im) in info["images"].as_array().unwrap().iter().enumerate() {
        let img = &exp[&format!("image_{i}")];
        let (h, w) = (img.size()[0], img.size()[1]);
        let x = ((img.to_kind(Kind::Float) - &mean) / &std).permute([2, 0, 1]);
        images
            .get(i as i64)
            .slice(1, 0, h, 1)
            .slice(2, 0, w, 1)
            .copy_(&x);
        let sf = im["scale_factor"].as_array().unwrap();
        let ori = im["ori_shape"].as_array().unwrap();
        metas.push(ImgMeta {
            img_shape: (h, w),
            pad_shape: cnx_heads::structures::pad_shape((h, w), 32),
            ori_shape: (ori[0].as_i64().unwrap(), ori[1].as_i64().unwrap()),
            scale_factor: (
                sf[0].as_f64().unwrap() as f32,
                sf[1].as_f64().unwrap() as f32,
            ),
        });
    }
    Case {
        images,
        metas,
        exp,
        info,
    }
}

fn model(weights: &str) -> (VarStore, Detector) {
    let mut vs = VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), &small_config());
    let report = load_checkpoint(&mut vs, format!("{DIR}/{weights}"), false).unwrap();
    assert!(report.is_clean(), "{report}");
    (vs, det)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn same_proposals_detections_and_masks_as_mmdet() {
    let c = case();
    let (_vs, det) = model("maskrcnn_weights.safetensors");
    tch::no_grad(|| {
        let feats = det.features(&c.images, false);
        let props = det.proposals(&feats, &c.metas);
        for (i, p) in props.iter().enumerate() {
            // mmdet's (K,5) rows: boxes then objectness.
            let p = &p.to_rows();
            let e = &c.exp[&format!("proposals_{i}")];
            assert_eq!(p.size(), e.size(), "image {i}: proposal count");
            let d = max_abs(p, e);
            println!("image {i}: {} proposals, max |diff| {d:.2e}", p.size()[0]);
            // Proposals with equal scores may come in either order (the sort is not stable
            // across CPUs' kernels): a row that differs must equal a reference row of the same
            // score.
            let rowd = (p.to_kind(Kind::Double) - e.to_kind(Kind::Double))
                .abs()
                .amax([1i64].as_slice(), false);
            let bad = rowd.gt(1e-3).nonzero().view([-1]);
            for k in 0..bad.size()[0] {
                let r = p.get(bad.int64_value(&[k]));
                let same_score = (e.select(1, 4) - r.double_value(&[4])).abs().lt(1e-6);
                let cands = e.index_select(0, &same_score.nonzero().view([-1]));
                let best = (cands - &r).abs().amax([1i64].as_slice(), false).min();
                assert!(
                    best.double_value(&[]) < 1e-3,
                    "image {i}: proposal {r:?} has no reference row of the same score"
                );
            }
            assert!(
                bad.size()[0] <= 4,
                "image {i}: {} proposals out of place",
                bad.size()[0]
            );
            if bad.size()[0] > 0 {
                println!("  {} tied proposals in the other order", bad.size()[0]);
            }
        }
        let dets = det.predict_from_proposals(&feats, &props, &c.metas);
        for (i, d) in dets.iter().enumerate() {
            let eb = &c.exp[&format!("det_boxes_{i}")];
            assert_eq!(d.boxes.size(), eb.size(), "image {i}: detection count");
            let db = max_abs(&d.boxes, eb);
            let ds = max_abs(&d.scores, &c.exp[&format!("det_scores_{i}")]);
            assert!(
                d.labels.equal(&c.exp[&format!("det_labels_{i}")]),
                "image {i}: labels differ"
            );
            let masks = d.masks.as_ref().unwrap();
            let (h, w) = (masks.size()[1] as usize, masks.size()[2] as usize);
            let rles = c.info["images"][i]["masks"].as_array().unwrap();
            let mut min_iou: f64 = 1.0;
            for (k, r) in rles.iter().enumerate() {
                let ours = Vec::<u8>::try_from(
                    &masks
                        .get(k as i64)
                        .to_kind(Kind::Uint8)
                        .contiguous()
                        .view([-1]),
                )
                .unwrap();
                let a = Rle::encode_row_major(&ours, h, w);
                let b = Rle::from_compressed_string(r.as_str().unwrap(), h, w).unwrap();
                let iou = cnx_eval::mask::iou(
                    std::slice::from_ref(&a),
                    std::slice::from_ref(&b),
                    &[false],
                )[0];
                let iou = if a.area() == 0 && b.area() == 0 {
                    1.0
                } else {
                    iou
                };
                min_iou = min_iou.min(iou);
            }
            println!("image {i}: {} detections, box |diff| {db:.2e}, score |diff| {ds:.2e}, min mask IoU {min_iou:.4}", eb.size()[0]);
            assert!(db < 1e-3, "image {i}: boxes differ by {db}");
            assert!(ds < 1e-4, "image {i}: scores differ by {ds}");
            assert!(min_iou >= 0.99, "image {i}: mask IoU {min_iou}");
        }
    });
}

#[test]
fn predict_end_to_end_and_torch_checkpoint_load() {
    // The torch.save'd mmdet checkpoint (fp16 storage) loads strictly and predicts the same
    // labels as the fixture (fp16 weights shift scores a little, so only the top few are compared).
    let c = case();
    let (_vs, det) = model("mmdet_ckpt.pth");
    let dets = det.predict(&c.images, &c.metas);
    assert_eq!(dets.len(), 2);
    for d in &dets {
        assert!(d.boxes.size()[0] > 0);
        assert_eq!(d.masks.as_ref().unwrap().size()[0], d.boxes.size()[0]);
    }
}
