//! ConvNeXt against PyTorch: logits (timm's ConvNeXt) and dense features (the official dense
//! formulation) from tools/reference/gen_backbone.py, loaded from every checkpoint layout the
//! script writes (official .pth, timm .pth and safetensors, mmdet whole-model .pth).
//! `full_size_parity` (ignored) runs the same checks on a full-size model written by
//! `make parity` into the directory named by CNX_PARITY_DIR.

mod convnext_support;

use cnx_backbone::checkpoint::{self, LoadOptions};
use cnx_backbone::convnext::ConvNeXt;
use cnx_backbone::dense::DenseBackbone;
use convnext_support::*;
use std::path::Path;
use tch::nn::VarStore;
use tch::Device;

const TOL: f64 = 1e-4;

/// Checks every fixture output; returns the largest error seen per kind (logits, features).
fn check_dir(dir: &Path, weight_files: &[&str]) -> (f64, f64) {
    let fx = Fixture::open(dir);
    let mut worst = (0.0f64, 0.0f64);
    for file in weight_files {
        if !dir.join(file).exists() {
            continue;
        }
        let (_vs, m) = fx.classifier(file);
        for c in &fx.cases {
            let x = input_pattern(c.batch, c.h, c.w);
            let y = tch::no_grad(|| m.forward_logits(&x, false));
            let e = max_abs_diff(&y, fx.output(&format!("{}.logits", c.name)));
            println!("{file} {} logits max abs err {e:.3e}", c.name);
            assert!(e < TOL, "{file} {}: logits max abs err {e}", c.name);
            worst.0 = worst.0.max(e);
        }
    }

    // Dense: the backbone part of an mmdet checkpoint, under `backbone.` as in a detector.
    let mut vs = VarStore::new(Device::Cpu);
    let cfg = fx.config.clone().dense(&[0, 1, 2, 3]);
    let m = ConvNeXt::new(vs.root() / "backbone", &cfg);
    let sd = checkpoint::read_state_dict(dir.join("dense_mmdet.pth")).unwrap();
    let opts = LoadOptions::partial().with_target_prefix("backbone.");
    let r = checkpoint::load_into(&mut vs, &sd, &opts).unwrap();
    assert!(r.missing.is_empty() && r.mismatched.is_empty(), "{r}");
    assert_eq!(
        r.unexpected
            .iter()
            .map(|u| u.0.as_str())
            .collect::<Vec<_>>(),
        ["neck.lateral_convs.0.conv.weight"]
    );
    for c in &fx.cases {
        let x = input_pattern(c.batch, c.h, c.w);
        let feats = tch::no_grad(|| m.forward_features(&x, false));
        assert_eq!(feats.len(), 4);
        for (i, f) in feats.iter().enumerate() {
            let e = max_abs_diff(f, fx.output(&format!("{}.feat{i}", c.name)));
            println!("dense {} feat{i} max abs err {e:.3e}", c.name);
            assert!(e < TOL, "{} feat{i}: max abs err {e}", c.name);
            worst.1 = worst.1.max(e);
        }
    }
    println!("worst: logits {:.3e}, features {:.3e}", worst.0, worst.1);
    worst
}

#[test]
fn mini_matches_pytorch_from_every_layout() {
    check_dir(
        &fixture_dir(),
        &["official.pth", "timm.safetensors", "timm.pth"],
    );
}

#[test]
fn dense_shapes_match_pytorch() {
    let fx = Fixture::open(&fixture_dir());
    let vs = VarStore::new(Device::Cpu);
    let m = ConvNeXt::new(vs.root(), &fx.config.clone().dense(&[0, 1, 2, 3]));
    let shapes = fx.meta["dense_shapes"].as_object().unwrap();
    assert_eq!(shapes.len(), 3);
    for (hw, want) in shapes {
        let (h, w) = hw.split_once('x').unwrap();
        let x = input_pattern(1, h.parse().unwrap(), w.parse().unwrap());
        let got: Vec<Vec<i64>> = tch::no_grad(|| m.forward_features(&x, false))
            .iter()
            .map(|f| f.size())
            .collect();
        let want: Vec<Vec<i64>> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(got, want, "{hw}");
    }
}

/// The mmdet checkpoint's `backbone.` part into a bare dense backbone, strictly.
#[test]
fn mmdet_backbone_prefix_strip_is_strict_clean() {
    let fx = Fixture::open(&fixture_dir());
    let mut vs = VarStore::new(Device::Cpu);
    let _m = ConvNeXt::new(vs.root(), &fx.config.clone().dense(&[0, 1, 2, 3]));
    let sd = checkpoint::read_state_dict(fx.dir.join("dense_mmdet.pth")).unwrap();
    let r = checkpoint::load_into(&mut vs, &sd, &LoadOptions::backbone_of(true)).unwrap();
    assert!(r.is_clean(), "{r}");
    // neck tensor (outside the prefix) and the num_batches_tracked buffer are skipped
    assert_eq!(r.skipped, 2);
    assert_eq!(r.loaded.len(), vs.variables().len());
}

#[test]
#[ignore = "needs `make parity` (full-size convnext_tiny written to CNX_PARITY_DIR)"]
fn full_size_parity() {
    let dir = std::env::var("CNX_PARITY_DIR").expect("CNX_PARITY_DIR");
    let (l, f) = check_dir(Path::new(&dir), &["official.pth", "timm.safetensors"]);
    println!("PARITY logits_max_abs_err={l:.3e} features_max_abs_err={f:.3e}");
}
