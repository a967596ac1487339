//! Segmentation as a user runs it: an mmseg UperNet checkpoint through `cnx convert` loads into
//! the segmentor and gives mmseg's logits (fixtures of tools/reference/gen_segmentation.py).

use cnx_backbone::checkpoint::{load_into, read_state_dict, LoadOptions};
use cnx_heads::segmentor::{Segmentor, SegmentorConfig, TestMode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use tch::{nn::VarStore, Device, Kind, Tensor};

const FIX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/heads/tests/fixtures/segmentation"
);

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{FIX}/{name}")).unwrap()).unwrap()
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The reduced configuration the fixtures were generated with.
fn fixture_config() -> SegmentorConfig {
    let c = json("config.json");
    let mut cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
    cfg.backbone.depths = ints(&c["depths"]);
    cfg.backbone.dims = ints(&c["dims"]);
    cfg.decode_head.channels = c["channels"].as_i64().unwrap();
    cfg.auxiliary_head.as_mut().unwrap().channels = c["aux_channels"].as_i64().unwrap();
    cfg.num_classes = c["num_classes"].as_i64().unwrap();
    let s = ints(&c["img_scale"]);
    cfg.test.img_scale = [s[0], s[1]];
    cfg
}

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnx-cli-seg-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn mmseg_checkpoint_through_convert_gives_mmseg_logits() {
    let out = tmp_dir().join("upernet.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args([
            "convert",
            &format!("{FIX}/model.pth"),
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = fixture_config();
    let mut vs = VarStore::new(Device::Cpu);
    let seg = Segmentor::new_uninit(&vs.root(), &cfg).unwrap();
    let report = load_into(
        &mut vs,
        &read_state_dict(&out).unwrap(),
        &LoadOptions::strict(),
    )
    .unwrap();
    assert!(report.is_clean(), "{report}");
    let outputs: HashMap<String, Tensor> =
        Tensor::read_safetensors(format!("{FIX}/outputs.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let stem = "ADE_val_00000003";
    let img = cnx_datasets::image_io::read_rgb(std::path::Path::new(&format!("{FIX}/{stem}.png")))
        .unwrap();
    let y = cnx::adapters::predict_image(&seg, &img, TestMode::Whole, false, Device::Cpu);
    let g = ints(&json("config.json")["grid"]);
    let s = y.size();
    let grid = y
        .get(0)
        .slice(1, g[0], s[2], g[1])
        .slice(2, g[0], s[3], g[1]);
    let err = (grid.to_kind(Kind::Double)
        - outputs[&format!("{stem}/whole/grid")].to_kind(Kind::Double))
    .abs()
    .max()
    .double_value(&[]);
    assert!(err < 1e-4, "max abs error {err}");
    let _ = std::fs::remove_dir_all(tmp_dir());
}
