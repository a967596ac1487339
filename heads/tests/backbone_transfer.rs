//! Backbone transfer: Swin and ResNet backbones under Mask R-CNN, Cascade Mask R-CNN and UperNet,
//! chosen through the configs (`BackboneCfg::name` / `BackboneSpec::name`) and the comparison
//! presets. Each model trains one step (finite losses, gradients reach the trainable backbone
//! stages and not the frozen ones), predicts, and carries the names its checkpoints use.

use cnx_heads::cascade::{CascadeConfig, CascadeDetector};
use cnx_heads::detector::BackboneCfg;
use cnx_heads::segmentor::{BackboneSpec, Segmentor, SegmentorConfig};
use cnx_heads::{Detector, DetectorConfig, GtInstances, ImgMeta};
use tch::nn::{self, OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

const H: i64 = 96;
const W: i64 = 128;

fn inputs() -> (Tensor, Vec<ImgMeta>, Vec<GtInstances>) {
    let images = Tensor::randn([1, 3, H, W], (Kind::Float, Device::Cpu));
    let metas = vec![ImgMeta {
        img_shape: (H, W),
        pad_shape: cnx_heads::structures::pad_shape((H, W), 32),
        ori_shape: (H, W),
        scale_factor: (1.0, 1.0),
    }];
    let gts = vec![GtInstances {
        boxes: Tensor::from_slice(&[8.0f32, 10.0, 60.0, 70.0, 40.0, 30.0, 120.0, 90.0])
            .view([2, 4]),
        labels: Tensor::from_slice(&[3i64, 17]),
        masks: None,
    }];
    (images, metas, gts)
}

/// One SGD step on `loss`; returns the names of variables that received a non-zero gradient.
fn step(vs: &VarStore, loss: &Tensor) -> Vec<String> {
    let mut opt = nn::Sgd::default().build(vs, 1e-3).unwrap();
    opt.zero_grad();
    loss.backward();
    let got = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad() && v.grad().defined())
        .filter(|(_, v)| v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0)
        .map(|(k, _)| k)
        .collect();
    opt.step();
    got
}

fn check_grads(backbone: &str, with_grad: &[String]) {
    let has = |p: &str| with_grad.iter().any(|k| k.starts_with(p));
    if backbone.starts_with("swin") {
        assert!(has("backbone.patch_embed."), "{backbone}: {with_grad:?}");
        assert!(has("backbone.layers.3."), "{backbone}");
    } else {
        // mmdet's ResNet setting: stem and layer1 frozen, the rest trains.
        assert!(
            !has("backbone.conv1.") && !has("backbone.layer1."),
            "{backbone}"
        );
        assert!(
            has("backbone.layer2.") && has("backbone.layer4."),
            "{backbone}"
        );
    }
}

#[test]
fn mask_rcnn_with_swin_and_resnet() {
    tch::manual_seed(0);
    for backbone in ["swin_tiny", "resnet50"] {
        let mut cfg = DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
        cfg.backbone = BackboneCfg::named(backbone, 0.1).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let det = Detector::new(&vs.root(), &cfg);
        let (images, metas, gts) = inputs();
        let losses = det.forward_train(&images, &metas, &gts);
        let v = losses.values();
        for k in [
            "loss_rpn_cls",
            "loss_rpn_bbox",
            "loss_cls",
            "loss_bbox",
            "loss_mask",
        ] {
            assert!(v[k].is_finite(), "{backbone} {k} = {}", v[k]);
        }
        check_grads(backbone, &step(&vs, &losses.total()));
        let dets = tch::no_grad(|| det.predict(&images, &metas));
        assert_eq!(dets.len(), 1);
        assert_eq!(dets[0].boxes.size()[1], 4);
    }
    // A named backbone the project lacks is refused.
    assert!(BackboneCfg::named("vgg16", 0.0).is_err());
}

#[test]
fn cascade_with_resnet_and_swin_presets() {
    tch::manual_seed(0);
    for preset in ["cascade_mask_rcnn_r50_3x", "cascade_mask_rcnn_swin_tiny_3x"] {
        let cfg = cascade_row(preset);
        let backbone = cfg.base.backbone.name.clone().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let det = CascadeDetector::new(&vs.root(), &cfg);
        let (images, metas, gts) = inputs();
        let losses = det.forward_train(&images, &metas, &gts);
        let v = losses.values();
        for s in 0..3 {
            let k = format!("s{s}.loss_bbox");
            assert!(v[&k].is_finite(), "{preset} {k}");
        }
        check_grads(&backbone, &step(&vs, &losses.total()));
        let dets = tch::no_grad(|| det.predict(&images, &metas));
        assert_eq!(dets.len(), 1);
    }
    // Names of the backbones' checkpoints (timm/official Swin, torchvision ResNet).
    let vs = VarStore::new(Device::Cpu);
    let _ = CascadeDetector::new(&vs.root(), &cascade_row("cascade_mask_rcnn_x101_32x4d_3x"));
    let vars = vs.variables();
    assert_eq!(
        vars["backbone.layer1.0.conv2.weight"].size(),
        [128, 4, 3, 3]
    );
    assert_eq!(
        vars["backbone.layer4.2.conv3.weight"].size(),
        [2048, 1024, 1, 1]
    );
}

#[test]
fn upernet_with_swin_and_resnet() {
    tch::manual_seed(0);
    // The comparison row's model (its optimizer settings are the engine presets' business).
    let mut swin = SegmentorConfig::upernet_convnext("tiny").unwrap();
    swin.backbone = BackboneSpec::from_name("swin_tiny", 0.3).unwrap();
    let mut r50 = SegmentorConfig::upernet_convnext("tiny").unwrap();
    r50.backbone = BackboneSpec::from_name("resnet50", 0.0).unwrap();
    for cfg in [&mut swin, &mut r50] {
        cfg.decode_head.channels = 64;
        cfg.auxiliary_head.as_mut().unwrap().channels = 32;
        let backbone = cfg.backbone.name.clone().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let seg = Segmentor::new(&vs.root(), cfg).unwrap();
        let images = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(150, [2, 64, 64], (Kind::Int64, Device::Cpu));
        let losses = seg.forward_train(&images, &labels);
        let total = losses.total();
        assert!(total.double_value(&[]).is_finite(), "{backbone}");
        check_grads(&backbone, &step(&vs, &total));
        let logits = tch::no_grad(|| seg.encode_decode(&images));
        assert_eq!(logits.size(), [2, 150, 64, 64], "{backbone}");
    }
    // A named backbone with other outputs is refused with the reason.
    let mut bad = SegmentorConfig::upernet_convnext("tiny").unwrap();
    bad.backbone = BackboneSpec::from_name("swin_tiny", 0.3).unwrap();
    bad.backbone.out_indices = vec![1, 2, 3];
    let err = Segmentor::new(&VarStore::new(Device::Cpu).root(), &bad)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("out_indices"), "{err}");
}

/// A Cascade comparison row's model: the paper's Cascade Mask R-CNN around the row's named
/// backbone and drop path.
fn cascade_row(preset: &str) -> CascadeConfig {
    let p = cnx_backbone::config::comparison_preset(preset).expect("a comparison row");
    let mut c = CascadeConfig::cascade_mask_rcnn_convnext("tiny").unwrap();
    c.base.backbone = BackboneCfg::named(p.backbone_name, p.drop_path).unwrap();
    c
}
