//! A two-stage detector (mmdet 2.x `TwoStageDetector`): backbone, FPN neck, RPN, and a
//! pluggable RoI stage ([`RoiHead`]). Mask R-CNN and Cascade Mask R-CNN are this one type with
//! a [`StandardRoiHead`] or a [`crate::cascade::CascadeRoiHead`]; which one is decided by the
//! config it is built from ([`DetectorSpec`]).

use crate::detector::DetectorConfig;
use crate::fpn::Fpn;
use crate::roi_head::{RoiHead, StandardRoiHead};
use crate::rpn::RpnHead;
use crate::structures::{Detections, GtInstances, ImgMeta, Losses, Proposals, Rois};
use cnx_backbone::dense::DenseBackbone;
use std::collections::BTreeMap;
use tch::nn::Path;
use tch::{Device, Kind, Tensor};

/// A config a [`TwoStageDetector`] can be built from: the shared parts (backbone, neck, RPN,
/// RoI sizes, classes) and the RoI stage it asks for.
pub trait DetectorSpec {
    /// Backbone, neck, RPN and RoI settings.
    fn base(&self) -> &DetectorConfig;
    /// The RoI stage under `p` (`roi_head.`) on `channels`-wide features.
    fn roi_head(&self, p: &Path, channels: i64) -> Box<dyn RoiHead>;
}

impl DetectorSpec for DetectorConfig {
    fn base(&self) -> &DetectorConfig {
        self
    }
    fn roi_head(&self, p: &Path, channels: i64) -> Box<dyn RoiHead> {
        Box::new(StandardRoiHead::new(p, &self.roi, channels))
    }
}

/// The assembled detector. Variables live under `backbone.`, `neck.`, `rpn_head.` and
/// `roi_head.` as in mmdetection, so its checkpoints load unchanged.
#[derive(Debug)]
pub struct TwoStageDetector {
    /// Backbone, neck, RPN and RoI settings (for a Cascade, its base config).
    pub config: DetectorConfig,
    pub backbone: Box<dyn DenseBackbone>,
    pub neck: Fpn,
    pub rpn: RpnHead,
    pub roi_head: Box<dyn RoiHead>,
}

impl TwoStageDetector {
    /// Build under `root` (the VarStore root). The backbone gets its official initialisation;
    /// heads keep their mmdet initialisation.
    pub fn new(root: &Path, spec: &impl DetectorSpec) -> Self {
        let cfg = spec.base().clone();
        let backbone = cfg.backbone.build(&(root / "backbone"));
        let chans = backbone.out_channels();
        let c = cfg.neck.out_channels;
        let neck = Fpn::new(&(root / "neck"), &chans, c, cfg.neck.num_outs);
        let rpn = cfg.rpn.build(&(root / "rpn_head"), c);
        let roi_head = spec.roi_head(&(root / "roi_head"), c);
        Self {
            config: cfg,
            backbone,
            neck,
            rpn,
            roi_head,
        }
    }

    /// Number of object classes (background excluded).
    pub fn num_classes(&self) -> i64 {
        self.roi_head.num_classes()
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

    /// Training: mmdet's losses for a padded batch `images` (N,3,H,W) with per-image metas and
    /// targets: `loss_rpn_cls`, `loss_rpn_bbox`, then the RoI stage's (Mask R-CNN: `loss_cls`,
    /// `loss_bbox`, `loss_mask`, `acc`; Cascade: `s{i}.` prefixed per stage).
    pub fn forward_train(&self, images: &Tensor, metas: &[ImgMeta], gts: &[GtInstances]) -> Losses {
        let feats = self.features(images, true);
        let shapes: Vec<(i64, i64)> = metas.iter().map(|m| m.img_shape).collect();
        let pads: Vec<(i64, i64)> = metas.iter().map(|m| m.pad_shape).collect();
        let gt_boxes: Vec<Tensor> = gts.iter().map(|g| g.boxes.to_kind(Kind::Float)).collect();
        let rpn_out = self.rpn.forward(&feats);
        let (loss_rpn_cls, loss_rpn_bbox) = self.rpn.loss(&rpn_out, &shapes, &pads, &gt_boxes);
        let proposals = self
            .rpn
            .proposals(&rpn_out, &shapes, &self.config.rpn.train_proposals);
        let mut m = BTreeMap::new();
        m.insert("loss_rpn_cls".to_string(), loss_rpn_cls);
        m.insert("loss_rpn_bbox".to_string(), loss_rpn_bbox);
        m.extend(self.roi_head.forward_train(&feats, &proposals, metas, gts));
        Losses(m)
    }

    /// Inference on a padded batch; detections rescaled to each image's original size.
    pub fn predict(&self, images: &Tensor, metas: &[ImgMeta]) -> Vec<Detections> {
        tch::no_grad(|| {
            let feats = self.features(images, false);
            let proposals = self.proposals(&feats, metas);
            self.predict_from_proposals(&feats, &proposals, metas)
        })
    }

    /// RPN proposals of each image, test settings.
    pub fn proposals(&self, feats: &[Tensor], metas: &[ImgMeta]) -> Vec<Proposals> {
        let shapes: Vec<(i64, i64)> = metas.iter().map(|m| m.img_shape).collect();
        let out = self.rpn.forward(feats);
        self.rpn
            .proposals(&out, &shapes, &self.config.rpn.test_proposals)
    }

    /// The RoI stage at test time, from given proposals.
    pub fn predict_from_proposals(
        &self,
        feats: &[Tensor],
        proposals: &[Proposals],
        metas: &[ImgMeta],
    ) -> Vec<Detections> {
        self.roi_head.simple_test(feats, proposals, metas)
    }

    /// mmdet's `forward_dummy` (what `get_flops` runs): backbone, neck, RPN head, then 1000
    /// random proposals through the box head(s) and the first 100 through the mask head(s).
    pub fn forward_dummy(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let feats = self.features(images, false);
            let out = self.rpn.forward(&feats);
            let props = Tensor::randn([1000, 4], (Kind::Float, images.device()));
            let rois = Rois::single(&props);
            out.cls[0].sum(Kind::Float) + self.roi_head.forward_dummy(&feats, &rois)
        })
    }
}

/// Parameters and multiply-adds of a detector as mmdet's `get_flops` counts them: one
/// `forward_dummy` of a (1, 3, h, w) input.
pub fn complexity(spec: &impl DetectorSpec, hw: [i64; 2]) -> (i64, cnx_backbone::flops::FlopTally) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let det = TwoStageDetector::new(&vs.root(), spec);
    let params = cnx_backbone::nn::param_count(&vs);
    let x = Tensor::zeros([1, 3, hw[0], hw[1]], (Kind::Float, Device::Cpu));
    let (_, tally) = cnx_backbone::flops::count(|| det.forward_dummy(&x));
    (params, tally)
}
