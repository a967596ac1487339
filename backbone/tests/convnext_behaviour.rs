//! ConvNeXt behaviour beyond numerical parity: official names, parameter counts, init, strict and
//! partial loading reports, frozen stages, stochastic depth, output shapes.

mod convnext_support;

use cnx_backbone::checkpoint::{self, CheckpointError, LoadOptions, StateDict};
use cnx_backbone::convnext::{ConvNeXt, ConvNeXtConfig};
use cnx_backbone::dense::DenseBackbone;
use cnx_backbone::nn::param_count;
use convnext_support::*;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn state_dict_of(vs: &VarStore) -> StateDict {
    let mut sd = StateDict::new();
    for (k, v) in vs.variables() {
        sd.insert(k, v.detach().copy());
    }
    sd
}

#[test]
fn official_names_and_shapes() {
    let vs = VarStore::new(Device::Cpu);
    let _m = ConvNeXt::new_uninit(vs.root(), &ConvNeXtConfig::tiny());
    let vars = vs.variables();
    // stem 4 + 3 downsamples x 4 + 18 blocks x 9 + norm 2 + head 2
    assert_eq!(vars.len(), 4 + 12 + 18 * 9 + 4);
    let shape = |k: &str| vars.get(k).unwrap_or_else(|| panic!("missing {k}")).size();
    assert_eq!(shape("downsample_layers.0.0.weight"), [96, 3, 4, 4]);
    assert_eq!(shape("downsample_layers.0.1.weight"), [96]);
    assert_eq!(shape("downsample_layers.1.0.bias"), [96]);
    assert_eq!(shape("downsample_layers.3.1.weight"), [768, 384, 2, 2]);
    assert_eq!(shape("stages.0.0.dwconv.weight"), [96, 1, 7, 7]);
    assert_eq!(shape("stages.2.8.norm.weight"), [384]);
    assert_eq!(shape("stages.1.2.pwconv1.weight"), [768, 192]);
    assert_eq!(shape("stages.1.2.pwconv2.weight"), [192, 768]);
    assert_eq!(shape("stages.3.2.gamma"), [768]);
    assert_eq!(shape("norm.weight"), [768]);
    assert_eq!(shape("head.weight"), [1000, 768]);
    assert_eq!(shape("head.bias"), [1000]);
}

#[test]
fn dense_variant_has_mmdet_names_under_backbone() {
    let vs = VarStore::new(Device::Cpu);
    let m = ConvNeXt::new_uninit(
        vs.root() / "backbone",
        &ConvNeXtConfig::tiny().dense(&[0, 1, 2, 3]),
    );
    let vars = vs.variables();
    assert!(vars.keys().all(|k| k.starts_with("backbone.")));
    for i in 0..4 {
        assert!(vars.contains_key(&format!("backbone.norm{i}.weight")));
        assert!(vars.contains_key(&format!("backbone.norm{i}.bias")));
    }
    assert!(vars.contains_key("backbone.stages.0.0.dwconv.weight"));
    assert!(vars.contains_key("backbone.downsample_layers.0.0.weight"));
    assert!(!vars.contains_key("backbone.norm.weight"));
    assert!(!vars.keys().any(|k| k.contains("head")));
    assert_eq!(m.out_channels(), [96, 192, 384, 768]);
}

#[test]
fn parameter_counts_match_the_paper() {
    // timm / official: convnext_tiny 28,589,128 and convnext_small 50,223,688 parameters.
    for (cfg, want) in [
        (ConvNeXtConfig::tiny(), 28_589_128),
        (ConvNeXtConfig::small(), 50_223_688),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let _m = ConvNeXt::new_uninit(vs.root(), &cfg);
        assert_eq!(param_count(&vs), want);
    }
}

#[test]
fn variant_names() {
    assert_eq!(
        ConvNeXtConfig::by_name("convnext_base").unwrap(),
        ConvNeXtConfig::base()
    );
    assert_eq!(
        ConvNeXtConfig::by_name("convnext_xlarge").unwrap().dims,
        [256, 512, 1024, 2048]
    );
    assert_eq!(
        ConvNeXtConfig::by_name("convnext_large").unwrap().depths,
        [3, 3, 27, 3]
    );
    let e = ConvNeXtConfig::by_name("convnext_huge")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("convnext_huge") && e.contains("convnext_tiny") && e.contains("convnext_xlarge"),
        "{e}"
    );
}

#[test]
fn official_initialisation() {
    let vs = VarStore::new(Device::Cpu);
    let mut cfg = ConvNeXtConfig::tiny();
    cfg.head_init_scale = 0.5;
    let _m = ConvNeXt::new(vs.root(), &cfg);
    let v = vs.variables();
    let std = |k: &str| v[k].std(true).double_value(&[]);
    assert!((std("stages.2.0.pwconv1.weight") - 0.02).abs() < 1e-3);
    assert!((std("downsample_layers.0.0.weight") - 0.02).abs() < 2e-3);
    assert!((std("head.weight") - 0.01).abs() < 1e-3);
    assert_eq!(
        v["stages.0.0.pwconv1.bias"].abs().max().double_value(&[]),
        0.0
    );
    assert_eq!(
        v["stages.0.0.dwconv.bias"].abs().max().double_value(&[]),
        0.0
    );
    assert!(v["stages.0.0.norm.weight"].eq(1.0).all().int64_value(&[]) == 1);
    assert!(
        v["downsample_layers.2.0.bias"]
            .eq(0.0)
            .all()
            .int64_value(&[])
            == 1
    );
    assert!((v["stages.1.1.gamma"].mean(Kind::Float).double_value(&[]) - 1e-6).abs() < 1e-12);
    // no layer scale at all when layer_scale_init_value <= 0
    let vs2 = VarStore::new(Device::Cpu);
    let _m2 = ConvNeXt::new(vs2.root(), &ConvNeXtConfig::tiny().with_layer_scale(0.0));
    assert!(!vs2.variables().keys().any(|k| k.ends_with("gamma")));
}

/// A convnext_small checkpoint into convnext_tiny: strict load fails listing the 18 extra blocks
/// of stage 2 by name and shape, and loads nothing.
#[test]
fn strict_small_into_tiny_reports_and_loads_nothing() {
    let vs_small = VarStore::new(Device::Cpu);
    let _s = ConvNeXt::new(vs_small.root(), &ConvNeXtConfig::small());
    let sd = state_dict_of(&vs_small);
    let mut vs = VarStore::new(Device::Cpu);
    let _t = ConvNeXt::new(vs.root(), &ConvNeXtConfig::tiny());
    let before = vs.variables()["stages.0.0.pwconv1.weight"].copy();
    let err = checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap_err();
    let CheckpointError::Mismatch(r) = &err else {
        panic!("{err}")
    };
    assert!(r.missing.is_empty() && r.mismatched.is_empty());
    assert_eq!(r.unexpected.len(), 18 * 9);
    assert!(r.unexpected.iter().all(|(k, _)| k.starts_with("stages.2.")));
    let msg = err.to_string();
    assert!(
        msg.contains("stages.2.9.dwconv.weight [384, 1, 7, 7]"),
        "{msg}"
    );
    assert!(msg.contains("stages.2.26.gamma [384]"), "{msg}");
    assert!(r.loaded.is_empty());
    assert!(
        vs.variables()["stages.0.0.pwconv1.weight"].equal(&before),
        "strict failure must not load anything"
    );
    // Partial: everything tiny has is loaded.
    let r = checkpoint::load_into(&mut vs, &sd, &LoadOptions::partial()).unwrap();
    assert_eq!(r.loaded.len(), vs.variables().len());
    assert!(vs.variables()["stages.0.0.pwconv1.weight"]
        .equal(sd.get("stages.0.0.pwconv1.weight").unwrap()));
}

#[test]
fn mis_shaped_tensors_are_listed_with_both_shapes() {
    let fx = Fixture::open(&fixture_dir());
    let mut cfg = fx.config.clone();
    cfg.dims = vec![16, 16, 32, 64];
    let mut vs = VarStore::new(Device::Cpu);
    let _m = ConvNeXt::new(vs.root(), &cfg);
    let sd = checkpoint::read_state_dict(fx.dir.join("official.pth")).unwrap();
    let err = checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("downsample_layers.0.0.weight [16, 3, 4, 4] vs [8, 3, 4, 4]"),
        "{msg}"
    );
    assert!(msg.contains("mis-shaped"), "{msg}");
    let CheckpointError::Mismatch(r) = err else {
        panic!()
    };
    assert!(!r.mismatched.is_empty() && r.missing.is_empty() && r.unexpected.is_empty());
}

/// ImageNet classifier weights into the backbone of a detector VarStore (mmdet init_cfg).
#[test]
fn pretrained_classifier_into_detector_backbone() {
    let fx = Fixture::open(&fixture_dir());
    let mut vs = VarStore::new(Device::Cpu);
    let _b = ConvNeXt::new(
        vs.root() / "backbone",
        &fx.config.clone().dense(&[0, 1, 2, 3]),
    );
    let _neck = vs.root().sub("neck").zeros("w", &[3]);
    let sd = checkpoint::read_state_dict(fx.dir.join("timm.safetensors")).unwrap();
    let r = checkpoint::load_into(&mut vs, &sd, &LoadOptions::pretrained_backbone()).unwrap();
    assert!(r.renamed_from_timm);
    let mut unexpected: Vec<_> = r.unexpected.iter().map(|u| u.0.clone()).collect();
    unexpected.sort();
    assert_eq!(
        unexpected,
        [
            "backbone.head.bias",
            "backbone.head.weight",
            "backbone.norm.bias",
            "backbone.norm.weight"
        ]
    );
    let missing: Vec<_> = r.missing.iter().map(|m| m.0.clone()).collect();
    assert_eq!(missing.len(), 8, "{missing:?}");
    assert!(missing.iter().all(|m| m.starts_with("backbone.norm")));
}

fn frozen_names(vs: &VarStore) -> (Vec<String>, Vec<String>) {
    let mut frozen = Vec::new();
    let mut trainable = Vec::new();
    for (k, v) in vs.variables() {
        if v.requires_grad() {
            trainable.push(k)
        } else {
            frozen.push(k)
        }
    }
    (frozen, trainable)
}

#[test]
fn frozen_stages_take_no_gradients_even_after_loading() {
    let fx = Fixture::open(&fixture_dir());
    let mut vs = VarStore::new(Device::Cpu);
    let cfg = fx
        .config
        .clone()
        .dense(&[0, 1, 2, 3])
        .with_frozen_stages(2)
        .with_drop_path(0.3);
    let m = ConvNeXt::new(vs.root() / "backbone", &cfg);
    let sd = checkpoint::read_state_dict(fx.dir.join("dense_mmdet.pth")).unwrap();
    let r = checkpoint::load_into(
        &mut vs,
        &sd,
        &LoadOptions::backbone_of(false).with_add_prefix("backbone."),
    )
    .unwrap();
    assert!(r.is_clean(), "{r}");
    let (frozen, trainable) = frozen_names(&vs);
    let is_frozen_name = |k: &str| {
        [
            "downsample_layers.0.",
            "downsample_layers.1.",
            "stages.0.",
            "stages.1.",
        ]
        .iter()
        .any(|p| k.starts_with(&format!("backbone.{p}")))
    };
    assert!(!frozen.is_empty());
    assert!(frozen.iter().all(|k| is_frozen_name(k)), "{frozen:?}");
    assert!(
        trainable.iter().all(|k| !is_frozen_name(k)),
        "{trainable:?}"
    );
    // train-mode forward + backward: frozen variables get no gradient, the others do
    let x = input_pattern(1, 64, 64);
    let loss = m
        .forward_features(&x, true)
        .iter()
        .map(|f| f.square().sum(Kind::Float))
        .fold(Tensor::from(0f32), |a, b| a + b);
    loss.backward();
    for (k, v) in vs.variables() {
        let g = v.grad();
        if is_frozen_name(&k) {
            assert!(!g.defined(), "{k} got a gradient");
        } else {
            assert!(g.defined(), "{k} got no gradient");
        }
    }
    // frozen_stages = 0: only the stem
    let vs0 = VarStore::new(Device::Cpu);
    let _m0 = ConvNeXt::new(vs0.root(), &fx.config.clone().with_frozen_stages(0));
    let (frozen0, _) = frozen_names(&vs0);
    assert_eq!(frozen0.len(), 4);
    assert!(frozen0
        .iter()
        .all(|k| k.starts_with("downsample_layers.0.")));
}

#[test]
fn drop_path_is_identity_in_eval_and_stochastic_in_train() {
    let fx = Fixture::open(&fixture_dir());
    let mut vs = VarStore::new(Device::Cpu);
    let m = ConvNeXt::new(vs.root(), &fx.config.clone().with_drop_path(0.5));
    let sd = checkpoint::read_state_dict(fx.dir.join("official.pth")).unwrap();
    checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap();
    let x = input_pattern(2, 224, 224);
    let eval = tch::no_grad(|| m.forward_logits(&x, false));
    assert!(max_abs_diff(&eval, fx.output("s224.logits")) < 1e-4);
    tch::manual_seed(0);
    let differs =
        (0..4).any(|_| max_abs_diff(&tch::no_grad(|| m.forward_logits(&x, true)), &eval) > 1e-3);
    assert!(differs, "drop path had no effect in train mode");
    // the block-level rule: rate grows linearly from 0 to drop_path_rate
    let rates: Vec<f64> = m.stages.iter().flatten().map(|b| b.drop_path).collect();
    assert_eq!(rates.first(), Some(&0.0));
    assert!((rates.last().unwrap() - 0.5).abs() < 1e-12);
}

#[test]
fn output_shapes_follow_pytorch_conv_arithmetic() {
    let vs = VarStore::new(Device::Cpu);
    let m = ConvNeXt::new_uninit(vs.root(), &ConvNeXtConfig::tiny().dense(&[0, 1, 2, 3]));
    for (h, w) in [(32, 32), (33, 47), (320, 448)] {
        let x = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
        let got: Vec<Vec<i64>> = tch::no_grad(|| m.forward_features(&x, false))
            .iter()
            .map(|f| f.size())
            .collect();
        // conv k4 s4, then three conv k2 s2, no padding: floor divisions
        let (mut hh, mut ww) = (h / 4, w / 4);
        let mut want = Vec::new();
        for (i, c) in [96, 192, 384, 768].into_iter().enumerate() {
            if i > 0 {
                hh /= 2;
                ww /= 2;
            }
            want.push(vec![1, c, hh, ww]);
        }
        assert_eq!(got, want, "{h}x{w}");
    }
    let vs = VarStore::new(Device::Cpu);
    let m = ConvNeXt::new_uninit(vs.root(), &ConvNeXtConfig::tiny().dense(&[1, 3]));
    let f = tch::no_grad(|| {
        m.forward_features(
            &Tensor::zeros([2, 3, 33, 47], (Kind::Float, Device::Cpu)),
            false,
        )
    });
    assert_eq!(
        f.iter().map(|t| t.size()).collect::<Vec<_>>(),
        [vec![2, 192, 4, 5], vec![2, 768, 1, 1]]
    );
    assert_eq!(m.out_channels(), [192, 768]);
}
