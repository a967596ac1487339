//! mmdet's `DeltaXYWHBBoxCoder`: boxes ↔ normalized (dx, dy, dw, dh) regression targets, with
//! per-stage means/stds (RPN: 0/1; Mask R-CNN: 0.1,0.1,0.2,0.2; Cascade stages finer).
//! The formulas and their evaluation order follow mmdet 2.x `bbox2delta` / `delta2bbox` so
//! float results agree to the last bit where possible.
//!
//! Both directions compute in fp32 when handed fp16/bf16 tensors (autocast outputs), as mmdet's
//! `force_fp32` bbox heads do: box coordinates of a 1333-px image do not survive fp16's 11-bit
//! mantissa, and `exp` of the size deltas is on autocast's fp32 list anyway.

use cnx_backbone::autocast::upcast;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `|log(16 / 1000)|`: decoded log-scale deltas are clamped to this (mmdet's `wh_ratio_clip`).
pub const MAX_RATIO: f64 = 4.135166556742356;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaXYWHCoder {
    pub means: [f64; 4],
    pub stds: [f64; 4],
}

impl Default for DeltaXYWHCoder {
    fn default() -> Self {
        Self {
            means: [0.0; 4],
            stds: [1.0; 4],
        }
    }
}

/// Means or stds as a (1,4) row on `like`'s device and dtype (f32 values, as mmdet builds
/// them), uploaded once per device instead of per call.
fn row(v: &[f64; 4], like: &Tensor) -> Tensor {
    crate::sync_count::constant(v, like.kind(), like.device()).view([1, 4])
}

impl DeltaXYWHCoder {
    pub fn new(means: [f64; 4], stds: [f64; 4]) -> Self {
        Self { means, stds }
    }

    /// Regression targets (N,4) taking `proposals` (N,4) to `gt` (N,4).
    pub fn encode(&self, proposals: &Tensor, gt: &Tensor) -> Tensor {
        let proposals = &upcast(proposals);
        let gt = &upcast(gt);
        let px = (proposals.select(1, 0) + proposals.select(1, 2)) * 0.5;
        let py = (proposals.select(1, 1) + proposals.select(1, 3)) * 0.5;
        let pw = proposals.select(1, 2) - proposals.select(1, 0);
        let ph = proposals.select(1, 3) - proposals.select(1, 1);
        let gx = (gt.select(1, 0) + gt.select(1, 2)) * 0.5;
        let gy = (gt.select(1, 1) + gt.select(1, 3)) * 0.5;
        let gw = gt.select(1, 2) - gt.select(1, 0);
        let gh = gt.select(1, 3) - gt.select(1, 1);
        let dx = (gx - &px) / &pw;
        let dy = (gy - &py) / &ph;
        let dw = (gw / pw).log();
        let dh = (gh / ph).log();
        let d = Tensor::stack(&[dx, dy, dw, dh], 1);
        (d - row(&self.means, proposals)) / row(&self.stds, proposals)
    }

    /// Apply `deltas` (N, 4k: one box per class when k > 1) to `rois` (N,4); clip to
    /// `max_shape = (h, w)` when given. Returns N,4k.
    pub fn decode(&self, rois: &Tensor, deltas: &Tensor, max_shape: Option<(f64, f64)>) -> Tensor {
        let n = deltas.size()[0];
        if n == 0 {
            return deltas.shallow_clone();
        }
        let k = deltas.size()[1] / 4;
        let d = upcast(deltas).reshape([-1, 4]);
        let rois = &upcast(rois);
        let denorm = &d * row(&self.stds, &d) + row(&self.means, &d);
        let dxy = denorm.slice(1, 0, 2, 1);
        let dwh = denorm.slice(1, 2, 4, 1);
        let r = rois.repeat([1, k]).reshape([-1, 4]);
        let pxy = (r.slice(1, 0, 2, 1) + r.slice(1, 2, 4, 1)) * 0.5;
        let pwh = r.slice(1, 2, 4, 1) - r.slice(1, 0, 2, 1);
        let dxy_wh = &pwh * dxy;
        let dwh = dwh.clamp(-MAX_RATIO, MAX_RATIO);
        let gxy = pxy + dxy_wh;
        let gwh = pwh * dwh.exp();
        let x1y1 = &gxy - &gwh * 0.5;
        let x2y2 = &gxy + &gwh * 0.5;
        let mut b = Tensor::cat(&[x1y1, x2y2], 1);
        if let Some((h, w)) = max_shape {
            b = crate::boxes::clip_boxes(&b, h, w);
        }
        b.reshape([n, -1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Half-precision deltas (autocast output) decode in fp32: the same boxes as fp32 deltas of
    /// the same values, to the bit, and an fp32 result.
    #[test]
    fn half_inputs_decode_and_encode_in_fp32() {
        let c = DeltaXYWHCoder::new([0.0; 4], [0.1, 0.1, 0.2, 0.2]);
        let rois =
            Tensor::from_slice(&[10.5f32, 20.25, 610.75, 433.5, 1000.0, 700.0, 1300.0, 790.0])
                .view([2, 4]);
        let d16 = Tensor::from_slice(&[0.3f32, -0.2, 0.5, -0.7, 0.01, 0.02, -0.03, 0.04])
            .view([2, 4])
            .to_kind(Kind::Half);
        let d32 = d16.to_kind(Kind::Float);
        let a = c.decode(&rois.to_kind(Kind::Half), &d16, Some((800.0, 1333.0)));
        let b = c.decode(&rois, &d32, Some((800.0, 1333.0)));
        assert_eq!(a.kind(), Kind::Float);
        // fp16 rois lose their fractions above 1024; compare with fp16-rounded fp32 rois.
        let b16 = c.decode(
            &rois.to_kind(Kind::Half).to_kind(Kind::Float),
            &d32,
            Some((800.0, 1333.0)),
        );
        assert_eq!((&a - &b16).abs().max().double_value(&[]), 0.0);
        assert!((&a - &b).abs().max().double_value(&[]) < 0.5);
        let t = c.encode(&rois.to_kind(Kind::Half), &b.to_kind(Kind::Half));
        assert_eq!(t.kind(), Kind::Float);
    }
}
