//! One backbone choice for every detector / segmentor: [`BackboneConfig`] names ConvNeXt, Swin
//! or ResNet/ResNeXt, [`build`] turns it into a `Box<dyn DenseBackbone>` under a VarStore path,
//! and [`convert_state_dict`] maps any supported checkpoint layout to the built model's names.
//!
//! Also here, for the training engine and `cnx flops` / `cnx compare`: the backbone-transfer
//! rows of the paper's Tables 3 and 4 ([`comparison_presets`]), the weight-decay exemptions of
//! the Swin recipes ([`no_weight_decay`]), and the ImageNet classifiers of every family
//! ([`build_classifier`] behind the [`Classifier`] trait, for `cnx classify`; counted at 224 by
//! [`classifier_flops`]).

use crate::convnext::{ConvNeXt, ConvNeXtConfig};
use crate::dense::DenseBackbone;
use crate::flops::{self, FlopTally};
use crate::resnet::{ResNet, ResNetConfig};
use crate::roadmap::{RoadmapConfig, RoadmapNet};
use crate::swin::{SwinConfig, SwinTransformer};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// A dense-prediction backbone of any family.
#[derive(Debug, Clone, PartialEq)]
pub enum BackboneConfig {
    ConvNeXt(ConvNeXtConfig),
    Swin(SwinConfig),
    ResNet(ResNetConfig),
}

/// Unknown backbone name; the message lists the valid ones.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown backbone '{name}'; valid: {}", BACKBONES.join(", "))]
pub struct UnknownBackbone {
    pub name: String,
}

/// Names accepted by [`BackboneConfig::by_name`].
pub const BACKBONES: [&str; 13] = [
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
    "swin_tiny",
    "swin_small",
    "swin_base",
    "swin_large",
    "resnet50",
    "resnet101",
    "resnext101_32x4d",
    "resnext101_64x4d",
];

impl BackboneConfig {
    /// The dense variant with the detection defaults of its family: ConvNeXt and Swin return
    /// all four stages through `norm{i}`; ResNets freeze the stem and layer1 with norm_eval.
    pub fn by_name(name: &str) -> Result<Self, UnknownBackbone> {
        let err = || UnknownBackbone {
            name: name.to_string(),
        };
        Ok(match name {
            n if n.starts_with("convnext_") => BackboneConfig::ConvNeXt(
                ConvNeXtConfig::by_name(n)
                    .map_err(|_| err())?
                    .dense(&[0, 1, 2, 3]),
            ),
            "swin_tiny" | "swin_t" => BackboneConfig::Swin(SwinConfig::tiny()),
            "swin_small" | "swin_s" => BackboneConfig::Swin(SwinConfig::small()),
            "swin_base" | "swin_b" => BackboneConfig::Swin(SwinConfig::base()),
            "swin_large" | "swin_l" => BackboneConfig::Swin(SwinConfig::large()),
            "resnet50" | "r50" => BackboneConfig::ResNet(ResNetConfig::resnet50()),
            "resnet101" | "r101" => BackboneConfig::ResNet(ResNetConfig::resnet101()),
            "resnext101_32x4d" | "x101_32x4d" => {
                BackboneConfig::ResNet(ResNetConfig::resnext101_32x4d())
            }
            "resnext101_64x4d" | "x101_64x4d" => {
                BackboneConfig::ResNet(ResNetConfig::resnext101_64x4d())
            }
            _ => return Err(err()),
        })
    }

    /// The comparison backbone `name` (Swin / ResNet / ResNeXt) with stochastic depth
    /// `drop_path`; `None` for `convnext*` names, which their callers build from depths/dims.
    pub fn named(name: &str, drop_path: f64) -> Result<Option<Self>, UnknownBackbone> {
        if name.starts_with("convnext") {
            return Ok(None);
        }
        Ok(Some(Self::by_name(name)?.with_drop_path(drop_path)))
    }

    /// Channels of the returned feature maps (what the FPN / UperNet laterals take).
    pub fn out_channels(&self) -> Vec<i64> {
        match self {
            BackboneConfig::ConvNeXt(c) => c
                .out_indices
                .clone()
                .unwrap_or(vec![0, 1, 2, 3])
                .iter()
                .map(|&i| c.dims[i])
                .collect(),
            BackboneConfig::Swin(c) => c.out_indices.iter().map(|&i| c.dim(i)).collect(),
            BackboneConfig::ResNet(c) => c.out_indices.iter().map(|&i| 256 << i).collect(),
        }
    }

    /// Set the stochastic-depth rate (no-op for ResNets, which have none).
    pub fn with_drop_path(self, rate: f64) -> Self {
        match self {
            BackboneConfig::ConvNeXt(c) => BackboneConfig::ConvNeXt(c.with_drop_path(rate)),
            BackboneConfig::Swin(c) => BackboneConfig::Swin(SwinConfig {
                drop_path_rate: rate,
                ..c
            }),
            r => r,
        }
    }
}

/// Build the dense backbone under `p` (parameter names relative to it, e.g. `backbone`).
pub fn build(p: &nn::Path, cfg: &BackboneConfig) -> Box<dyn DenseBackbone> {
    match cfg {
        BackboneConfig::ConvNeXt(c) => Box::new(ConvNeXt::new(p, c)),
        BackboneConfig::Swin(c) => Box::new(SwinTransformer::new(p, c)),
        BackboneConfig::ResNet(c) => Box::new(ResNet::new(p, c)),
    }
}

/// Map a pretrained state dict (keys relative to the backbone, `backbone.` / `module.` prefixes
/// tolerated) to the names [`build`] creates: Swin from timm / mmdet / official layouts
/// ([`crate::swin::convert_state_dict`]); ResNets are already in torchvision's names (the
/// classifier `fc` is dropped); ConvNeXt is left to the checkpoint module's own mapping.
pub fn convert_state_dict(
    cfg: &BackboneConfig,
    dict: Vec<(String, Tensor)>,
) -> Vec<(String, Tensor)> {
    match cfg {
        BackboneConfig::Swin(_) => crate::swin::convert_state_dict(dict),
        BackboneConfig::ResNet(_) => dict
            .into_iter()
            .map(|(k, v)| {
                (
                    k.strip_prefix("module.")
                        .unwrap_or(&k)
                        .strip_prefix("backbone.")
                        .unwrap_or(&k)
                        .to_string(),
                    v,
                )
            })
            .filter(|(k, _)| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
            .collect(),
        BackboneConfig::ConvNeXt(_) => dict,
    }
}

/// The Swin recipes' weight-decay exemptions (mmdet/mmseg `paramwise_cfg`: `absolute_pos_embed`,
/// `relative_position_bias_table`, every `norm`), plus biases and other 1-d parameters as the
/// official Swin classification code exempts them. `name` is a full VarStore name.
pub fn no_weight_decay(name: &str) -> bool {
    name.contains("relative_position_bias_table")
        || name.contains("absolute_pos_embed")
        || name
            .split('.')
            .any(|part| part.starts_with("norm") || part == "bn1" || part == "bn2" || part == "bn3")
        || name.ends_with(".bias")
}

/// One backbone-transfer row of the paper's Table 3 (COCO) or Table 4 (ADE20K) and its recipe
/// (the Swin repo's detection / segmentation configs).
#[derive(Debug, Clone)]
pub struct ComparisonPreset {
    pub name: &'static str,
    /// "mask_rcnn", "cascade_mask_rcnn" or "upernet".
    pub arch: &'static str,
    pub backbone: BackboneConfig,
    /// [`BackboneConfig::by_name`] name of `backbone` (`swin_tiny`, `resnet50`, ...).
    pub backbone_name: &'static str,
    /// Stochastic-depth rate of the recipe (0 for ResNe(X)ts).
    pub drop_path: f64,
    /// ImageNet-22K pre-training (‡ rows).
    pub in22k: bool,
    pub lr: f64,
    pub weight_decay: f64,
    /// Training length: epochs (detection, 3x = 36) or iterations (segmentation, 160k).
    pub epochs: i64,
    pub iters: i64,
    /// Segmentation crop (512 / 640); 0 for detection.
    pub crop: i64,
    /// The paper's published row: params (M), GFLOPs, FPS, AP box / mIoU (ss; ms+flip for seg).
    pub paper_params_m: Option<f64>,
    pub paper_gflops: f64,
    pub paper_fps: Option<f64>,
    pub paper_metric: f64,
}

/// The comparison rows as presets: Mask R-CNN Swin-T 3x, Cascade Mask R-CNN R-50 / X101 / Swin
/// (3x, 22K for B/L), UperNet Swin (160k, 512 crop; 640 crop for 22K B/L). Recipes: AdamW with
/// lr 1e-4 / weight decay 0.05 for detection (the ResNe(X)t rows too, as the Swin paper trained
/// them), lr 6e-5 / weight decay 0.01 for UperNet (mmseg Swin configs), no decay on norms and the
/// relative position bias table ([`no_weight_decay`]).
pub fn comparison_presets() -> Vec<ComparisonPreset> {
    let bb = |n: &'static str, dpr: f64| (n, dpr);
    let build = |(n, dpr): (&'static str, f64)| {
        BackboneConfig::by_name(n)
            .expect("known backbone")
            .with_drop_path(dpr)
    };
    let det =
        |name, arch, b: (&'static str, f64), in22k, p: Option<f64>, g, fps, ap| ComparisonPreset {
            name,
            arch,
            backbone: build(b),
            backbone_name: b.0,
            drop_path: b.1,
            in22k,
            lr: 1e-4,
            weight_decay: 0.05,
            epochs: 36,
            iters: 0,
            crop: 0,
            paper_params_m: p,
            paper_gflops: g,
            paper_fps: Some(fps),
            paper_metric: ap,
        };
    let seg = |name, b: (&'static str, f64), crop, in22k, p, g, miou| ComparisonPreset {
        name,
        arch: "upernet",
        backbone: build(b),
        backbone_name: b.0,
        drop_path: b.1,
        in22k,
        lr: 6e-5,
        weight_decay: 0.01,
        epochs: 0,
        iters: 160_000,
        crop,
        paper_params_m: Some(p),
        paper_gflops: g,
        paper_fps: None,
        paper_metric: miou,
    };
    let c = "cascade_mask_rcnn";
    vec![
        det(
            "mask_rcnn_swin_tiny_3x",
            "mask_rcnn",
            bb("swin_tiny", 0.2),
            false,
            Some(48.0),
            267.0,
            23.1,
            46.0,
        ),
        det(
            "cascade_mask_rcnn_r50_3x",
            c,
            bb("resnet50", 0.0),
            false,
            Some(82.0),
            739.0,
            16.2,
            46.3,
        ),
        det(
            "cascade_mask_rcnn_x101_32x4d_3x",
            c,
            bb("resnext101_32x4d", 0.0),
            false,
            None,
            819.0,
            13.8,
            48.1,
        ),
        det(
            "cascade_mask_rcnn_x101_64x4d_3x",
            c,
            bb("resnext101_64x4d", 0.0),
            false,
            None,
            972.0,
            12.6,
            48.3,
        ),
        det(
            "cascade_mask_rcnn_swin_tiny_3x",
            c,
            bb("swin_tiny", 0.2),
            false,
            Some(86.0),
            745.0,
            12.2,
            50.4,
        ),
        det(
            "cascade_mask_rcnn_swin_small_3x",
            c,
            bb("swin_small", 0.2),
            false,
            Some(107.0),
            838.0,
            11.4,
            51.9,
        ),
        det(
            "cascade_mask_rcnn_swin_base_3x",
            c,
            bb("swin_base", 0.3),
            false,
            Some(145.0),
            982.0,
            10.7,
            51.9,
        ),
        det(
            "cascade_mask_rcnn_swin_base_3x_in22k",
            c,
            bb("swin_base", 0.3),
            true,
            Some(145.0),
            982.0,
            10.7,
            53.0,
        ),
        det(
            "cascade_mask_rcnn_swin_large_3x_in22k",
            c,
            bb("swin_large", 0.3),
            true,
            Some(253.0),
            1382.0,
            9.2,
            53.9,
        ),
        seg(
            "upernet_swin_tiny_512_160k",
            bb("swin_tiny", 0.3),
            512,
            false,
            60.0,
            945.0,
            45.8,
        ),
        seg(
            "upernet_swin_small_512_160k",
            bb("swin_small", 0.3),
            512,
            false,
            81.0,
            1038.0,
            49.5,
        ),
        seg(
            "upernet_swin_base_512_160k",
            bb("swin_base", 0.3),
            512,
            false,
            121.0,
            1188.0,
            49.7,
        ),
        seg(
            "upernet_swin_base_640_160k_in22k",
            bb("swin_base", 0.3),
            640,
            true,
            121.0,
            1841.0,
            51.7,
        ),
        seg(
            "upernet_swin_large_640_160k_in22k",
            bb("swin_large", 0.3),
            640,
            true,
            234.0,
            2468.0,
            53.5,
        ),
    ]
}

/// The comparison row called `name`, if there is one.
pub fn comparison_preset(name: &str) -> Option<ComparisonPreset> {
    comparison_presets().into_iter().find(|p| p.name == name)
}

/// Classifier models this module can count: Swin-T/S/B/L (`swin_tiny` ...), ResNet-50/101 and
/// ResNeXt-101 32x4d / 64x4d, and every roadmap step (`roadmap_*`).
pub fn classifier_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "swin_tiny",
        "swin_small",
        "swin_base",
        "swin_large",
        "resnet50",
        "resnet101",
        "resnext101_32x4d",
        "resnext101_64x4d",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(
        crate::roadmap::roadmap_steps()
            .into_iter()
            .map(|s| s.0.to_string()),
    );
    v
}

/// An image classifier of any family: logits (N, classes) for normalised images (N,3,H,W) in
/// evaluation mode.
pub trait Classifier: std::fmt::Debug {
    fn logits(&self, xs: &Tensor) -> Tensor;
}

impl Classifier for SwinTransformer {
    fn logits(&self, xs: &Tensor) -> Tensor {
        self.forward_cls(xs, false)
    }
}

impl Classifier for ResNet {
    fn logits(&self, xs: &Tensor) -> Tensor {
        self.forward_cls(xs, false)
    }
}

impl Classifier for RoadmapNet {
    fn logits(&self, xs: &Tensor) -> Tensor {
        self.forward_t(xs, false)
    }
}

impl Classifier for ConvNeXt {
    fn logits(&self, xs: &Tensor) -> Tensor {
        self.forward_logits(xs, false)
    }
}

/// The classifier `name` ([`classifier_names`] or `convnext_*`) with `num_classes` outputs,
/// under `p` with the parameter names of its official / torchvision layout (ConvNeXt and the
/// roadmap: `head.`; Swin: `head.`; ResNets: `fc.`). Weights are uninitialised.
pub fn build_classifier(
    p: &nn::Path,
    name: &str,
    num_classes: i64,
) -> Result<Box<dyn Classifier>, UnknownBackbone> {
    if let Some(mut cfg) = RoadmapConfig::by_name(name) {
        cfg.num_classes = num_classes;
        return Ok(Box::new(RoadmapNet::new(p, &cfg)));
    }
    if name.starts_with("convnext_") {
        let cfg = ConvNeXtConfig::by_name(name)
            .map_err(|_| UnknownBackbone {
                name: name.to_string(),
            })?
            .with_classes(num_classes);
        return Ok(Box::new(ConvNeXt::new_uninit(p.clone(), &cfg)));
    }
    Ok(match BackboneConfig::by_name(name)? {
        BackboneConfig::Swin(c) => Box::new(SwinTransformer::new(p, &c.classifier(num_classes))),
        BackboneConfig::ResNet(c) => Box::new(ResNet::new(p, &c.classifier(num_classes))),
        BackboneConfig::ConvNeXt(_) => unreachable!("convnext names are handled above"),
    })
}

/// Name of the classification head's weight in [`build_classifier`]'s layout: its first
/// dimension is the class count of a checkpoint.
pub fn classifier_head_key(name: &str) -> &'static str {
    if name.starts_with("resnet") || name.starts_with("resnext") {
        "fc.weight"
    } else {
        "head.weight"
    }
}

/// Parameters and FLOPs of an ImageNet classifier (1000 classes) at `h` x `w`, counted on the
/// real network (CPU, batch 1, no grad). `None` for a name outside [`classifier_names`].
pub fn classifier_flops(name: &str, h: i64, w: i64) -> Option<(i64, FlopTally)> {
    if name.starts_with("convnext_") {
        return None;
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let m = build_classifier(&vs.root(), name, 1000).ok()?;
    let x = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
    let (_, tally) = flops::count(|| tch::no_grad(|| m.logits(&x)));
    Some((crate::nn::param_count(&vs), tally))
}

/// Parameters and FLOPs of the dense backbone alone at `h` x `w` (for table breakdowns).
pub fn dense_flops(cfg: &BackboneConfig, h: i64, w: i64) -> (i64, FlopTally) {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = build(&vs.root(), cfg);
    let x = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
    let (_, tally) = flops::count(|| tch::no_grad(|| m.forward_features(&x, false)));
    (crate::nn::param_count(&vs), tally)
}

/// Forward as a plain module for callers that want `Module` (the last feature map).
#[derive(Debug)]
pub struct LastFeature(pub Box<dyn DenseBackbone>);

impl Module for LastFeature {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.0
            .forward_features(xs, false)
            .pop()
            .expect("a feature map")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_with_its_channels() {
        for n in ["swin_tiny", "resnet50", "convnext_tiny"] {
            let cfg = BackboneConfig::by_name(n).unwrap();
            let vs = nn::VarStore::new(Device::Cpu);
            let m = build(&vs.root(), &cfg);
            assert_eq!(m.out_channels(), cfg.out_channels(), "{n}");
            let f = tch::no_grad(|| {
                m.forward_features(
                    &Tensor::zeros([1, 3, 64, 96], (Kind::Float, Device::Cpu)),
                    false,
                )
            });
            let got: Vec<i64> = f.iter().map(|t| t.size()[1]).collect();
            assert_eq!(got, cfg.out_channels(), "{n}");
            let strides: Vec<i64> = f.iter().map(|t| 64 / t.size()[2]).collect();
            assert_eq!(strides, vec![4, 8, 16, 32], "{n}");
        }
        assert!(BackboneConfig::by_name("vgg16").is_err());
    }

    #[test]
    fn presets_are_the_papers_rows() {
        let p = comparison_presets();
        assert_eq!(p.len(), 14);
        assert!(p.iter().all(|r| r.lr > 0.0));
        assert!(no_weight_decay(
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table"
        ));
        assert!(no_weight_decay("backbone.layers.0.blocks.0.norm1.weight"));
        assert!(no_weight_decay("backbone.norm3.weight"));
        assert!(!no_weight_decay(
            "backbone.layers.0.blocks.0.attn.qkv.weight"
        ));
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    /// Prints the dense backbones' cost at the tables' input sizes (run with --ignored --nocapture).
    #[test]
    #[ignore]
    fn print_dense_backbone_costs() {
        for n in [
            "swin_tiny",
            "swin_small",
            "swin_base",
            "resnet50",
            "resnext101_32x4d",
            "resnext101_64x4d",
            "convnext_tiny",
        ] {
            let cfg = BackboneConfig::by_name(n).unwrap();
            for (h, w) in [(1280, 800), (2048, 512)] {
                let (p, t) = dense_flops(&cfg, h, w);
                println!(
                    "{n:18} {h}x{w} {:7.2}M {:8.2}G {:?}",
                    p as f64 / 1e6,
                    t.total / 1e9,
                    t.by_kind
                );
            }
        }
    }
}
