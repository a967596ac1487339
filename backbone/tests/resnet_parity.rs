//! ResNet-50 / ResNeXt-101 32x4d / 64x4d parity against torchvision's `ResNet(Bottleneck, ...)`
//! with the same (hashed) full-size weights: logits of the classifier and layer1..4 outputs of
//! the dense variant (mmdet setting: frozen stem + layer1, norm_eval) in eval mode.

mod swin_resnet_support;

use cnx_backbone::dense::DenseBackbone;
use cnx_backbone::resnet::{ResNet, ResNetConfig};
use swin_resnet_support::{load_case, load_strict, max_err};
use tch::{nn::VarStore, Device};

fn check(case_name: &str, cfg: ResNetConfig) {
    let case = load_case(case_name);
    // Classifier: torchvision's model as is.
    let vs = VarStore::new(Device::Cpu);
    let m = ResNet::new(&vs.root(), &cfg.clone().classifier(1000));
    load_strict(&vs, &case.state);
    let y = tch::no_grad(|| m.forward_cls(&case.input, false));
    let err = max_err(&y, &case.outputs["logits"]);
    println!("{case_name} logits max abs err {err:.3e}");
    assert!(err < 1e-4, "{case_name} logits differ by {err}");
    // Dense variant (no fc): the same weights minus the classifier; train=true must still use
    // running statistics (norm_eval) so it matches eval-mode torchvision.
    let vs = VarStore::new(Device::Cpu);
    let d = ResNet::new(&vs.root(), &cfg);
    let state: Vec<_> = case
        .state
        .into_iter()
        .filter(|(k, _)| !k.starts_with("fc."))
        .collect();
    load_strict(&vs, &state);
    let feats = tch::no_grad(|| d.forward_features(&case.input, true));
    for (i, f) in feats.iter().enumerate() {
        let err = max_err(f, &case.outputs[&format!("feat{i}")]);
        println!(
            "{case_name} layer{} {:?} max abs err {err:.3e}",
            i + 1,
            f.size()
        );
        assert!(err < 1e-4, "{case_name} layer{} differs by {err}", i + 1);
    }
}

#[test]
fn resnet50_matches_torchvision() {
    check("resnet50", ResNetConfig::resnet50());
}

#[test]
fn resnext101_32x4d_matches_torchvision() {
    check("resnext101_32x4d", ResNetConfig::resnext101_32x4d());
}

#[test]
fn resnext101_64x4d_matches_torchvision() {
    check("resnext101_64x4d", ResNetConfig::resnext101_64x4d());
}
