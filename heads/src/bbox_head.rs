//! Box heads of the RoI stage: the [`BoxHead`] trait (what Mask R-CNN and each Cascade stage
//! need), mmdet's `Shared2FCBBoxHead`, the classification/regression targets and losses, and the
//! test-time post-processing (softmax, class-specific decode, rescale, `multiclass_nms`).

use crate::assigner::SamplingResult;
use crate::coder::DeltaXYWHCoder;
use crate::structures::Rois;
use cnx_backbone::nn::Linear;
use cnx_backbone::replica::MeanDivisor;
use serde::{Deserialize, Serialize};
use tch::nn::{Module, Path};
use tch::{Kind, Tensor};

/// A box head: pooled RoI features (R, C, 7, 7) → class logits (R, K+1, background last) and
/// class-specific deltas (R, 4K).
pub trait BoxHead: std::fmt::Debug + Send {
    fn forward(&self, roi_feats: &Tensor, train: bool) -> (Tensor, Tensor);
    fn num_classes(&self) -> i64;
}

/// `Shared2FCBBoxHead`: flatten → fc → ReLU → fc → ReLU → `fc_cls` / `fc_reg`.
#[derive(Debug)]
pub struct Shared2FcBoxHead {
    fcs: Vec<Linear>,
    fc_cls: Linear,
    fc_reg: Linear,
    num_classes: i64,
}

impl Shared2FcBoxHead {
    pub fn new(p: &Path, in_channels: i64, roi_size: i64, fc_dim: i64, num_classes: i64) -> Self {
        let fcs = vec![
            Linear::new(
                p / "shared_fcs" / 0,
                in_channels * roi_size * roi_size,
                fc_dim,
                true,
            ),
            Linear::new(p / "shared_fcs" / 1, fc_dim, fc_dim, true),
        ];
        let s = Self {
            fcs,
            fc_cls: Linear::new(p / "fc_cls", fc_dim, num_classes + 1, true),
            fc_reg: Linear::new(p / "fc_reg", fc_dim, 4 * num_classes, true),
            num_classes,
        };
        for fc in &s.fcs {
            crate::init::xavier_uniform(&fc.inner.ws, fc.inner.bs.as_ref());
        }
        crate::init::normal(&s.fc_cls.inner.ws, s.fc_cls.inner.bs.as_ref(), 0.01);
        crate::init::normal(&s.fc_reg.inner.ws, s.fc_reg.inner.bs.as_ref(), 0.001);
        s
    }
}

impl BoxHead for Shared2FcBoxHead {
    fn forward(&self, x: &Tensor, _train: bool) -> (Tensor, Tensor) {
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

/// Test-time settings of the RoI stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RcnnTestCfg {
    pub score_thr: f64,
    pub iou_threshold: f64,
    pub max_per_img: i64,
    pub mask_thr_binary: f64,
}

impl Default for RcnnTestCfg {
    fn default() -> Self {
        Self {
            score_thr: 0.05,
            iou_threshold: 0.5,
            max_per_img: 100,
            mask_thr_binary: 0.5,
        }
    }
}

/// Classification and regression targets for a batch of sampled RoIs, in the RoI order
/// (per image: positives then negatives), as mmdet's `BBoxHead.get_targets`.
pub struct BoxTargets {
    pub labels: Tensor,
    pub bbox_targets: Tensor,
    pub pos_mask: Tensor,
    /// Indices of the positives (the nonzero entries of `pos_mask`), built from the per-image
    /// sample counts so the losses need no host read to find them.
    pub pos_idx: Tensor,
}

/// RoIs of the sampled boxes (positives then negatives per image).
pub fn sampled_rois(samples: &[SamplingResult]) -> Rois {
    let boxes: Vec<Tensor> = samples
        .iter()
        .map(|s| Tensor::cat(&[s.pos_boxes(), s.neg_boxes()], 0))
        .collect();
    Rois::from_boxes(&boxes.iter().collect::<Vec<_>>())
}

/// Targets; `gt_boxes` per image, `coder` the stage's coder; background label = num_classes.
/// With `decoded` the regression targets are the GT boxes themselves (GIoU on decoded boxes).
pub fn box_targets(
    samples: &[SamplingResult],
    gt_boxes: &[Tensor],
    num_classes: i64,
    coder: &DeltaXYWHCoder,
    decoded: bool,
) -> BoxTargets {
    let mut labels = Vec::new();
    let mut targets = Vec::new();
    let mut pos = Vec::new();
    let mut pos_idx = Vec::new();
    let mut offset = 0;
    for (s, gt) in samples.iter().zip(gt_boxes) {
        let device = s.boxes.device();
        let np = s.num_pos();
        let nn = s.num_neg();
        pos_idx.push(Tensor::arange_start(
            offset,
            offset + np,
            (Kind::Int64, device),
        ));
        offset += np + nn;
        labels.push(s.pos_labels.shallow_clone());
        labels.push(Tensor::full([nn], num_classes, (Kind::Int64, device)));
        let pg = gt.index_select(0, &s.pos_gt_inds);
        let t = if decoded {
            pg
        } else {
            coder.encode(&s.pos_boxes(), &pg)
        };
        targets.push(t.to_kind(Kind::Float));
        targets.push(Tensor::zeros([nn, 4], (Kind::Float, device)));
        pos.push(Tensor::ones([np], (Kind::Bool, device)));
        pos.push(Tensor::zeros([nn], (Kind::Bool, device)));
    }
    BoxTargets {
        labels: Tensor::cat(&labels, 0),
        bbox_targets: Tensor::cat(&targets, 0),
        pos_mask: Tensor::cat(&pos, 0),
        pos_idx: Tensor::cat(&pos_idx, 0),
    }
}

/// Per-positive class-specific predicted deltas (P,4) from (R,4K) regression outputs.
pub fn select_class_deltas(bbox_pred: &Tensor, labels: &Tensor, pos_idx: &Tensor) -> Tensor {
    let r = bbox_pred.size()[0];
    let p = bbox_pred.view([r, -1, 4]).index_select(0, pos_idx);
    let l = labels
        .index_select(0, pos_idx)
        .view([-1, 1, 1])
        .expand([-1, 1, 4], false);
    p.gather(1, &l, false).squeeze_dim(1)
}

/// The normalizer of mmdet's `BBoxHead.loss` (both terms): the number of sampled RoIs of the
/// batch, at least 1 — over all ranks under data parallelism ([`MeanDivisor`]).
pub fn roi_divisor(cls: &Tensor) -> MeanDivisor {
    MeanDivisor::new(cls.size()[0] as f64, 1.0, cls.device())
}

/// The classification half of mmdet's `BBoxHead.loss`: cross-entropy averaged over all sampled
/// RoIs (`n` from [`roi_divisor`]), and the accuracy (percent, detached, of this batch) —
/// shared by every box head's loss.
pub fn cls_loss_and_acc(cls: &Tensor, t: &BoxTargets, n: &MeanDivisor) -> (Tensor, Tensor) {
    let logp = cls.log_softmax(-1, Kind::Float);
    let loss_cls = n.divide(
        &-logp
            .gather(1, &t.labels.view([-1, 1]), false)
            .sum(Kind::Float),
    );
    let acc = cls
        .argmax(-1, false)
        .eq_tensor(&t.labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        * 100.0;
    (loss_cls, acc.detach())
}

/// mmdet's loss of `BBoxHead` with L1 on deltas: `(loss_cls, loss_bbox, acc)`. The box loss is
/// summed over positives and divided by the number of all sampled RoIs, as mmdet 2.x does.
pub fn box_loss_l1(cls: &Tensor, bbox_pred: &Tensor, t: &BoxTargets) -> (Tensor, Tensor, Tensor) {
    let n = roi_divisor(cls);
    let (loss_cls, acc) = cls_loss_and_acc(cls, t, &n);
    let pos_idx = &t.pos_idx;
    let loss_bbox = if pos_idx.size()[0] > 0 {
        let p = select_class_deltas(bbox_pred, &t.labels, pos_idx);
        n.divide(
            &(p - t.bbox_targets.index_select(0, pos_idx))
                .abs()
                .sum(Kind::Float),
        )
    } else {
        bbox_pred.sum(Kind::Float) * 0.0
    };
    (loss_cls, loss_bbox, acc)
}

/// Detections of one image: boxes (D,4) in original-image coordinates, scores (D), labels (D).
#[derive(Debug)]
pub struct BoxDetections {
    pub boxes: Tensor,
    pub scores: Tensor,
    pub labels: Tensor,
}

/// mmdet `BBoxHead.get_bboxes` + `multiclass_nms` for one image: its RoIs' boxes (R,4), class
/// logits, deltas; `img_shape` (h, w) for clipping, `scale_factor` (w, h, w, h) for rescaling.
pub fn get_bboxes(
    roi_boxes: &Tensor,
    cls: &Tensor,
    bbox_pred: &Tensor,
    coder: &DeltaXYWHCoder,
    img_shape: (i64, i64),
    scale_factor: [f32; 4],
    cfg: &RcnnTestCfg,
) -> BoxDetections {
    let scores = cls.softmax(-1, Kind::Float);
    let r = roi_boxes.size()[0];
    let boxes = coder.decode(
        roi_boxes,
        bbox_pred,
        Some((img_shape.0 as f64, img_shape.1 as f64)),
    );
    // Written by fill kernels on the device: no upload per image.
    let sf = crate::sync_count::filled(&scale_factor.map(f64::from), Kind::Float, boxes.device());
    let boxes = if r > 0 {
        (boxes.view([r, -1, 4]) / sf).view([r, -1])
    } else {
        boxes
    };
    multiclass_nms(
        &boxes,
        &scores,
        cfg.score_thr,
        cfg.iou_threshold,
        cfg.max_per_img,
    )
}

/// mmdet's `multiclass_nms`: class-specific boxes (R,4K) and scores (R,K+1, background last).
pub fn multiclass_nms(
    boxes: &Tensor,
    scores: &Tensor,
    score_thr: f64,
    iou: f64,
    max_num: i64,
) -> BoxDetections {
    let device = scores.device();
    let r = scores.size()[0];
    let k = scores.size()[1] - 1;
    let b = if boxes.size()[1] > 4 {
        boxes.view([r, -1, 4])
    } else {
        boxes.unsqueeze(1).expand([r, k, 4], false)
    };
    let s = scores.slice(1, 0, k, 1);
    let labels = Tensor::arange(k, (Kind::Int64, device))
        .view([1, -1])
        .expand([r, k], false);
    let b = b.reshape([-1, 4]);
    let s = s.reshape([-1]);
    let labels = labels.reshape([-1]);
    let inds = s.gt(score_thr).nonzero().view([-1]);
    crate::sync_count::host_read("score threshold");
    let (b, s, labels) = (
        b.index_select(0, &inds),
        s.index_select(0, &inds),
        labels.index_select(0, &inds),
    );
    if b.size()[0] == 0 {
        return BoxDetections {
            boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
            scores: Tensor::zeros([0], (Kind::Float, device)),
            labels: Tensor::zeros([0], (Kind::Int64, device)),
        };
    }
    let keep = crate::nms::mmcv_batched_nms(&b, &s, &labels, iou);
    let keep = if max_num > 0 {
        keep.slice(0, 0, max_num.min(keep.size()[0]), 1)
    } else {
        keep
    };
    BoxDetections {
        boxes: b.index_select(0, &keep),
        scores: s.index_select(0, &keep),
        labels: labels.index_select(0, &keep),
    }
}
