//! The RPN's border rule against mmdet 2.28 (fixture: tools/reference/gen_anchor_border.py):
//! valid anchors come from each image's own padded shape, and with `allowed_border >= 0`
//! (Cascade's config: 0) anchors crossing the unpadded image are left out of the targets,
//! while Mask R-CNN's `allowed_border = -1` keeps them.

use cnx_heads::anchors::{inside_flags, AnchorGenerator};
use cnx_heads::cascade::CascadeConfig;
use cnx_heads::rpn::{RpnOutputs, RpnTargets};
use cnx_heads::DetectorConfig;
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/anchor_border");
/// (img_shape, pad_shape) of the fixture's two images.
const IMAGES: [((i64, i64), (i64, i64)); 2] = [((45, 60), (64, 64)), ((70, 50), (96, 64))];
/// Feature sizes of the batch padded to 96x64, strides 4..64.
const SIZES: [(i64, i64); 5] = [(24, 16), (12, 8), (6, 4), (3, 2), (2, 1)];

fn fixture() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(format!("{DIR}/anchor_border.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn valid(ag: &AnchorGenerator, pad: (i64, i64)) -> Tensor {
    let v: Vec<Tensor> = SIZES
        .iter()
        .enumerate()
        .map(|(l, &f)| ag.valid_flags(l, f, pad, Device::Cpu))
        .collect();
    Tensor::cat(&v, 0)
}

#[test]
fn valid_and_inside_flags_match_mmdet() {
    let f = fixture();
    let ag = AnchorGenerator::default();
    let anchors = Tensor::cat(&ag.anchors(&SIZES, Device::Cpu), 0);
    assert!(anchors.equal(&f["anchors"]));
    for (i, (img, pad)) in IMAGES.iter().enumerate() {
        let v = valid(&ag, *pad);
        assert!(
            v.to_kind(Kind::Uint8).equal(&f[&format!("valid_{i}")]),
            "valid {i}"
        );
        for (b, key) in [(-1.0, "m1"), (0.0, "0"), (8.0, "8")] {
            let got = inside_flags(&anchors, &v, *img, b).to_kind(Kind::Uint8);
            let want = &f[&format!("inside_{i}_{key}")];
            assert!(got.equal(want), "inside image {i} border {b}");
        }
        // The rule matters here: border 0 drops anchors that -1 keeps.
        let dropped = (&f[&format!("inside_{i}_m1")] - &f[&format!("inside_{i}_0")])
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert!(dropped > 100, "image {i}: {dropped}");
    }
}

/// RPN targets of the fixture's batch with GT boxes near the borders.
fn targets(rpn_cfg: &cnx_heads::detector::RpnCfg) -> RpnTargets {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let rpn = rpn_cfg.build(&(vs.root() / "rpn_head"), 8);
    let out = RpnOutputs {
        cls: SIZES
            .iter()
            .map(|&(h, w)| Tensor::zeros([2, 3, h, w], (Kind::Float, Device::Cpu)))
            .collect(),
        reg: SIZES
            .iter()
            .map(|&(h, w)| Tensor::zeros([2, 12, h, w], (Kind::Float, Device::Cpu)))
            .collect(),
    };
    let gts = [
        Tensor::from_slice(&[0f32, 0., 28., 28., 30., 10., 58., 44.]).view([2, 4]),
        Tensor::from_slice(&[5f32, 40., 48., 69.]).view([1, 4]),
    ];
    let imgs: Vec<(i64, i64)> = IMAGES.iter().map(|x| x.0).collect();
    let pads: Vec<(i64, i64)> = IMAGES.iter().map(|x| x.1).collect();
    rpn.targets(&out, &imgs, &pads, &gts)
}

fn both(f: &BTreeMap<String, Tensor>, key: &str) -> Tensor {
    Tensor::cat(
        &[
            &f[&format!("inside_0_{key}")],
            &f[&format!("inside_1_{key}")],
        ],
        0,
    )
    .to_kind(Kind::Bool)
}

#[test]
fn cascade_rpn_ignores_border_anchors_and_mask_rcnn_keeps_them() {
    let f = fixture();
    let crossing = both(&f, "m1").logical_and(&both(&f, "0").logical_not());
    let used = |t: &RpnTargets| t.label_weights.gt(0.0);

    let cascade = CascadeConfig::cascade_mask_rcnn_convnext("tiny").unwrap();
    assert_eq!(cascade.base.rpn.allowed_border, 0.0);
    let t = targets(&cascade.base.rpn);
    assert!(t.inside.equal(&both(&f, "0")), "cascade: inside flags");
    let n = used(&t)
        .logical_and(&crossing)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert_eq!(n, 0, "cascade assigned {n} anchors crossing the border");
    assert!(t.num_samples > 0);

    let mask = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
    assert_eq!(mask.rpn.allowed_border, -1.0);
    let t = targets(&mask.rpn);
    assert!(t.inside.equal(&both(&f, "m1")), "mask r-cnn: inside flags");
    let n = used(&t)
        .logical_and(&crossing)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(n > 0, "mask r-cnn sampled no anchor crossing the border");
}
