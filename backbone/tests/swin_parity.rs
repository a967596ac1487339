//! Swin parity against the reference implementations with the same (hashed) weights:
//! timm's `swin_tiny_patch4_window7_224` logits at 224 (timm names, mapped at load) and mmdet
//! 2.x's dense `SwinTransformer` features at a non-square size that needs window padding and
//! odd-size patch merging (mmdet names, unfold-ordered merging weights, mapped at load).

mod swin_resnet_support;

use cnx_backbone::dense::DenseBackbone;
use cnx_backbone::swin::{convert_state_dict, SwinConfig, SwinTransformer};
use swin_resnet_support::{load_case, load_strict, max_err};
use tch::{nn::VarStore, Device};

#[test]
fn swin_tiny_logits_match_timm() {
    let case = load_case("swin_tiny_cls");
    let vs = VarStore::new(Device::Cpu);
    let m = SwinTransformer::new(&vs.root(), &SwinConfig::tiny().classifier(1000));
    load_strict(&vs, &convert_state_dict(case.state));
    let y = tch::no_grad(|| m.forward_cls(&case.input, false));
    let err = max_err(&y, &case.outputs["logits"]);
    println!("swin_tiny logits max abs err {err:.3e}");
    assert!(err < 1e-4, "logits differ by {err}");
}

#[test]
fn swin_tiny_dense_matches_mmdet_at_100x164() {
    let case = load_case("swin_tiny_dense");
    let vs = VarStore::new(Device::Cpu);
    let m = SwinTransformer::new(&vs.root(), &SwinConfig::tiny());
    load_strict(&vs, &convert_state_dict(case.state));
    let feats = tch::no_grad(|| m.forward_features(&case.input, false));
    assert_eq!(feats.len(), 4);
    for (i, f) in feats.iter().enumerate() {
        let err = max_err(f, &case.outputs[&format!("feat{i}")]);
        println!(
            "swin_tiny dense feat{i} {:?} max abs err {err:.3e}",
            f.size()
        );
        assert!(err < 1e-4, "feat{i} differs by {err}");
    }
}
