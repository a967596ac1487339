//! mmdet's `RPNHead`: shared 3x3 conv + ReLU, 1x1 objectness (sigmoid, A per location) and 1x1
//! deltas (4A); proposal generation (per level top `nms_pre`, decode, drop empty boxes,
//! NMS batched by level, top `max_per_img`) and the training losses (max-IoU assignment of
//! anchors, 256 sampled, sigmoid CE + L1 averaged over the sampled anchors).

use crate::anchors::AnchorGenerator;
use crate::assigner::{MaxIoUAssigner, RandomSampler};
use crate::coder::DeltaXYWHCoder;
use crate::structures::Proposals;
use cnx_backbone::nn::{Conv2d, ConvOpts};
use cnx_backbone::replica;
use serde::{Deserialize, Serialize};
use tch::nn::{Module, Path};
use tch::{Kind, Reduction, Tensor};

/// Proposal settings (mmdet `rpn` test cfg / `rpn_proposal` train cfg).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposalCfg {
    pub nms_pre: i64,
    pub max_per_img: i64,
    pub iou_threshold: f64,
    pub min_bbox_size: f64,
}

impl ProposalCfg {
    pub fn test() -> Self {
        Self {
            nms_pre: 1000,
            max_per_img: 1000,
            iou_threshold: 0.7,
            min_bbox_size: 0.0,
        }
    }
    pub fn train(max_per_img: i64) -> Self {
        Self {
            nms_pre: 2000,
            max_per_img,
            iou_threshold: 0.7,
            min_bbox_size: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct RpnHead {
    conv: Conv2d,
    cls: Conv2d,
    reg: Conv2d,
    pub anchors: AnchorGenerator,
    pub coder: DeltaXYWHCoder,
    pub assigner: MaxIoUAssigner,
    pub sampler: RandomSampler,
    /// Box regression loss: L1 when 0 (mmdet's Mask R-CNN RPN), SmoothL1 with this beta otherwise
    /// (mmdet's Cascade configs: 1/9).
    pub smooth_l1_beta: f64,
    /// mmdet's `train_cfg.rpn.allowed_border`: anchors crossing the image border by more than
    /// this are not assigned (Cascade: 0); negative keeps them all (Mask R-CNN: -1).
    pub allowed_border: f64,
}

/// Per-anchor RPN training targets of a batch, concatenated image after image (anchors in the
/// head's level, y, x, anchor order).
#[derive(Debug)]
pub struct RpnTargets {
    /// 1 for positives, 0 otherwise.
    pub labels: Tensor,
    /// 1 for sampled anchors (positive or negative), 0 for unsampled, invalid or outside ones.
    pub label_weights: Tensor,
    /// Encoded box deltas (positives only; zeros elsewhere).
    pub bbox_targets: Tensor,
    /// 1 on positives' four coordinates.
    pub bbox_weights: Tensor,
    /// Anchors that took part in assignment (valid and inside the allowed border).
    pub inside: Tensor,
    /// Sampled anchors over the batch: the loss's averaging factor.
    pub num_samples: i64,
}

/// Per-level raw outputs: objectness logits (N,A,H,W) and deltas (N,4A,H,W).
pub struct RpnOutputs {
    pub cls: Vec<Tensor>,
    pub reg: Vec<Tensor>,
}

impl RpnHead {
    pub fn new(p: &Path, channels: i64, anchors: AnchorGenerator) -> Self {
        let a = anchors.num_anchors();
        let s = Self {
            conv: Conv2d::new(
                p / "rpn_conv",
                channels,
                channels,
                3,
                ConvOpts {
                    padding: 1,
                    ..Default::default()
                },
            ),
            cls: Conv2d::new(p / "rpn_cls", channels, a, 1, ConvOpts::default()),
            reg: Conv2d::new(p / "rpn_reg", channels, 4 * a, 1, ConvOpts::default()),
            anchors,
            coder: DeltaXYWHCoder::default(),
            assigner: MaxIoUAssigner::rpn(),
            sampler: RandomSampler::rpn(),
            smooth_l1_beta: 0.0,
            allowed_border: -1.0,
        };
        for c in [&s.conv, &s.cls, &s.reg] {
            crate::init::normal(c.weight(), c.bias(), 0.01);
        }
        s
    }

    pub fn forward(&self, feats: &[Tensor]) -> RpnOutputs {
        let mut cls = Vec::new();
        let mut reg = Vec::new();
        for f in feats {
            let x = self.conv.forward(f).relu();
            cls.push(self.cls.forward(&x));
            reg.push(self.reg.forward(&x));
        }
        RpnOutputs { cls, reg }
    }

    fn level_anchors(&self, out: &RpnOutputs) -> Vec<Tensor> {
        let sizes: Vec<(i64, i64)> = out.cls.iter().map(|t| (t.size()[2], t.size()[3])).collect();
        self.anchors.anchors(&sizes, out.cls[0].device())
    }

    /// Proposals of each image, best first; `img_shapes` are the unpadded (h, w).
    pub fn proposals(
        &self,
        out: &RpnOutputs,
        img_shapes: &[(i64, i64)],
        cfg: &ProposalCfg,
    ) -> Vec<Proposals> {
        let anchors = self.level_anchors(out);
        let n = out.cls[0].size()[0];
        (0..n)
            .map(|i| {
                tch::no_grad(|| {
                    let mut scores = Vec::new();
                    let mut deltas = Vec::new();
                    let mut anc = Vec::new();
                    let mut ids = Vec::new();
                    for (l, (c, r)) in out.cls.iter().zip(&out.reg).enumerate() {
                        let s = c
                            .get(i)
                            .to_kind(Kind::Float)
                            .permute([1, 2, 0])
                            .reshape([-1])
                            .sigmoid();
                        let d = r
                            .get(i)
                            .to_kind(Kind::Float)
                            .permute([1, 2, 0])
                            .reshape([-1, 4]);
                        let (s, d, a) = if cfg.nms_pre > 0 && cfg.nms_pre < s.size()[0] {
                            let (ranked, rank) = s.sort_stable(true, 0, true);
                            let top = rank.slice(0, 0, cfg.nms_pre, 1);
                            (
                                ranked.slice(0, 0, cfg.nms_pre, 1),
                                d.index_select(0, &top),
                                anchors[l].index_select(0, &top),
                            )
                        } else {
                            (s, d, anchors[l].shallow_clone())
                        };
                        ids.push(Tensor::full(
                            [s.size()[0]],
                            l as i64,
                            (Kind::Int64, s.device()),
                        ));
                        scores.push(s);
                        deltas.push(d);
                        anc.push(a);
                    }
                    let scores = Tensor::cat(&scores, 0);
                    let anc = Tensor::cat(&anc, 0);
                    let deltas = Tensor::cat(&deltas, 0);
                    let ids = Tensor::cat(&ids, 0);
                    let (h, w) = img_shapes[i as usize];
                    let mut props = self.coder.decode(&anc, &deltas, Some((h as f64, w as f64)));
                    let mut scores = scores;
                    let mut ids = ids;
                    if cfg.min_bbox_size >= 0.0 {
                        let bw = props.select(1, 2) - props.select(1, 0);
                        let bh = props.select(1, 3) - props.select(1, 1);
                        let valid = bw
                            .gt(cfg.min_bbox_size)
                            .logical_and(&bh.gt(cfg.min_bbox_size));
                        // One read (the size of `nonzero`), not two: selecting every box when
                        // all are valid is the identity.
                        crate::sync_count::host_read("rpn valid boxes");
                        let k = valid.nonzero().view([-1]);
                        if k.size()[0] < props.size()[0] {
                            props = props.index_select(0, &k);
                            scores = scores.index_select(0, &k);
                            ids = ids.index_select(0, &k);
                        }
                    }
                    if props.size()[0] == 0 {
                        return Proposals::empty(props.device());
                    }
                    let keep =
                        crate::nms::mmcv_batched_nms(&props, &scores, &ids, cfg.iou_threshold);
                    let keep = keep.slice(0, 0, cfg.max_per_img.min(keep.size()[0]), 1);
                    Proposals::new(props.index_select(0, &keep), scores.index_select(0, &keep))
                })
            })
            .collect()
    }

    /// Training targets (mmdet `AnchorHead.get_targets`): valid flags from each image's padded
    /// shape, the allowed-border rule on its unpadded shape, max-IoU assignment and sampling.
    /// `img_shapes` / `pad_shapes` are each image's (h, w) before and after its own padding.
    pub fn targets(
        &self,
        out: &RpnOutputs,
        img_shapes: &[(i64, i64)],
        pad_shapes: &[(i64, i64)],
        gt_boxes: &[Tensor],
    ) -> RpnTargets {
        let anchors = self.level_anchors(out);
        let device = out.cls[0].device();
        let all_anchors = Tensor::cat(&anchors, 0);
        let n = out.cls[0].size()[0] as usize;
        let mut labels_all = Vec::new();
        let mut lw_all = Vec::new();
        let mut tgt_all = Vec::new();
        let mut bw_all = Vec::new();
        let mut inside_all = Vec::new();
        let mut num_samples = 0i64;
        // One call site for the whole batch's sampling; image i draws from its own stream.
        let site = cnx_backbone::replica::next_site();
        for i in 0..n {
            let (labels, lw, tgt, bw, inside, sampled) = tch::no_grad(|| {
                let valid: Vec<Tensor> = out
                    .cls
                    .iter()
                    .enumerate()
                    .map(|(l, c)| {
                        self.anchors.valid_flags(
                            l,
                            (c.size()[2], c.size()[3]),
                            pad_shapes[i],
                            device,
                        )
                    })
                    .collect();
                let valid = Tensor::cat(&valid, 0);
                let inside = crate::anchors::inside_flags(
                    &all_anchors,
                    &valid,
                    img_shapes[i],
                    self.allowed_border,
                );
                // Anchors outside are ignored by the assignment rather than selected away:
                // the same samples (candidates keep their relative order) with indices into
                // all anchors, and no host read of the inside count.
                let anc = &all_anchors;
                let gt = &gt_boxes[i];
                let gl = Tensor::zeros([gt.size()[0]], (Kind::Int64, device));
                let assign = self.assigner.assign_within(anc, gt, &gl, Some(&inside));
                let mut stream = site.as_ref().map(|s| s.stream(i));
                let s = self
                    .sampler
                    .sample_keyed(&assign, anc, gt, &gl, stream.as_mut());
                let na = anc.size()[0];
                let mut labels = Tensor::zeros([na], (Kind::Float, device));
                let mut lw = Tensor::zeros([na], (Kind::Float, device));
                let mut tgt = Tensor::zeros([na, 4], (Kind::Float, device));
                let mut bw = Tensor::zeros([na, 4], (Kind::Float, device));
                if s.num_pos() > 0 {
                    let pb = s.pos_boxes();
                    let pg = gt.index_select(0, &s.pos_gt_inds);
                    let t = self.coder.encode(&pb, &pg);
                    let _ = tgt.index_copy_(0, &s.pos_inds, &t);
                    let _ = bw.index_fill_(0, &s.pos_inds, 1.0);
                    let _ = labels.index_fill_(0, &s.pos_inds, 1.0);
                    let _ = lw.index_fill_(0, &s.pos_inds, 1.0);
                }
                if s.num_neg() > 0 {
                    let _ = lw.index_fill_(0, &s.neg_inds, 1.0);
                }
                (
                    labels,
                    lw,
                    tgt,
                    bw,
                    inside,
                    // Anchors with weight 1: the sampled positives and negatives (disjoint
                    // sets of distinct indices), known from their sizes without a read.
                    s.num_pos() + s.num_neg(),
                )
            });
            num_samples += sampled;
            labels_all.push(labels);
            lw_all.push(lw);
            tgt_all.push(tgt);
            bw_all.push(bw);
            inside_all.push(inside);
        }
        RpnTargets {
            labels: Tensor::cat(&labels_all, 0),
            label_weights: Tensor::cat(&lw_all, 0),
            bbox_targets: Tensor::cat(&tgt_all, 0),
            bbox_weights: Tensor::cat(&bw_all, 0),
            inside: Tensor::cat(&inside_all, 0),
            num_samples,
        }
    }

    /// RPN losses `(loss_rpn_cls, loss_rpn_bbox)` for GT boxes per image (crowd excluded); the
    /// shapes are as in [`RpnHead::targets`].
    pub fn loss(
        &self,
        out: &RpnOutputs,
        img_shapes: &[(i64, i64)],
        pad_shapes: &[(i64, i64)],
        gt_boxes: &[Tensor],
    ) -> (Tensor, Tensor) {
        let t = self.targets(out, img_shapes, pad_shapes, gt_boxes);
        let n = out.cls[0].size()[0];
        // mmdet's avg_factor: sampled anchors over the batch (at least 1); under data
        // parallelism the count over all ranks (see `replica::batch_mean`).
        let num_samples = t.num_samples as f64;
        // Predictions in the anchors' order: per image, per level (H, W, A).
        let cls_pred: Vec<Tensor> = (0..n)
            .map(|i| {
                Tensor::cat(
                    &out.cls
                        .iter()
                        .map(|c| c.get(i).permute([1, 2, 0]).reshape([-1]))
                        .collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        let reg_pred: Vec<Tensor> = (0..n)
            .map(|i| {
                Tensor::cat(
                    &out.reg
                        .iter()
                        .map(|r| r.get(i).permute([1, 2, 0]).reshape([-1, 4]))
                        .collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        let cls_pred = Tensor::cat(&cls_pred, 0);
        let reg_pred = Tensor::cat(&reg_pred, 0);
        let (labels, lw, tgt, bw) = (t.labels, t.label_weights, t.bbox_targets, t.bbox_weights);
        let cls_sum = cls_pred.binary_cross_entropy_with_logits::<Tensor>(
            &labels,
            Some(lw),
            None,
            Reduction::Sum,
        );
        let bbox_sum = (smooth_l1(&(reg_pred - tgt), self.smooth_l1_beta) * bw).sum(Kind::Float);
        // Both losses share one normalizer (one reduction under data parallelism).
        let avg = replica::MeanDivisor::new(num_samples, 1.0, cls_sum.device());
        (avg.divide(&cls_sum), avg.divide(&bbox_sum))
    }
}

/// mmdet's `smooth_l1_loss` element-wise (`beta` 0: plain L1).
pub fn smooth_l1(diff: &Tensor, beta: f64) -> Tensor {
    let d = diff.abs();
    if beta <= 0.0 {
        return d;
    }
    // torch.where(d < beta, 0.5 * d^2 / beta, d - 0.5 * beta)
    (d.square() * (0.5 / beta)).where_self(&d.lt(beta), &(&d - 0.5 * beta))
}

#[cfg(test)]
mod loss_tests {
    use super::*;

    #[test]
    fn smooth_l1_is_mmdets() {
        let d = Tensor::from_slice(&[-0.5f32, -0.05, 0.0, 0.1, 2.0]);
        let b = 1.0 / 9.0;
        let got = crate::boxes::to_vec_f32(&smooth_l1(&d, b));
        // 0.5 * x^2 / beta below beta, |x| - beta / 2 above (mmdet/models/losses/smooth_l1_loss.py).
        let want = [
            0.5 - b / 2.0,
            0.5 * 0.0025 / b,
            0.0,
            0.5 * 0.01 / b,
            2.0 - b / 2.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(crate::boxes::to_vec_f32(&smooth_l1(&d, 0.0))[0], 0.5);
    }
}
