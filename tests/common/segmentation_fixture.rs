//! The UperNet + ConvNeXt fixtures of mmsegmentation 0.30 (tools/reference/gen_segmentation.py)
//! and the checks against them, shared by the parity tests (tests/segmentation_parity.rs) and the
//! same checks with the CPU's Winograd convolutions (tests/winograd_parity.rs).

use cnx_backbone::checkpoint::{load_into, read_state_dict, LoadOptions};
use cnx_heads::segmentor::{Segmentor, SegmentorConfig, TestMode};
use std::collections::HashMap;
use tch::{nn::VarStore, Device, Kind, Tensor};

pub const FIX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/heads/tests/fixtures/segmentation"
);

pub fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIX}/{name}")).unwrap()).unwrap()
}

pub fn tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(format!("{FIX}/{name}"))
        .unwrap()
        .into_iter()
        .collect()
}

pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The reduced configuration the fixtures were generated with.
pub fn fixture_config() -> SegmentorConfig {
    let c = json("config.json");
    let mut cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
    cfg.backbone.depths = ints(&c["depths"]);
    cfg.backbone.dims = ints(&c["dims"]);
    cfg.backbone.drop_path_rate = 0.0;
    cfg.decode_head.channels = c["channels"].as_i64().unwrap();
    cfg.decode_head.dropout_ratio = 0.0;
    let aux = cfg.auxiliary_head.as_mut().unwrap();
    aux.channels = c["aux_channels"].as_i64().unwrap();
    aux.dropout_ratio = 0.0;
    cfg.num_classes = c["num_classes"].as_i64().unwrap();
    let s = ints(&c["img_scale"]);
    cfg.test.img_scale = [s[0], s[1]];
    let s = ints(&c["crop_size"]);
    cfg.test.crop_size = [s[0], s[1]];
    let s = ints(&c["stride"]);
    cfg.test.stride = [s[0], s[1]];
    cfg.test.aug_ratios = c["ratios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    cfg
}

pub fn fixture_model() -> (VarStore, Segmentor) {
    let cfg = fixture_config();
    let mut vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new_uninit(&vs.root(), &cfg).unwrap();
    let sd = read_state_dict(format!("{FIX}/model.pth")).unwrap();
    let report = load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap();
    assert!(report.is_clean(), "{report}");
    (vs, seg)
}

pub fn grid(t: &Tensor) -> Tensor {
    let g = ints(&json("config.json")["grid"]);
    let (o, s) = (g[0], g[1]);
    let sz = t.size();
    t.get(0).slice(1, o, sz[2], s).slice(2, o, sz[3], s)
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

pub fn stems() -> Vec<String> {
    let mut v: Vec<String> = tensors("outputs.safetensors")
        .keys()
        .filter_map(|k| k.strip_suffix("/ori_hw").map(str::to_string))
        .collect();
    v.sort();
    v
}

/// The sample image as cv2 decoded it (stored losslessly by the generator).
pub fn image(stem: &str) -> cnx_datasets::image_io::Image8 {
    cnx_datasets::image_io::read_rgb(std::path::Path::new(&format!("{FIX}/{stem}.png"))).unwrap()
}

/// The full test pipeline (cv2-exact keep-ratio resize at every scale, normalisation,
/// inference, rescale to the original size) against mmseg in one mode.
pub fn check(mode: &str) {
    let (_vs, seg) = fixture_model();
    let outputs = tensors("outputs.safetensors");
    let mut worst = 0f64;
    for stem in stems() {
        let img = image(&stem);
        let ori = [img.h as i64, img.w as i64];
        let o = Vec::<i64>::try_from(&outputs[&format!("{stem}/ori_hw")]).unwrap();
        assert_eq!(ori.to_vec(), o);
        let (m, aug) = match mode {
            "whole" => (TestMode::Whole, false),
            "slide" => (TestMode::Slide, false),
            _ => (TestMode::Whole, true),
        };
        let out = cnx::adapters::predict_image(&seg, &img, m, aug, Device::Cpu);
        assert_eq!(out.size(), vec![1, seg.cfg.num_classes, ori[0], ori[1]]);
        let err = max_abs(&grid(&out), &outputs[&format!("{stem}/{mode}/grid")]);
        let npix = (ori[0] * ori[1]) as f64;
        let sums =
            out.get(0)
                .to_kind(Kind::Double)
                .sum_dim_intlist([1i64, 2].as_slice(), false, None)
                / npix;
        let ref_sums = &outputs[&format!("{stem}/{mode}/class_sum")] / npix;
        let mean_err = max_abs(&sums, &ref_sums);
        eprintln!("{stem} {mode}: max abs err {err:.3e} (grid), class-mean err {mean_err:.3e}");
        assert!(err < 1e-4, "{stem} {mode}: max abs error {err}");
        assert!(
            mean_err < 1e-5,
            "{stem} {mode}: class mean error {mean_err}"
        );
        worst = worst.max(err);
    }
    eprintln!("{mode}: worst max abs error {worst:.3e}");
}

/// The training losses of one fixed batch against mmseg's (and a backward through them).
pub fn check_forward_train() {
    let (_vs, seg) = fixture_model();
    let b = tensors("train_batch.safetensors");
    let losses = seg.forward_train(&b["image"], &b["label"].to_kind(Kind::Int64));
    let r = json("losses.json");
    // mmseg 0.30 names the cross-entropy terms `loss_ce`; we report them as `loss_seg`.
    for (ours, theirs) in [
        ("decode.loss_seg", "decode.loss_ce"),
        ("aux.loss_seg", "aux.loss_ce"),
        ("decode.acc_seg", "decode.acc_seg"),
        ("aux.acc_seg", "aux.acc_seg"),
    ] {
        let v = losses.items[ours].double_value(&[]);
        let want = r[theirs].as_f64().unwrap();
        eprintln!("{ours}: {v} vs mmseg {want}");
        let tol = if ours.contains("acc") { 1e-3 } else { 1e-5 };
        assert!(
            (v - want).abs() < tol * want.abs().max(1.0),
            "{ours}: {v} vs {want}"
        );
    }
    let total = losses.total();
    let want = r["decode.loss_ce"].as_f64().unwrap() + r["aux.loss_ce"].as_f64().unwrap();
    assert!((total.double_value(&[]) - want).abs() < 1e-5);
    total.backward();
}
