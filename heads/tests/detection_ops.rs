//! Blocks against torchvision.ops / mmdet fixtures (tools/reference/gen_detection.py).

use cnx_heads::anchors::AnchorGenerator;
use cnx_heads::boxes::{box_iou, generalized_box_iou, to_vec_i64};
use cnx_heads::coder::DeltaXYWHCoder;
use cnx_heads::nms::{batched_nms, nms};
use cnx_heads::roi_align::roi_align;
use tch::{Device, Kind, Tensor};

mod common;
use common::ops_fixtures as fixtures;

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn roi_align_forward_and_grad_match_torchvision() {
    let f = fixtures();
    let feat = &f["roi_feat"];
    let rois = &f["roi_rois"];
    for (name, size, scale, sr, aligned) in [
        ("a7", 7, 1.0, 0, true),
        ("a14h", 14, 0.5, 0, true),
        ("s2", 7, 1.0, 2, true),
        ("na", 7, 1.0, 0, false),
    ] {
        let x = feat.copy().set_requires_grad(true);
        let out = roi_align(&x, rois, (size, size), scale, sr, aligned);
        let d = max_abs(&out, &f[&format!("roi_{name}_out")]);
        assert!(d < 1e-5, "{name}: forward differs by {d}");
        (&out * &f[&format!("roi_{name}_gout")])
            .sum(Kind::Float)
            .backward();
        let g = x.grad();
        let d = max_abs(&g, &f[&format!("roi_{name}_grad")]);
        assert!(d < 1e-4, "{name}: gradient differs by {d}");
    }
}

#[test]
fn nms_and_batched_nms_match_torchvision() {
    let f = fixtures();
    for k in ["03", "05", "07"] {
        let thr: f64 = format!("0.{}", &k[1..]).parse().unwrap();
        let keep = nms(&f["nms_boxes"], &f["nms_scores"], thr);
        assert_eq!(
            to_vec_i64(&keep),
            to_vec_i64(&f[&format!("nms_keep_{k}")]),
            "nms {thr}"
        );
        let keep = batched_nms(&f["nms_boxes"], &f["nms_scores"], &f["nms_idxs"], thr);
        assert_eq!(
            to_vec_i64(&keep),
            to_vec_i64(&f[&format!("bnms_keep_{k}")]),
            "batched nms {thr}"
        );
    }
}

#[test]
fn iou_and_giou_match_torchvision() {
    let f = fixtures();
    let b = &f["nms_boxes"];
    let (a, c) = (b.slice(0, 0, 50, 1), b.slice(0, 50, 120, 1));
    assert!(max_abs(&box_iou(&a, &c), &f["iou"]) < 1e-6);
    assert!(max_abs(&generalized_box_iou(&a, &c), &f["giou"]) < 1e-6);
}

#[test]
fn anchors_and_valid_flags_match_mmdet() {
    let f = fixtures();
    let ag = AnchorGenerator::default();
    let sizes = [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)];
    for (l, a) in ag.anchors(&sizes, Device::Cpu).iter().enumerate() {
        assert_eq!(max_abs(a, &f[&format!("anchors_{l}")]), 0.0, "level {l}");
        let v = ag
            .valid_flags(l, sizes[l], (45, 60), Device::Cpu)
            .to_kind(Kind::Uint8);
        assert!(v.equal(&f[&format!("valid_{l}")]), "valid flags level {l}");
    }
}

#[test]
fn delta_coder_matches_mmdet() {
    let f = fixtures();
    let c = DeltaXYWHCoder::new([0.0; 4], [0.1, 0.1, 0.2, 0.2]);
    let enc = c.encode(&f["coder_props"], &f["coder_gts"]);
    assert!(max_abs(&enc, &f["coder_enc"]) < 1e-5);
    let dec = c.decode(&f["coder_props"], &f["coder_deltas"], Some((90.0, 120.0)));
    assert!(max_abs(&dec, &f["coder_dec"]) < 1e-4);
}
