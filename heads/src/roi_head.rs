//! The second stage of a two-stage detector behind one interface ([`RoiHead`], mmdet 2.x's
//! `BaseRoIHead`): the standard single-stage head of Mask R-CNN ([`StandardRoiHead`]) here, the
//! three-stage head of Cascade Mask R-CNN in [`crate::cascade`]. Both take the RPN's proposals
//! and the FPN features; [`crate::two_stage::TwoStageDetector`] owns the rest.

use crate::assigner::{MaxIoUAssigner, RandomSampler, SamplingResult};
use crate::bbox_head::{self, BoxDetections, BoxHead, Shared2FcBoxHead};
use crate::detector::{mask_targets, RoiHeadCfg};
use crate::mask_head::{self, FcnMaskHead};
use crate::roi_extractor::RoiExtractor;
use crate::structures::{Detections, GtInstances, ImgMeta, Proposals, Rois};
use std::collections::BTreeMap;
use tch::nn::Path;
use tch::{Kind, Tensor};

/// What a detector's RoI stage does in training, at test time and for FLOP counting.
pub trait RoiHead: std::fmt::Debug + Send {
    /// Losses (mmdet names) for the RPN's training proposals of each image.
    fn forward_train(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
        gts: &[GtInstances],
    ) -> BTreeMap<String, Tensor>;

    /// Detections in original-image coordinates from the test proposals of each image.
    fn simple_test(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
    ) -> Vec<Detections>;

    /// mmdet's `forward_dummy` of the RoI stage: `rois` through every box head, the first 100
    /// through every mask head; a scalar that depends on all outputs.
    fn forward_dummy(&self, feats: &[Tensor], rois: &Rois) -> Tensor;

    /// Number of object classes (background excluded).
    fn num_classes(&self) -> i64;
}

/// The two RoI extractors of a head (boxes 7x7, masks 14x14) and the FPN levels they read.
#[derive(Debug)]
pub struct RoiExtractors {
    pub bbox: RoiExtractor,
    pub mask: RoiExtractor,
    levels: usize,
}

impl RoiExtractors {
    pub fn new(cfg: &RoiHeadCfg) -> Self {
        let mut bbox = RoiExtractor::new(cfg.bbox_roi_size, cfg.featmap_strides.clone());
        bbox.finest_scale = cfg.finest_scale;
        let mut mask = RoiExtractor::new(cfg.mask_roi_size, cfg.featmap_strides.clone());
        mask.finest_scale = cfg.finest_scale;
        Self {
            bbox,
            mask,
            levels: cfg.featmap_strides.len(),
        }
    }

    /// The FPN levels the RoI stage pools from (the 5th, pooled-only level is for the RPN).
    pub fn levels<'a>(&self, feats: &'a [Tensor]) -> &'a [Tensor] {
        &feats[..self.levels]
    }
}

/// Mask R-CNN's RoI stage (mmdet `StandardRoIHead`): Shared2FC box head trained with L1 on
/// deltas, FCN mask head on the positives.
#[derive(Debug)]
pub struct StandardRoiHead {
    pub cfg: RoiHeadCfg,
    pub extractors: RoiExtractors,
    pub bbox_head: Box<dyn BoxHead>,
    pub mask_head: Option<FcnMaskHead>,
}

impl StandardRoiHead {
    /// Build under `p` (`roi_head.`) on `channels`-wide FPN features.
    pub fn new(p: &Path, cfg: &RoiHeadCfg, channels: i64) -> Self {
        let bbox_head = Shared2FcBoxHead::new(
            &(p / "bbox_head"),
            channels,
            cfg.bbox_roi_size,
            cfg.fc_dim,
            cfg.num_classes,
        );
        let mask_head = cfg.with_mask.then(|| {
            FcnMaskHead::new(
                &(p / "mask_head"),
                channels,
                cfg.mask_conv_channels,
                cfg.mask_num_convs,
                cfg.num_classes,
            )
        });
        Self {
            cfg: cfg.clone(),
            extractors: RoiExtractors::new(cfg),
            bbox_head: Box::new(bbox_head),
            mask_head,
        }
    }
}

impl RoiHead for StandardRoiHead {
    fn forward_train(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        _metas: &[ImgMeta],
        gts: &[GtInstances],
    ) -> BTreeMap<String, Tensor> {
        let r = &self.cfg;
        let gt_boxes: Vec<Tensor> = gts.iter().map(|g| g.boxes.to_kind(Kind::Float)).collect();
        let boxes: Vec<Tensor> = proposals.iter().map(|p| p.boxes.shallow_clone()).collect();
        let samples = assign_and_sample(&r.assigner, &r.sampler, &boxes, gts, &gt_boxes);
        let rf = self.extractors.levels(feats);
        let rois = bbox_head::sampled_rois(&samples);
        let bf = self.extractors.bbox.forward(rf, &rois);
        let (cls, reg) = self.bbox_head.forward(&bf, true);
        let t = bbox_head::box_targets(&samples, &gt_boxes, r.num_classes, &r.bbox_coder, false);
        let (loss_cls, loss_bbox, acc) = bbox_head::box_loss_l1(&cls, &reg, &t);
        let mut m = BTreeMap::new();
        m.insert("loss_cls".to_string(), loss_cls);
        m.insert("loss_bbox".to_string(), loss_bbox);
        m.insert("acc".to_string(), acc);
        if let Some(mh) = &self.mask_head {
            m.insert(
                "loss_mask".to_string(),
                mask_loss(mh, &self.extractors, rf, &samples, gts, r.mask_roi_size),
            );
        }
        m
    }

    fn simple_test(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
    ) -> Vec<Detections> {
        let r = &self.cfg;
        let rf = self.extractors.levels(feats);
        let rois = Rois::from_proposals(proposals);
        let bf = self.extractors.bbox.forward(rf, &rois);
        // Post-processing in f32 even under autocast (box coordinates need the precision).
        let (cls, reg) = self.bbox_head.forward(&bf, false);
        let (cls, reg) = (cls.to_kind(Kind::Float), reg.to_kind(Kind::Float));
        let dets = box_detections(&rois, &cls, &reg, metas, |_| (&r.bbox_coder, &r.test));
        let masks = self.mask_head.as_ref().map(|mh| {
            detection_masks(
                &dets,
                metas,
                r.test.mask_thr_binary,
                rois.device(),
                |mrois| {
                    mh.forward(&self.extractors.mask.forward(rf, mrois))
                        .to_kind(Kind::Float)
                        .sigmoid()
                },
            )
        });
        assemble(dets, masks)
    }

    fn forward_dummy(&self, feats: &[Tensor], rois: &Rois) -> Tensor {
        let rf = self.extractors.levels(feats);
        let (cls, _) = self
            .bbox_head
            .forward(&self.extractors.bbox.forward(rf, rois), false);
        let mut s = cls.sum(Kind::Float);
        if let Some(mh) = &self.mask_head {
            let mr = rois.first(100);
            s += mh
                .forward(&self.extractors.mask.forward(rf, &mr))
                .sum(Kind::Float);
        }
        s
    }

    fn num_classes(&self) -> i64 {
        self.cfg.num_classes
    }
}

/// Max-IoU assignment of each image's proposal boxes (K,4) to its GT and the RoI sampling of
/// one (stage's) RoI head, without gradients. One random call site per call (per stage): with
/// batch keys installed image i samples from its own keyed stream.
pub fn assign_and_sample(
    assigner: &MaxIoUAssigner,
    sampler: &RandomSampler,
    boxes: &[Tensor],
    gts: &[GtInstances],
    gt_boxes: &[Tensor],
) -> Vec<SamplingResult> {
    let site = cnx_backbone::replica::next_site();
    tch::no_grad(|| {
        boxes
            .iter()
            .zip(gts)
            .zip(gt_boxes)
            .enumerate()
            .map(|(i, ((b, g), gb))| {
                let a = assigner.assign(b, gb, &g.labels);
                let mut stream = site.as_ref().map(|s| s.stream(i));
                sampler.sample_keyed(&a, b, gb, &g.labels, stream.as_mut())
            })
            .collect()
    })
}

/// Mask loss of one stage: 28x28 targets cropped from the GT masks at the positives, BCE on
/// each positive's GT-class channel (mmdet `FCNMaskHead.loss`).
pub fn mask_loss(
    mh: &FcnMaskHead,
    extractors: &RoiExtractors,
    rf: &[Tensor],
    samples: &[SamplingResult],
    gts: &[GtInstances],
    mask_roi_size: i64,
) -> Tensor {
    let pos: Vec<Tensor> = samples.iter().map(|s| s.pos_boxes()).collect();
    let pos_rois = Rois::from_boxes(&pos.iter().collect::<Vec<_>>());
    let out = 2 * mask_roi_size;
    let targets: Vec<Tensor> = tch::no_grad(|| {
        samples
            .iter()
            .zip(gts)
            .zip(&pos)
            .map(|((s, g), pb)| {
                // detector::mask_targets reads the positives' boxes and GT indices (one read
                // each) and uploads the cropped targets, when there are positives and masks.
                if s.num_pos() > 0 && g.masks.is_some() {
                    crate::sync_count::host_read("mask target boxes");
                    crate::sync_count::host_read("mask target gt inds");
                    crate::sync_count::upload("mask targets");
                }
                mask_targets(pb, &s.pos_gt_inds, g, out)
            })
            .collect()
    });
    let labels = Tensor::cat(
        &samples
            .iter()
            .map(|s| s.pos_labels.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    );
    let logits = mh.forward(&extractors.mask.forward(rf, &pos_rois));
    let tg = Tensor::cat(&targets, 0).to_device(logits.device());
    mask_head::mask_loss(&logits, &tg, &labels)
}

/// Per-image box post-processing (decode, score threshold, per-class NMS, rescale) of a batch's
/// class scores and deltas for its RoIs; `settings(i)` gives image i's coder and test settings.
pub fn box_detections<'a>(
    rois: &Rois,
    cls: &Tensor,
    reg: &Tensor,
    metas: &[ImgMeta],
    settings: impl Fn(usize) -> (&'a crate::coder::DeltaXYWHCoder, &'a bbox_head::RcnnTestCfg),
) -> Vec<BoxDetections> {
    let boxes_s = rois.split(&rois.boxes());
    let cls_s = rois.split(cls);
    let reg_s = rois.split(reg);
    (0..rois.counts.len())
        .map(|i| {
            let (coder, test) = settings(i);
            bbox_head::get_bboxes(
                &boxes_s[i],
                &cls_s[i],
                &reg_s[i],
                coder,
                metas[i].img_shape,
                metas[i].sf4(),
                test,
            )
        })
        .collect()
}

/// Binary masks (D, ori_h, ori_w) of each image's detections. `probs` maps the mask RoIs (in
/// the resized image) to per-class probabilities (R, K, 28, 28); each detection's label channel
/// is pasted into the original image at `thr`. `device` holds empty results.
pub fn detection_masks(
    dets: &[BoxDetections],
    metas: &[ImgMeta],
    thr: f64,
    device: tch::Device,
    probs: impl FnOnce(&Rois) -> Tensor,
) -> Vec<Tensor> {
    let scaled: Vec<Tensor> = dets
        .iter()
        .zip(metas)
        .map(|(d, m)| &d.boxes * scale_row(m, &d.boxes))
        .collect();
    let dc: Vec<i64> = scaled.iter().map(|s| s.size()[0]).collect();
    let empty = |m: &ImgMeta, device| {
        Tensor::zeros([0, m.ori_shape.0, m.ori_shape.1], (Kind::Bool, device))
    };
    if dc.iter().sum::<i64>() == 0 {
        return metas.iter().map(|m| empty(m, device)).collect();
    }
    let prob = probs(&Rois::from_boxes(&scaled.iter().collect::<Vec<_>>()));
    let parts = prob.split_with_sizes(&dc, 0);
    dets.iter()
        .enumerate()
        .map(|(i, d)| {
            let m = &metas[i];
            if dc[i] == 0 {
                return empty(m, prob.device());
            }
            let p = &parts[i];
            let idx = d
                .labels
                .view([-1, 1, 1, 1])
                .expand([dc[i], 1, p.size()[2], p.size()[3]], false);
            let p = p.gather(1, &idx, false).squeeze_dim(1);
            let b = &scaled[i] / scale_row(m, &p);
            mask_head::paste_masks(&p, &b, m.ori_shape.0, m.ori_shape.1, thr)
        })
        .collect()
}

/// An image's scale factor (w, h, w, h) on `like`'s device as f32, written by fill kernels (no
/// upload per image).
fn scale_row(m: &ImgMeta, like: &Tensor) -> Tensor {
    crate::sync_count::filled(&m.sf4().map(f64::from), Kind::Float, like.device())
}

/// Box detections plus (when the model has masks) their masks, image by image.
pub fn assemble(dets: Vec<BoxDetections>, masks: Option<Vec<Tensor>>) -> Vec<Detections> {
    let mut masks = masks.map(|m| m.into_iter());
    dets.into_iter()
        .map(|d| Detections {
            boxes: d.boxes,
            scores: d.scores,
            labels: d.labels,
            masks: masks.as_mut().and_then(|m| m.next()),
        })
        .collect()
}
