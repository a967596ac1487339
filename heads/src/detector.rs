//! Mask R-CNN's serde config ([`DetectorConfig`]: backbone, FPN, RPN, RoI stage) and its mask
//! targets. The network itself is [`crate::two_stage::TwoStageDetector`] with a standard RoI
//! head ([`Detector`]); what it consumes and produces is in [`crate::structures`].

use crate::anchors::AnchorGenerator;
use crate::assigner::{MaxIoUAssigner, RandomSampler};
use crate::bbox_head::RcnnTestCfg;
use crate::coder::DeltaXYWHCoder;
use crate::rpn::{ProposalCfg, RpnHead};
use crate::structures::GtInstances;
use crate::HeadsError;
use cnx_backbone::config::BackboneConfig;
use cnx_backbone::convnext::ConvNeXtConfig;
use cnx_backbone::dense::DenseBackbone;
use serde::{Deserialize, Serialize};
use tch::nn::Path;
use tch::{Kind, Tensor};

/// Backbone settings: a dense ConvNeXt from `depths` / `dims`, or, when `name` is set, one of
/// the comparison backbones (`swin_tiny`, `resnet50`, `resnext101_32x4d`, ... see
/// [`cnx_backbone::config::BACKBONES`]) with its family's detection defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneCfg {
    pub depths: Vec<i64>,
    pub dims: Vec<i64>,
    pub drop_path_rate: f64,
    pub layer_scale_init_value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ImageNet checkpoint that initialises the backbone (mmdet's `init_cfg`), loaded by the
    /// trainer before the first step; empty = random initialisation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pretrained: String,
}

impl BackboneCfg {
    /// The backbone to build (ConvNeXt returns all four stages through `norm{i}`).
    pub fn dense(&self) -> Result<BackboneConfig, HeadsError> {
        let named = match &self.name {
            Some(n) => BackboneConfig::named(n, self.drop_path_rate)
                .map_err(|e| HeadsError::Config(e.to_string()))?,
            None => None,
        };
        Ok(named.unwrap_or_else(|| {
            BackboneConfig::ConvNeXt(ConvNeXtConfig::dense_backbone(
                &self.depths,
                &self.dims,
                self.drop_path_rate,
                self.layer_scale_init_value,
                &[0, 1, 2, 3],
            ))
        }))
    }

    /// Build it under `p` with its family's initialisation. Panics on an unknown `name`; configs
    /// are checked by [`BackboneCfg::dense`] before a model is built.
    pub fn build(&self, p: &Path) -> Box<dyn DenseBackbone> {
        let cfg = self.dense().unwrap_or_else(|e| panic!("{e}"));
        cnx_backbone::config::build(p, &cfg)
    }

    /// A comparison backbone (`swin_tiny`, `resnet50`, ...) with stochastic depth `drop_path`.
    pub fn named(name: &str, drop_path: f64) -> Result<Self, HeadsError> {
        let cfg = BackboneConfig::by_name(name).map_err(|e| HeadsError::Config(e.to_string()))?;
        let dims = cfg.out_channels();
        Ok(Self {
            depths: vec![],
            dims,
            drop_path_rate: drop_path,
            layer_scale_init_value: 0.0,
            name: Some(name.to_string()),
            pretrained: String::new(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeckCfg {
    pub out_channels: i64,
    pub num_outs: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpnCfg {
    pub anchors: AnchorGenerator,
    pub assigner: MaxIoUAssigner,
    pub sampler: RandomSampler,
    pub train_proposals: ProposalCfg,
    pub test_proposals: ProposalCfg,
    /// Box loss: L1 when 0 (Mask R-CNN), SmoothL1 with this beta otherwise (Cascade: 1/9).
    #[serde(default)]
    pub smooth_l1_beta: f64,
    /// mmdet's `train_cfg.rpn.allowed_border`: -1 keeps anchors crossing the image border
    /// (Mask R-CNN), 0 leaves them unassigned (Cascade).
    #[serde(default = "RpnCfg::keep_border_anchors")]
    pub allowed_border: f64,
}

impl RpnCfg {
    fn keep_border_anchors() -> f64 {
        -1.0
    }

    /// The RPN head these settings describe, under `p` with `channels` input channels.
    pub fn build(&self, p: &Path, channels: i64) -> RpnHead {
        let mut rpn = RpnHead::new(p, channels, self.anchors.clone());
        rpn.assigner = self.assigner.clone();
        rpn.sampler = self.sampler.clone();
        rpn.smooth_l1_beta = self.smooth_l1_beta;
        rpn.allowed_border = self.allowed_border;
        rpn
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoiHeadCfg {
    pub num_classes: i64,
    pub fc_dim: i64,
    pub bbox_roi_size: i64,
    pub mask_roi_size: i64,
    pub mask_num_convs: usize,
    pub mask_conv_channels: i64,
    pub featmap_strides: Vec<i64>,
    pub finest_scale: f64,
    pub bbox_coder: DeltaXYWHCoder,
    pub assigner: MaxIoUAssigner,
    pub sampler: RandomSampler,
    pub test: RcnnTestCfg,
    pub with_mask: bool,
}

/// Everything needed to build a Mask R-CNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    pub name: String,
    pub backbone: BackboneCfg,
    pub neck: NeckCfg,
    pub rpn: RpnCfg,
    pub roi: RoiHeadCfg,
}

impl DetectorConfig {
    /// The paper's Mask R-CNN with a ConvNeXt variant (`tiny`, `small`, `base`, ...), 80 classes.
    pub fn mask_rcnn_convnext(variant: &str) -> Result<Self, HeadsError> {
        let c = ConvNeXtConfig::by_name(variant).map_err(|e| HeadsError::Config(e.to_string()))?;
        Ok(Self {
            name: format!(
                "mask_rcnn_convnext_{}",
                variant.strip_prefix("convnext_").unwrap_or(variant)
            ),
            backbone: BackboneCfg {
                depths: c.depths,
                dims: c.dims,
                drop_path_rate: 0.4,
                layer_scale_init_value: 1.0,
                name: None,
                pretrained: String::new(),
            },
            neck: NeckCfg {
                out_channels: 256,
                num_outs: 5,
            },
            rpn: RpnCfg {
                anchors: AnchorGenerator::default(),
                assigner: MaxIoUAssigner::rpn(),
                sampler: RandomSampler::rpn(),
                train_proposals: ProposalCfg::train(1000),
                test_proposals: ProposalCfg::test(),
                smooth_l1_beta: 0.0,
                allowed_border: -1.0,
            },
            roi: RoiHeadCfg {
                num_classes: 80,
                fc_dim: 1024,
                bbox_roi_size: 7,
                mask_roi_size: 14,
                mask_num_convs: 4,
                mask_conv_channels: 256,
                featmap_strides: vec![4, 8, 16, 32],
                finest_scale: 56.0,
                bbox_coder: DeltaXYWHCoder::new([0.0; 4], [0.1, 0.1, 0.2, 0.2]),
                assigner: MaxIoUAssigner::rcnn(0.5),
                sampler: RandomSampler::rcnn(),
                test: RcnnTestCfg::default(),
                with_mask: true,
            },
        })
    }
}

/// Mask R-CNN is the two-stage detector with a [`crate::roi_head::StandardRoiHead`] (built from a
/// [`DetectorConfig`]).
pub type Detector = crate::two_stage::TwoStageDetector;

/// 28x28 (or `out`) binary mask targets of one image's positives via the ground truth's
/// [`crate::structures::InstanceMasks::crop_and_resize`] (mmdet `mask_target_single`).
pub fn mask_targets(
    pos_boxes: &Tensor,
    pos_gt_inds: &Tensor,
    gt: &GtInstances,
    out: i64,
) -> Tensor {
    let n = pos_boxes.size()[0];
    let device = pos_boxes.device();
    let Some(masks) = &gt.masks else {
        return Tensor::zeros([n, out, out], (Kind::Float, device));
    };
    if n == 0 {
        return Tensor::zeros([0, out, out], (Kind::Float, device));
    }
    let bv = crate::boxes::to_vec_f32(pos_boxes);
    let boxes: Vec<[f32; 4]> = bv.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    let inds: Vec<usize> = crate::boxes::to_vec_i64(pos_gt_inds)
        .iter()
        .map(|&i| i as usize)
        .collect();
    let bytes = masks.crop_and_resize(&boxes, &inds, out as usize);
    Tensor::from_slice(&bytes)
        .view([n, out, out])
        .to_kind(Kind::Float)
        .to_device(device)
}
