//! mmdet's `MaxIoUAssigner` (gt_max_assign_all, low-quality matches) and `RandomSampler`
//! (fixed number of samples with a positive fraction, optionally adding the GT boxes as
//! proposals). Shared by the RPN and every RoI stage (Cascade uses one per stage).

use cnx_backbone::replica::KeyedStream;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxIoUAssigner {
    pub pos_iou_thr: f64,
    pub neg_iou_thr: f64,
    pub min_pos_iou: f64,
    pub match_low_quality: bool,
}

/// Result of an assignment: `gt_inds` per box (0 negative, -1 ignored, k>0 matched gt k-1),
/// `labels` (-1 unless positive), `max_overlaps`.
#[derive(Debug)]
pub struct AssignResult {
    pub gt_inds: Tensor,
    pub max_overlaps: Tensor,
    pub labels: Tensor,
}

impl MaxIoUAssigner {
    pub fn rpn() -> Self {
        Self {
            pos_iou_thr: 0.7,
            neg_iou_thr: 0.3,
            min_pos_iou: 0.3,
            match_low_quality: true,
        }
    }
    pub fn rcnn(thr: f64) -> Self {
        Self {
            pos_iou_thr: thr,
            neg_iou_thr: thr,
            min_pos_iou: thr,
            match_low_quality: true,
        }
    }

    /// Assign `boxes` (N,4) to `gt` (G,4) with labels `gt_labels` (G).
    pub fn assign(&self, boxes: &Tensor, gt: &Tensor, gt_labels: &Tensor) -> AssignResult {
        self.assign_within(boxes, gt, gt_labels, None)
    }

    /// [`MaxIoUAssigner::assign`] of the boxes where `allowed` (N bool) is true, the others
    /// ignored (`gt_inds` -1, overlap -1): the same assignment as of the allowed subset alone,
    /// scattered back, without selecting the subset (a host read of its size).
    pub fn assign_within(
        &self,
        boxes: &Tensor,
        gt: &Tensor,
        gt_labels: &Tensor,
        allowed: Option<&Tensor>,
    ) -> AssignResult {
        let device = boxes.device();
        let n = boxes.size()[0];
        let g = gt.size()[0];
        if g == 0 || n == 0 {
            let inds = Tensor::full([n], if g == 0 { 0 } else { -1 }, (Kind::Int64, device));
            return AssignResult {
                gt_inds: match allowed {
                    Some(a) => inds.where_self(a, &Tensor::full_like(&inds, -1)),
                    None => inds,
                },
                max_overlaps: Tensor::zeros([n], (Kind::Float, device)),
                labels: Tensor::full([n], -1, (Kind::Int64, device)),
            };
        }
        let mut overlaps = crate::boxes::bbox_overlaps(gt, boxes); // (G, N)
        if let Some(a) = allowed {
            // -1 is below every threshold (never negative, never positive) and below every
            // real overlap, so a gt's best overlap is over the allowed boxes only.
            overlaps = overlaps.where_self(&a.unsqueeze(0), &Tensor::full_like(&overlaps, -1.0));
        }
        let (max_ov, argmax) = overlaps.max_dim(0, false);
        let (gt_max, _) = overlaps.max_dim(1, false);
        let mut inds = Tensor::full([n], -1, (Kind::Int64, device));
        let neg = max_ov.ge(0.0).logical_and(&max_ov.lt(self.neg_iou_thr));
        inds = inds.where_self(&neg.logical_not(), &Tensor::zeros_like(&inds));
        let pos = max_ov.ge(self.pos_iou_thr);
        inds = inds.where_self(&pos.logical_not(), &(&argmax + 1));
        if self.match_low_quality {
            // mmdet loops over the gts, a later gt overriding an earlier one: each box takes
            // the last gt (highest index) whose best overlap it attains, among gts whose best
            // overlap reaches `min_pos_iou` (compared in f64, as the host loop did). Computed
            // for all gts at once on the device.
            let eligible = gt_max
                .to_kind(Kind::Double)
                .ge(self.min_pos_iou)
                .unsqueeze(1);
            let hit = overlaps
                .eq_tensor(&gt_max.unsqueeze(1))
                .logical_and(&eligible);
            let rank = Tensor::arange_start(1, g + 1, (Kind::Int64, device)).unsqueeze(1);
            let last = (hit.to_kind(Kind::Int64) * rank).amax([0], false);
            inds = inds.where_self(&last.eq(0), &last);
        }
        let posm = inds.gt(0);
        let gl = gt_labels
            .to_kind(Kind::Int64)
            .index_select(0, &(&inds - 1).clamp_min(0));
        let labels = gl.where_self(&posm, &Tensor::full_like(&gl, -1));
        AssignResult {
            gt_inds: inds,
            max_overlaps: max_ov,
            labels,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSampler {
    pub num: i64,
    pub pos_fraction: f64,
    pub add_gt_as_proposals: bool,
}

/// Sampled indices into the (possibly GT-augmented) box list.
#[derive(Debug)]
pub struct SamplingResult {
    /// Boxes the indices refer to (GT prepended when `add_gt_as_proposals`).
    pub boxes: Tensor,
    pub pos_inds: Tensor,
    pub neg_inds: Tensor,
    /// Matched gt index (0-based) of each positive.
    pub pos_gt_inds: Tensor,
    pub pos_labels: Tensor,
}

impl SamplingResult {
    pub fn pos_boxes(&self) -> Tensor {
        self.boxes.index_select(0, &self.pos_inds)
    }
    pub fn neg_boxes(&self) -> Tensor {
        self.boxes.index_select(0, &self.neg_inds)
    }
    pub fn num_pos(&self) -> i64 {
        self.pos_inds.size()[0]
    }
    pub fn num_neg(&self) -> i64 {
        self.neg_inds.size()[0]
    }
}

/// `k` random entries of `inds` (all of them, in order, when there are at most `k`), as mmdet's
/// `random_choice`: `randperm(n)[:k]` from the global generator, or without a full permutation
/// from the image's keyed stream when one is given (data-parallel training with batch keys).
fn random_choice(inds: &Tensor, k: i64, stream: Option<&mut KeyedStream>) -> Tensor {
    let n = inds.size()[0];
    if n <= k {
        return inds.shallow_clone();
    }
    let perm = match stream {
        // Drawn on the host (the keyed stream is host-side); copied without blocking.
        Some(s) => crate::sync_count::upload_i64(
            &s.choose(n as usize, k as usize),
            inds.device(),
            "keyed choice",
        ),
        None => Tensor::randperm(n, (Kind::Int64, inds.device())).slice(0, 0, k, 1),
    };
    inds.index_select(0, &perm)
}

impl RandomSampler {
    pub fn rpn() -> Self {
        Self {
            num: 256,
            pos_fraction: 0.5,
            add_gt_as_proposals: false,
        }
    }
    pub fn rcnn() -> Self {
        Self {
            num: 512,
            pos_fraction: 0.25,
            add_gt_as_proposals: true,
        }
    }

    /// Sample from an assignment of `boxes`; with `add_gt_as_proposals` the GT boxes are
    /// prepended and assigned to themselves first. Draws from libtorch's global generator.
    pub fn sample(
        &self,
        assign: &AssignResult,
        boxes: &Tensor,
        gt: &Tensor,
        gt_labels: &Tensor,
    ) -> SamplingResult {
        self.sample_keyed(assign, boxes, gt, gt_labels, None)
    }

    /// [`RandomSampler::sample`] drawing from `stream` when given: the image's stream at the
    /// caller's call site (see [`cnx_backbone::replica::Site::stream`]); positives are drawn
    /// first, then negatives, from the same stream.
    pub fn sample_keyed(
        &self,
        assign: &AssignResult,
        boxes: &Tensor,
        gt: &Tensor,
        gt_labels: &Tensor,
        mut stream: Option<&mut KeyedStream>,
    ) -> SamplingResult {
        let device = boxes.device();
        let (boxes, gt_inds) = if self.add_gt_as_proposals && gt.size()[0] > 0 {
            let g = gt.size()[0];
            let self_inds = Tensor::arange_start(1, g + 1, (Kind::Int64, device));
            (
                Tensor::cat(&[gt.to_kind(boxes.kind()), boxes.shallow_clone()], 0),
                Tensor::cat(&[self_inds, assign.gt_inds.shallow_clone()], 0),
            )
        } else {
            (boxes.shallow_clone(), assign.gt_inds.shallow_clone())
        };
        let num_pos_exp = (self.num as f64 * self.pos_fraction) as i64;
        // Positive and negative candidates in ascending index order (as `nonzero` lists them):
        // one host read for both counts, then `nonzero_static`, which needs no read of its own.
        let (posm, negm) = (gt_inds.gt(0), gt_inds.eq(0));
        crate::sync_count::host_read("sampler counts");
        let counts = crate::boxes::to_vec_i64(&Tensor::stack(
            &[posm.sum(Kind::Int64), negm.sum(Kind::Int64)],
            0,
        ));
        let pos = posm.nonzero_static(counts[0], -1).view([-1]);
        let pos = random_choice(&pos, num_pos_exp, stream.as_deref_mut());
        let num_neg_exp = self.num - pos.size()[0];
        let neg = negm.nonzero_static(counts[1], -1).view([-1]);
        let neg = random_choice(&neg, num_neg_exp, stream);
        let pos_gt_inds = gt_inds.index_select(0, &pos) - 1;
        let pos_labels = gt_labels.to_kind(Kind::Int64).index_select(0, &pos_gt_inds);
        SamplingResult {
            boxes,
            pos_inds: pos,
            neg_inds: neg,
            pos_gt_inds,
            pos_labels,
        }
    }
}
