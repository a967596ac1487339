//! Cascade Mask R-CNN (mmdet 2.28 `CascadeRCNN` + `CascadeRoIHead`) on the ConvNeXt backbone:
//! the backbone, FPN and RPN of [`crate::detector`], then three RoI stages (IoU 0.5 / 0.6 / 0.7,
//! loss weights 1 / 0.5 / 0.25, finer coder stds per stage), each with a `Shared4Conv1FCBBoxHead`
//! ([`ConvFcBoxHead`]: 4 × conv3x3-BN-ReLU, 1 fc) trained with GIoU on decoded boxes, and one
//! `FCNMaskHead` per stage. Variable names follow mmdetection (`roi_head.bbox_head.{i}.`,
//! `roi_head.mask_head.{i}.`) so its Cascade checkpoints load unchanged.

use crate::assigner::{MaxIoUAssigner, RandomSampler};
use crate::bbox_head::{self, BoxHead, RcnnTestCfg};
use crate::coder::DeltaXYWHCoder;
use crate::conv_module::ConvModule;
use crate::detector::DetectorConfig;
use crate::mask_head::FcnMaskHead;
use crate::roi_head::{
    assemble, assign_and_sample, box_detections, detection_masks, mask_loss, RoiExtractors, RoiHead,
};
use crate::rpn::ProposalCfg;
use crate::structures::{Detections, GtInstances, ImgMeta, Proposals, Rois};
use crate::two_stage::{DetectorSpec, TwoStageDetector};
use crate::HeadsError;
use cnx_backbone::nn::Linear;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::nn::{Module, Path};
use tch::{Kind, Tensor};

/// mmdet's `ConvFCBBoxHead` with shared convs (ConvModule: conv without bias → BN → ReLU) and
/// shared fcs: `Shared4Conv1FCBBoxHead` in Cascade Mask R-CNN for ConvNeXt.
#[derive(Debug)]
pub struct ConvFcBoxHead {
    pub convs: Vec<ConvModule>,
    pub fcs: Vec<Linear>,
    pub fc_cls: Linear,
    pub fc_reg: Linear,
    num_classes: i64,
}

impl ConvFcBoxHead {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &Path,
        in_channels: i64,
        roi_size: i64,
        num_convs: usize,
        conv_channels: i64,
        num_fcs: usize,
        fc_dim: i64,
        num_classes: i64,
    ) -> Self {
        let convs: Vec<ConvModule> = (0..num_convs)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { conv_channels };
                ConvModule::new(p / "shared_convs" / i, cin, conv_channels, 3, 1)
            })
            .collect();
        let last_c = if num_convs > 0 {
            conv_channels
        } else {
            in_channels
        };
        let fcs: Vec<Linear> = (0..num_fcs)
            .map(|i| {
                let din = if i == 0 {
                    last_c * roi_size * roi_size
                } else {
                    fc_dim
                };
                Linear::new(p / "shared_fcs" / i, din, fc_dim, true)
            })
            .collect();
        let last = if num_fcs > 0 {
            fc_dim
        } else {
            last_c * roi_size * roi_size
        };
        let s = Self {
            convs,
            fcs,
            fc_cls: Linear::new(p / "fc_cls", last, num_classes + 1, true),
            fc_reg: Linear::new(p / "fc_reg", last, 4 * num_classes, true),
            num_classes,
        };
        // ConvFCBBoxHead.init_cfg: Xavier(uniform) on the shared fcs; BBoxHead: Normal(0.01) on
        // fc_cls, Normal(0.001) on fc_reg. ConvModules keep their kaiming init.
        for fc in &s.fcs {
            crate::init::xavier_uniform(&fc.inner.ws, fc.inner.bs.as_ref());
        }
        crate::init::normal(&s.fc_cls.inner.ws, s.fc_cls.inner.bs.as_ref(), 0.01);
        crate::init::normal(&s.fc_reg.inner.ws, s.fc_reg.inner.bs.as_ref(), 0.001);
        s
    }
}

impl BoxHead for ConvFcBoxHead {
    fn forward(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut x = x.shallow_clone();
        for c in &self.convs {
            x = c.forward_t(&x, train);
        }
        let mut x = x.flatten(1, -1);
        for fc in &self.fcs {
            x = fc.forward(&x).relu();
        }
        (self.fc_cls.forward(&x), self.fc_reg.forward(&x))
    }
    fn num_classes(&self) -> i64 {
        self.num_classes
    }
}

/// One cascade stage's training settings and box coder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageCfg {
    pub assigner: MaxIoUAssigner,
    pub sampler: RandomSampler,
    pub loss_weight: f64,
    pub coder: DeltaXYWHCoder,
}

impl StageCfg {
    /// mmdet's cascade stage: max-IoU assigner at `iou` (no low-quality matches), 512 RoIs with
    /// 25 % positives and the GT boxes added as proposals.
    pub fn new(iou: f64, loss_weight: f64, stds: [f64; 4]) -> Self {
        Self {
            assigner: MaxIoUAssigner {
                pos_iou_thr: iou,
                neg_iou_thr: iou,
                min_pos_iou: iou,
                match_low_quality: false,
            },
            sampler: RandomSampler::rcnn(),
            loss_weight,
            coder: DeltaXYWHCoder::new([0.0; 4], stds),
        }
    }
}

/// Cascade Mask R-CNN: the shared parts of a [`DetectorConfig`] (backbone, neck, RPN, RoI
/// extractors, mask head sizes, test settings; its single-stage coder/assigner are unused) plus
/// the stages and the box-head shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    pub base: DetectorConfig,
    pub stages: Vec<StageCfg>,
    pub num_shared_convs: usize,
    pub conv_channels: i64,
    pub num_shared_fcs: usize,
    /// GIoU loss weight on decoded boxes (`reg_decoded_bbox`).
    pub giou_weight: f64,
}

impl CascadeConfig {
    /// The paper's Cascade Mask R-CNN with a ConvNeXt variant, 80 classes.
    pub fn cascade_mask_rcnn_convnext(variant: &str) -> Result<Self, HeadsError> {
        let mut base = DetectorConfig::mask_rcnn_convnext(variant)?;
        base.name = format!(
            "cascade_mask_rcnn_convnext_{}",
            variant.strip_prefix("convnext_").unwrap_or(variant)
        );
        base.rpn.train_proposals = ProposalCfg::train(2000);
        // mmdet's cascade_mask_rcnn_r50_fpn base config: RPN SmoothL1 (beta 1/9), not L1.
        base.rpn.smooth_l1_beta = 1.0 / 9.0;
        // ... and `allowed_border = 0`: anchors crossing the image border are not assigned.
        base.rpn.allowed_border = 0.0;
        base.roi.assigner = MaxIoUAssigner::rcnn(0.5);
        Ok(Self {
            base,
            stages: vec![
                StageCfg::new(0.5, 1.0, [0.1, 0.1, 0.2, 0.2]),
                StageCfg::new(0.6, 0.5, [0.05, 0.05, 0.1, 0.1]),
                StageCfg::new(0.7, 0.25, [0.033, 0.033, 0.067, 0.067]),
            ],
            num_shared_convs: 4,
            conv_channels: 256,
            num_shared_fcs: 1,
            giou_weight: 10.0,
        })
    }
}

/// `BBoxHead.regress_by_class`: apply each RoI's `labels` deltas from class-specific `reg`
/// (R,4K) to one image's RoI boxes (R,4), clipped to `img_shape`; returns the new boxes (R,4).
pub fn regress_by_class(
    boxes: &Tensor,
    labels: &Tensor,
    reg: &Tensor,
    coder: &DeltaXYWHCoder,
    img_shape: (i64, i64),
) -> Tensor {
    if boxes.size()[0] == 0 {
        return boxes.shallow_clone();
    }
    let l = (labels * 4).view([-1, 1]);
    let inds = Tensor::cat(&[&l, &(&l + 1), &(&l + 2), &(&l + 3)], 1);
    let d = reg.gather(1, &inds, false);
    coder.decode(boxes, &d, Some((img_shape.0 as f64, img_shape.1 as f64)))
}

impl DetectorSpec for CascadeConfig {
    fn base(&self) -> &DetectorConfig {
        &self.base
    }
    fn roi_head(&self, p: &Path, channels: i64) -> Box<dyn RoiHead> {
        Box::new(CascadeRoiHead::new(p, self, channels))
    }
}

/// mmdet's `CascadeRoIHead`: one box head and one mask head per stage (`roi_head.bbox_head.{i}.`,
/// `roi_head.mask_head.{i}.`), each stage refining the previous stage's boxes.
#[derive(Debug)]
pub struct CascadeRoiHead {
    pub config: CascadeConfig,
    pub extractors: RoiExtractors,
    pub bbox_heads: Vec<ConvFcBoxHead>,
    pub mask_heads: Vec<FcnMaskHead>,
}

impl CascadeRoiHead {
    /// Build under `p` (`roi_head.`) on `channels`-wide FPN features.
    pub fn new(p: &Path, cfg: &CascadeConfig, channels: i64) -> Self {
        let r = &cfg.base.roi;
        let bbox_heads = (0..cfg.stages.len())
            .map(|i| {
                ConvFcBoxHead::new(
                    &(p / "bbox_head" / i),
                    channels,
                    r.bbox_roi_size,
                    cfg.num_shared_convs,
                    cfg.conv_channels,
                    cfg.num_shared_fcs,
                    r.fc_dim,
                    r.num_classes,
                )
            })
            .collect();
        let mask_heads = if r.with_mask {
            (0..cfg.stages.len())
                .map(|i| {
                    FcnMaskHead::new(
                        &(p / "mask_head" / i),
                        channels,
                        r.mask_conv_channels,
                        r.mask_num_convs,
                        r.num_classes,
                    )
                })
                .collect()
        } else {
            vec![]
        };
        Self {
            config: cfg.clone(),
            extractors: RoiExtractors::new(r),
            bbox_heads,
            mask_heads,
        }
    }

    /// mmdet `BBoxHead.loss` with `reg_decoded_bbox` and GIoU: cross-entropy averaged over all
    /// sampled RoIs; deltas decoded on the RoIs (no clipping) and `weight × Σ(1 − GIoU)` over
    /// positives divided by the number of RoIs.
    fn box_loss_giou(
        &self,
        cls: &Tensor,
        reg: &Tensor,
        rois: &Rois,
        t: &bbox_head::BoxTargets,
        coder: &DeltaXYWHCoder,
    ) -> (Tensor, Tensor, Tensor) {
        let n = bbox_head::roi_divisor(cls);
        let (loss_cls, acc) = bbox_head::cls_loss_and_acc(cls, t, &n);
        let pos_idx = &t.pos_idx;
        let loss_bbox = if pos_idx.size()[0] > 0 {
            let d = bbox_head::select_class_deltas(reg, &t.labels, pos_idx).to_kind(Kind::Float);
            let pr = rois.boxes().index_select(0, pos_idx);
            let pred = coder.decode(&pr, &d, None);
            let g = crate::boxes::aligned_giou(&pred, &t.bbox_targets.index_select(0, pos_idx));
            n.divide(&(g.neg() + 1.0).sum(Kind::Float)) * self.config.giou_weight
        } else {
            reg.sum(Kind::Float) * 0.0
        };
        (loss_cls, loss_bbox, acc)
    }
}

impl RoiHead for CascadeRoiHead {
    /// Losses as mmdet's `CascadeRoIHead.forward_train` names them: per stage `s{i}.loss_cls`,
    /// `s{i}.loss_bbox`, `s{i}.loss_mask` (scaled by the stage's weight) and `s{i}.acc`.
    fn forward_train(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
        gts: &[GtInstances],
    ) -> BTreeMap<String, Tensor> {
        let gt_boxes: Vec<Tensor> = gts.iter().map(|g| g.boxes.to_kind(Kind::Float)).collect();
        // Each stage's boxes per image: the proposals, then the previous stage's refinement.
        let mut boxes: Vec<Tensor> = proposals.iter().map(|p| p.boxes.detach()).collect();
        let mut m = BTreeMap::new();
        let r = &self.config.base.roi;
        let rf = self.extractors.levels(feats);
        let n_stages = self.config.stages.len();
        for (i, st) in self.config.stages.iter().enumerate() {
            let samples = assign_and_sample(&st.assigner, &st.sampler, &boxes, gts, &gt_boxes);
            let rois = bbox_head::sampled_rois(&samples);
            let bf = self.extractors.bbox.forward(rf, &rois);
            let (cls, reg) = self.bbox_heads[i].forward(&bf, true);
            let t = bbox_head::box_targets(&samples, &gt_boxes, r.num_classes, &st.coder, true);
            let (loss_cls, loss_bbox, acc) = self.box_loss_giou(&cls, &reg, &rois, &t, &st.coder);
            let lw = st.loss_weight;
            m.insert(format!("s{i}.loss_cls"), loss_cls * lw);
            m.insert(format!("s{i}.loss_bbox"), loss_bbox * lw);
            m.insert(format!("s{i}.acc"), acc);
            if let Some(mh) = self.mask_heads.get(i) {
                let loss = mask_loss(mh, &self.extractors, rf, &samples, gts, r.mask_roi_size);
                m.insert(format!("s{i}.loss_mask"), loss * lw);
            }
            if i + 1 < n_stages {
                if cls.numel() == 0 {
                    break;
                }
                // mmdet `refine_bboxes`: background RoIs take their argmax foreground class,
                // every RoI is regressed by its class, then RoIs that were GT boxes added as
                // proposals (positives with `pos_is_gt`) are dropped.
                boxes = tch::no_grad(|| {
                    let k = r.num_classes;
                    let cls = cls.detach().to_kind(Kind::Float);
                    let reg = reg.detach().to_kind(Kind::Float);
                    let fg = cls.slice(1, 0, k, 1).argmax(1, false);
                    let labels = fg.where_self(&t.labels.eq(k), &t.labels);
                    let boxes_s = rois.split(&rois.boxes());
                    let lab_s = rois.split(&labels);
                    let reg_s = rois.split(&reg);
                    samples
                        .iter()
                        .enumerate()
                        .map(|(j, s)| {
                            let new = regress_by_class(
                                &boxes_s[j],
                                &lab_s[j],
                                &reg_s[j],
                                &st.coder,
                                metas[j].img_shape,
                            );
                            let g = if st.sampler.add_gt_as_proposals {
                                gt_boxes[j].size()[0]
                            } else {
                                0
                            };
                            let keep_pos = s.pos_inds.ge(g);
                            let keep = Tensor::cat(
                                &[
                                    keep_pos,
                                    Tensor::ones([s.num_neg()], (Kind::Bool, new.device())),
                                ],
                                0,
                            );
                            crate::sync_count::host_read("refine keep");
                            new.index_select(0, &keep.nonzero().view([-1]))
                        })
                        .collect()
                });
            }
        }
        m
    }

    /// mmdet `CascadeRoIHead.simple_test`: class scores averaged over the stages, boxes from the
    /// last stage, masks from the mean of every stage's mask probabilities.
    fn simple_test(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
    ) -> Vec<Detections> {
        let r = &self.config.base.roi;
        let test: &RcnnTestCfg = &r.test;
        let rf = self.extractors.levels(feats);
        let n_img = proposals.len();
        let mut rois = Rois::from_proposals(proposals);
        let k = r.num_classes;
        let mut cls_sum: Option<Tensor> = None;
        let mut last_reg: Option<Tensor> = None;
        let n_stages = self.bbox_heads.len();
        for (i, head) in self.bbox_heads.iter().enumerate() {
            let bf = self.extractors.bbox.forward(rf, &rois);
            let (cls, reg) = head.forward(&bf, false);
            let (cls, reg) = (cls.to_kind(Kind::Float), reg.to_kind(Kind::Float));
            cls_sum = Some(match cls_sum {
                None => cls.shallow_clone(),
                Some(s) => s + &cls,
            });
            if i + 1 < n_stages {
                let boxes_s = rois.split(&rois.boxes());
                let cls_s = rois.split(&cls);
                let reg_s = rois.split(&reg);
                let refined: Vec<Tensor> = (0..n_img)
                    .map(|j| {
                        let lab = cls_s[j].slice(1, 0, k, 1).argmax(1, false);
                        regress_by_class(
                            &boxes_s[j],
                            &lab,
                            &reg_s[j],
                            &self.config.stages[i].coder,
                            metas[j].img_shape,
                        )
                    })
                    .collect();
                rois = rois.with_boxes(&Tensor::cat(&refined, 0));
            } else {
                last_reg = Some(reg);
            }
        }
        let cls = cls_sum.expect("at least one stage") / n_stages as f64;
        let reg = last_reg.expect("at least one stage");
        let last_coder = &self.config.stages[n_stages - 1].coder;
        let dets = box_detections(&rois, &cls, &reg, metas, |_| (last_coder, test));
        let masks = (!self.mask_heads.is_empty()).then(|| {
            detection_masks(&dets, metas, test.mask_thr_binary, rois.device(), |mrois| {
                let mf = self.extractors.mask.forward(rf, mrois);
                // merge_aug_masks: the mean of the stages' sigmoid probabilities.
                let mut prob: Option<Tensor> = None;
                for mh in &self.mask_heads {
                    let p = mh.forward(&mf).to_kind(Kind::Float).sigmoid();
                    prob = Some(match prob {
                        None => p,
                        Some(s) => s + p,
                    });
                }
                prob.expect("mask heads") / self.mask_heads.len() as f64
            })
        });
        assemble(dets, masks)
    }

    /// The same RoIs through every box head, the first 100 through every mask head.
    fn forward_dummy(&self, feats: &[Tensor], rois: &Rois) -> Tensor {
        let rf = self.extractors.levels(feats);
        let mut s = Tensor::zeros([], (Kind::Float, rois.device()));
        for h in &self.bbox_heads {
            let (cls, _) = h.forward(&self.extractors.bbox.forward(rf, rois), false);
            s += cls.sum(Kind::Float);
        }
        let mr = rois.first(100);
        for mh in &self.mask_heads {
            s += mh
                .forward(&self.extractors.mask.forward(rf, &mr))
                .sum(Kind::Float);
        }
        s
    }

    fn num_classes(&self) -> i64 {
        self.config.base.roi.num_classes
    }
}

/// Cascade Mask R-CNN is the two-stage detector with a [`CascadeRoiHead`] (built from a
/// [`CascadeConfig`]).
pub type CascadeDetector = TwoStageDetector;
