//! Mask R-CNN assembled from a serde [`DetectorConfig`]: ConvNeXt backbone → FPN → RPN →
//! RoI stage (box head + mask head). Training mode returns mmdet's named losses; eval mode
//! returns per-image detections with masks pasted at the original resolution. Variable names
//! follow mmdetection (`backbone.`, `neck.`, `rpn_head.`, `roi_head.`), so its checkpoints load.

use crate::anchors::AnchorGenerator;
use crate::assigner::{MaxIoUAssigner, RandomSampler, SamplingResult};
use crate::bbox_head::{self, BoxHead, RcnnTestCfg, Shared2FcBoxHead};
use crate::boxes::bbox2roi;
use crate::coder::DeltaXYWHCoder;
use crate::fpn::Fpn;
use crate::mask_head::{self, FcnMaskHead};
use crate::roi_extractor::RoiExtractor;
use crate::rpn::{ProposalCfg, RpnHead};
use crate::HeadsError;
use cnx_backbone::config::BackboneConfig;
use cnx_backbone::convnext::ConvNeXtConfig;
use cnx_backbone::dense::DenseBackbone;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::nn::Path;
use tch::{Device, Kind, Tensor};

/// Backbone settings: a dense ConvNeXt from `depths` / `dims`, or, when `name` is set, one of
/// the comparison backbones (`swin_tiny`, `resnet50`, `resnext101_32x4d`, ... see
/// [`cnx_backbone::config::BACKBONES`]) with its family's detection defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneCfg {
    pub depths: Vec<i64>,
    pub dims: Vec<i64>,
    pub drop_path_rate: f64,
    pub layer_scale_init_value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeckCfg {
    pub out_channels: i64,
    pub num_outs: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
pub struct DetectorConfig {
    pub name: String,
    pub backbone: BackboneCfg,
    pub neck: NeckCfg,
    pub rpn: RpnCfg,
    pub roi: RoiHeadCfg,
}

/// Preset names [`DetectorConfig::preset`] knows.
pub const PRESETS: [&str; 2] = ["mask_rcnn_convnext_tiny_3x", "mask_rcnn_swin_tiny_3x"];

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

    /// Look up a named preset (`mask_rcnn_convnext_tiny_3x`, or the comparison row
    /// `mask_rcnn_swin_tiny_3x`).
    pub fn preset(name: &str) -> Result<Self, HeadsError> {
        match name {
            "mask_rcnn_convnext_tiny_3x" => {
                let mut c = Self::mask_rcnn_convnext("tiny")?;
                c.name = name.to_string();
                Ok(c)
            }
            _ => match cnx_backbone::config::comparison_preset(name) {
                Some(p) if p.arch == "mask_rcnn" => {
                    let mut c = Self::mask_rcnn_convnext("tiny")?;
                    c.name = name.to_string();
                    c.backbone = BackboneCfg::named(p.backbone_name, p.drop_path)?;
                    Ok(c)
                }
                _ => Err(HeadsError::Config(format!(
                    "unknown detector preset '{name}'; known: {}",
                    PRESETS.join(", ")
                ))),
            },
        }
    }
}

/// Per-image information the detector needs (mmdet's `img_metas`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImgMeta {
    /// (h, w) after resize, before padding.
    pub img_shape: (i64, i64),
    /// (h, w) after padding this image alone to the size divisor (mmdet's `pad_shape`).
    pub pad_shape: (i64, i64),
    /// (h, w) of the original image.
    pub ori_shape: (i64, i64),
    /// (w_scale, h_scale) of the resize.
    pub scale_factor: (f32, f32),
}

impl From<&cnx_datasets::ImageMeta> for ImgMeta {
    fn from(m: &cnx_datasets::ImageMeta) -> Self {
        Self {
            img_shape: (m.img_shape.0 as i64, m.img_shape.1 as i64),
            pad_shape: (m.pad_shape.0 as i64, m.pad_shape.1 as i64),
            ori_shape: (m.ori_shape.0 as i64, m.ori_shape.1 as i64),
            scale_factor: m.scale_factor,
        }
    }
}

/// `(h, w)` padded up to a multiple of `divisor` (the data pipeline's `Pad(size_divisor)`).
pub fn pad_shape(hw: (i64, i64), divisor: i64) -> (i64, i64) {
    let up = |x: i64| (x + divisor - 1) / divisor * divisor;
    (up(hw.0), up(hw.1))
}

impl ImgMeta {
    fn sf4(&self) -> [f32; 4] {
        [
            self.scale_factor.0,
            self.scale_factor.1,
            self.scale_factor.0,
            self.scale_factor.1,
        ]
    }
}

/// Training targets of one image (padded-image coordinates).
#[derive(Debug)]
pub struct GtInstances {
    /// (G,4) float.
    pub boxes: Tensor,
    /// (G) int64, contiguous 0..K-1.
    pub labels: Tensor,
    /// Compact masks for mask targets (canvas = the padded image).
    pub masks: Option<cnx_datasets::Masks>,
}

impl GtInstances {
    pub fn from_targets(t: &cnx_datasets::DetTargets, device: Device) -> Self {
        let g = t.labels.len() as i64;
        Self {
            boxes: Tensor::from_slice(&t.boxes).view([g, 4]).to_device(device),
            labels: Tensor::from_slice(&t.labels).to_device(device),
            masks: Some(t.masks.clone()),
        }
    }
}

/// Named losses (mmdet keys) plus `acc`; `total()` sums the `loss*` entries.
#[derive(Debug, Default)]
pub struct Losses(pub BTreeMap<String, Tensor>);

impl Losses {
    pub fn total(&self) -> Tensor {
        let mut it = self
            .0
            .iter()
            .filter(|(k, _)| k.starts_with("loss"))
            .map(|(_, v)| v.shallow_clone());
        let first = it.next().expect("at least one loss");
        it.fold(first, |a, b| a + b)
    }
    pub fn get(&self, k: &str) -> Option<&Tensor> {
        self.0.get(k)
    }
    /// Scalar values for logging.
    pub fn values(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), v.double_value(&[])))
            .collect()
    }
}

/// Detections of one image, in original-image coordinates.
#[derive(Debug)]
pub struct Detections {
    /// (D,4) x1,y1,x2,y2.
    pub boxes: Tensor,
    pub scores: Tensor,
    /// Contiguous labels 0..K-1.
    pub labels: Tensor,
    /// (D, ori_h, ori_w) bool, when the model has a mask head.
    pub masks: Option<Tensor>,
}

/// The assembled Mask R-CNN.
#[derive(Debug)]
pub struct Detector {
    pub config: DetectorConfig,
    pub backbone: Box<dyn DenseBackbone>,
    pub neck: Fpn,
    pub rpn: RpnHead,
    pub bbox_extractor: RoiExtractor,
    pub bbox_head: Box<dyn BoxHead>,
    pub mask_extractor: RoiExtractor,
    pub mask_head: Option<FcnMaskHead>,
}

impl Detector {
    /// Build under `root` (the VarStore root): `backbone.`, `neck.`, `rpn_head.`, `roi_head.`.
    /// The backbone gets the official ConvNeXt init; heads keep tch's default init (random).
    pub fn new(root: &Path, config: &DetectorConfig) -> Self {
        let cfg = config.clone();
        let backbone = cfg.backbone.build(&(root / "backbone"));
        let chans = backbone.out_channels();
        let c = cfg.neck.out_channels;
        let neck = Fpn::new(&(root / "neck"), &chans, c, cfg.neck.num_outs);
        let rpn = cfg.rpn.build(&(root / "rpn_head"), c);
        let r = &cfg.roi;
        let bbox_head = Shared2FcBoxHead::new(
            &(root / "roi_head" / "bbox_head"),
            c,
            r.bbox_roi_size,
            r.fc_dim,
            r.num_classes,
        );
        let mask_head = r.with_mask.then(|| {
            FcnMaskHead::new(
                &(root / "roi_head" / "mask_head"),
                c,
                r.mask_conv_channels,
                r.mask_num_convs,
                r.num_classes,
            )
        });
        let mut bbox_extractor = RoiExtractor::new(r.bbox_roi_size, r.featmap_strides.clone());
        bbox_extractor.finest_scale = r.finest_scale;
        let mut mask_extractor = RoiExtractor::new(r.mask_roi_size, r.featmap_strides.clone());
        mask_extractor.finest_scale = r.finest_scale;
        Self {
            config: cfg,
            backbone,
            neck,
            rpn,
            bbox_extractor,
            bbox_head: Box::new(bbox_head),
            mask_extractor,
            mask_head,
        }
    }

    /// Backbone + FPN features (5 levels). Inputs whose sides are not multiples of 32 (e.g.
    /// images smaller than 32 px) are zero-padded bottom/right first, as the data pipeline does.
    pub fn features(&self, images: &Tensor, train: bool) -> Vec<Tensor> {
        let s = images.size();
        let (ph, pw) = (
            ((s[2] + 31) / 32 * 32).max(32),
            ((s[3] + 31) / 32 * 32).max(32),
        );
        let padded;
        let images = if ph != s[2] || pw != s[3] {
            padded = images.constant_pad_nd([0, pw - s[3], 0, ph - s[2]]);
            &padded
        } else {
            images
        };
        let f = self.backbone.forward_features(images, train);
        self.neck.forward(&f)
    }

    fn roi_feats<'a>(&self, feats: &'a [Tensor]) -> &'a [Tensor] {
        &feats[..self.config.roi.featmap_strides.len()]
    }

    /// Training: mmdet's losses for a padded batch `images` (N,3,H,W) with per-image metas and
    /// targets. Keys: loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox, loss_mask, acc.
    pub fn forward_train(&self, images: &Tensor, metas: &[ImgMeta], gts: &[GtInstances]) -> Losses {
        let prof = std::env::var_os("CNX_PROFILE").is_some();
        let t0 = std::time::Instant::now();
        let tick = |what: &str| {
            if prof {
                eprintln!("{what}: {:.3}s", t0.elapsed().as_secs_f64());
            }
        };
        let feats = self.features(images, true);
        tick("features");
        let shapes: Vec<(i64, i64)> = metas.iter().map(|m| m.img_shape).collect();
        let pads: Vec<(i64, i64)> = metas.iter().map(|m| m.pad_shape).collect();
        let gt_boxes: Vec<Tensor> = gts.iter().map(|g| g.boxes.to_kind(Kind::Float)).collect();
        let rpn_out = self.rpn.forward(&feats);
        let (loss_rpn_cls, loss_rpn_bbox) = self.rpn.loss(&rpn_out, &shapes, &pads, &gt_boxes);
        tick("rpn loss");
        let proposals = self
            .rpn
            .proposals(&rpn_out, &shapes, &self.config.rpn.train_proposals);
        tick("proposals");
        let r = &self.config.roi;
        let samples: Vec<SamplingResult> = tch::no_grad(|| {
            proposals
                .iter()
                .zip(gts)
                .map(|(p, g)| {
                    let b = p.slice(1, 0, 4, 1);
                    let a = r
                        .assigner
                        .assign(&b, &g.boxes.to_kind(Kind::Float), &g.labels);
                    r.sampler
                        .sample(&a, &b, &g.boxes.to_kind(Kind::Float), &g.labels)
                })
                .collect()
        });
        tick("sampling");
        let rf = self.roi_feats(&feats);
        let rois = bbox_head::sampled_rois(&samples);
        let bf = self.bbox_extractor.forward(rf, &rois);
        let (cls, reg) = self.bbox_head.forward(&bf, true);
        let t = bbox_head::box_targets(&samples, &gt_boxes, r.num_classes, &r.bbox_coder, false);
        let (loss_cls, loss_bbox, acc) = bbox_head::box_loss_l1(&cls, &reg, &t);
        tick("box head");
        let mut m = BTreeMap::new();
        m.insert("loss_rpn_cls".to_string(), loss_rpn_cls);
        m.insert("loss_rpn_bbox".to_string(), loss_rpn_bbox);
        m.insert("loss_cls".to_string(), loss_cls);
        m.insert("loss_bbox".to_string(), loss_bbox);
        m.insert("acc".to_string(), acc);
        if let Some(mh) = &self.mask_head {
            let pos: Vec<Tensor> = samples.iter().map(|s| s.pos_boxes()).collect();
            let pos_rois = bbox2roi(&pos.iter().collect::<Vec<_>>());
            let out = 2 * r.mask_roi_size;
            let targets: Vec<Tensor> = tch::no_grad(|| {
                samples
                    .iter()
                    .zip(gts)
                    .zip(&pos)
                    .map(|((s, g), pb)| mask_targets(pb, &s.pos_gt_inds, g, out))
                    .collect()
            });
            tick("mask targets");
            let labels = Tensor::cat(
                &samples
                    .iter()
                    .map(|s| s.pos_labels.shallow_clone())
                    .collect::<Vec<_>>(),
                0,
            );
            let mf = self.mask_extractor.forward(rf, &pos_rois);
            let logits = mh.forward(&mf);
            let tg = Tensor::cat(&targets, 0).to_device(logits.device());
            m.insert(
                "loss_mask".to_string(),
                mask_head::mask_loss(&logits, &tg, &labels),
            );
            tick("mask head");
        }
        Losses(m)
    }

    /// [`Detector::forward_train`] on a `cnx_datasets` batch (moved to `device`).
    pub fn forward_train_batch(&self, batch: &cnx_datasets::DetBatch, device: Device) -> Losses {
        let (images, metas) = batch_inputs(batch, device);
        let gts: Vec<GtInstances> = batch
            .targets
            .iter()
            .map(|t| GtInstances::from_targets(t, device))
            .collect();
        self.forward_train(&images, &metas, &gts)
    }

    /// [`Detector::predict`] on a `cnx_datasets` batch.
    pub fn predict_batch(&self, batch: &cnx_datasets::DetBatch, device: Device) -> Vec<Detections> {
        let (images, metas) = batch_inputs(batch, device);
        self.predict(&images, &metas)
    }

    /// Inference on a padded batch; detections rescaled to each image's original size.
    pub fn predict(&self, images: &Tensor, metas: &[ImgMeta]) -> Vec<Detections> {
        tch::no_grad(|| {
            let feats = self.features(images, false);
            let proposals = self.proposals(&feats, metas);
            self.predict_from_proposals(&feats, &proposals, metas)
        })
    }

    /// RPN proposals (K,5 with scores) per image, test settings.
    pub fn proposals(&self, feats: &[Tensor], metas: &[ImgMeta]) -> Vec<Tensor> {
        let shapes: Vec<(i64, i64)> = metas.iter().map(|m| m.img_shape).collect();
        let out = self.rpn.forward(feats);
        self.rpn
            .proposals(&out, &shapes, &self.config.rpn.test_proposals)
    }

    /// The RoI stage at test time, from given proposals.
    pub fn predict_from_proposals(
        &self,
        feats: &[Tensor],
        proposals: &[Tensor],
        metas: &[ImgMeta],
    ) -> Vec<Detections> {
        let r = &self.config.roi;
        let rf = self.roi_feats(feats);
        let rois = bbox2roi(&proposals.iter().collect::<Vec<_>>());
        let bf = self.bbox_extractor.forward(rf, &rois);
        // Post-processing in f32 even under autocast (box coordinates need the precision).
        let (cls, reg) = self.bbox_head.forward(&bf, false);
        let (cls, reg) = (cls.to_kind(Kind::Float), reg.to_kind(Kind::Float));
        let counts: Vec<i64> = proposals.iter().map(|p| p.size()[0]).collect();
        let rois_s = rois.split_with_sizes(&counts, 0);
        let cls_s = cls.split_with_sizes(&counts, 0);
        let reg_s = reg.split_with_sizes(&counts, 0);
        let dets: Vec<bbox_head::BoxDetections> = (0..proposals.len())
            .map(|i| {
                bbox_head::get_bboxes(
                    &rois_s[i],
                    &cls_s[i],
                    &reg_s[i],
                    &r.bbox_coder,
                    metas[i].img_shape,
                    metas[i].sf4(),
                    &r.test,
                )
            })
            .collect();
        let mut masks: Vec<Option<Tensor>> = (0..dets.len()).map(|_| None).collect();
        if let Some(mh) = &self.mask_head {
            let scaled: Vec<Tensor> = dets
                .iter()
                .zip(metas)
                .map(|(d, m)| &d.boxes * Tensor::from_slice(&m.sf4()).to_device(d.boxes.device()))
                .collect();
            let total: i64 = scaled.iter().map(|s| s.size()[0]).sum();
            if total > 0 {
                let mrois = bbox2roi(&scaled.iter().collect::<Vec<_>>());
                let logits = mh
                    .forward(&self.mask_extractor.forward(rf, &mrois))
                    .to_kind(Kind::Float);
                let dc: Vec<i64> = scaled.iter().map(|s| s.size()[0]).collect();
                let parts = logits.split_with_sizes(&dc, 0);
                for (i, d) in dets.iter().enumerate() {
                    let (oh, ow) = metas[i].ori_shape;
                    if dc[i] == 0 {
                        masks[i] = Some(Tensor::zeros([0, oh, ow], (Kind::Bool, logits.device())));
                        continue;
                    }
                    let p = parts[i].sigmoid();
                    let idx = d
                        .labels
                        .view([-1, 1, 1, 1])
                        .expand([dc[i], 1, p.size()[2], p.size()[3]], false);
                    let p = p.gather(1, &idx, false).squeeze_dim(1);
                    let sf = Tensor::from_slice(&metas[i].sf4()).to_device(p.device());
                    let b = &scaled[i] / sf;
                    masks[i] = Some(mask_head::paste_masks(
                        &p,
                        &b,
                        oh,
                        ow,
                        r.test.mask_thr_binary,
                    ));
                }
            } else {
                for (i, m) in metas.iter().enumerate() {
                    masks[i] = Some(Tensor::zeros(
                        [0, m.ori_shape.0, m.ori_shape.1],
                        (Kind::Bool, rois.device()),
                    ));
                }
            }
        }
        dets.into_iter()
            .zip(masks)
            .map(|(d, m)| Detections {
                boxes: d.boxes,
                scores: d.scores,
                labels: d.labels,
                masks: m,
            })
            .collect()
    }

    /// mmdet's `forward_dummy` (what `get_flops` runs): backbone, neck, RPN head, then 1000
    /// random proposals through the box head and the first 100 through the mask head.
    pub fn forward_dummy(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let feats = self.features(images, false);
            let out = self.rpn.forward(&feats);
            let props = Tensor::randn([1000, 4], (Kind::Float, images.device()));
            let rois = bbox2roi(&[&props]);
            let rf = self.roi_feats(&feats);
            let (cls, _) = self
                .bbox_head
                .forward(&self.bbox_extractor.forward(rf, &rois), false);
            let mut s = cls.sum(Kind::Float) + out.cls[0].sum(Kind::Float);
            if let Some(mh) = &self.mask_head {
                let mr = rois.slice(0, 0, 100, 1);
                s += mh
                    .forward(&self.mask_extractor.forward(rf, &mr))
                    .sum(Kind::Float);
            }
            s
        })
    }
}

/// Parameters and multiply-adds of a detector as mmdet's `get_flops` counts them: one
/// `forward_dummy` of a (1, 3, h, w) input (ConvNeXt init skipped: weights do not matter).
pub fn complexity(cfg: &DetectorConfig, hw: [i64; 2]) -> (i64, cnx_backbone::flops::FlopTally) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let det = Detector::new(&vs.root(), cfg);
    let params = cnx_backbone::nn::param_count(&vs);
    let x = Tensor::zeros([1, 3, hw[0], hw[1]], (Kind::Float, Device::Cpu));
    let (_, tally) = cnx_backbone::flops::count(|| det.forward_dummy(&x));
    (params, tally)
}

/// Image tensor (N,3,H,W) and metas of a `cnx_datasets` batch.
pub fn batch_inputs(batch: &cnx_datasets::DetBatch, device: Device) -> (Tensor, Vec<ImgMeta>) {
    let s = batch.shape.map(|v| v as i64);
    let images = Tensor::from_slice(&batch.images).view(s).to_device(device);
    (images, batch.metas.iter().map(ImgMeta::from).collect())
}

/// 28x28 (or `out`) binary mask targets of one image's positives via the dataset's
/// `crop_and_resize` (mmdet `mask_target_single`).
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
