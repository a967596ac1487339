//! mmdet v2 `AnchorGenerator` (center offset 0): base anchors per level from stride, scales and
//! ratios, shifted over the feature grid; order (y, x, anchor) so they line up with the RPN
//! head's `permute(1, 2, 0).reshape(-1)` outputs. Also the per-level valid flags (anchors whose
//! cell lies in the padded area are invalid during training).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorGenerator {
    pub strides: Vec<i64>,
    pub scales: Vec<f64>,
    pub ratios: Vec<f64>,
}

impl Default for AnchorGenerator {
    fn default() -> Self {
        Self {
            strides: vec![4, 8, 16, 32, 64],
            scales: vec![8.0],
            ratios: vec![0.5, 1.0, 2.0],
        }
    }
}

impl AnchorGenerator {
    pub fn num_anchors(&self) -> i64 {
        (self.scales.len() * self.ratios.len()) as i64
    }

    /// Base anchors (A,4) of one level, computed in f32 as mmdet does (scale-major order).
    pub fn base_anchors(&self, level: usize) -> Tensor {
        let base = self.strides[level] as f64;
        let ratios = Tensor::from_slice(&self.ratios.iter().map(|&r| r as f32).collect::<Vec<_>>());
        let scales = Tensor::from_slice(&self.scales.iter().map(|&s| s as f32).collect::<Vec<_>>());
        let h_ratios = ratios.sqrt();
        let w_ratios = h_ratios.reciprocal();
        let ws = (base * w_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
        let hs = (base * h_ratios.unsqueeze(1) * scales.unsqueeze(0)).view([-1]);
        // centers are 0 (offset 0), so corners are just ±0.5*(w, h)
        Tensor::stack(&[&ws * -0.5, &hs * -0.5, &ws * 0.5, &hs * 0.5], 1)
    }

    /// All anchors of one level for an `(h, w)` feature grid: (h*w*A, 4).
    pub fn grid_anchors(&self, level: usize, feat: (i64, i64), device: Device) -> Tensor {
        let stride = self.strides[level];
        // Built on the host once per device and configuration, not per call.
        let key: Vec<f64> = [stride as f64, self.scales.len() as f64]
            .into_iter()
            .chain(self.scales.iter().copied())
            .chain(self.ratios.iter().copied())
            .collect();
        let base = crate::sync_count::cached("base anchors", &key, Kind::Float, device, || {
            self.base_anchors(level)
        });
        let opts = (Kind::Float, device);
        let sx = Tensor::arange(feat.1, opts) * stride as f64;
        let sy = Tensor::arange(feat.0, opts) * stride as f64;
        let xx = sx
            .unsqueeze(0)
            .expand([feat.0, feat.1], false)
            .reshape([-1]);
        let yy = sy
            .unsqueeze(1)
            .expand([feat.0, feat.1], false)
            .reshape([-1]);
        let shifts = Tensor::stack(&[&xx, &yy, &xx, &yy], 1);
        (base.unsqueeze(0) + shifts.unsqueeze(1)).view([-1, 4])
    }

    /// Anchors of every level for the given feature sizes.
    pub fn anchors(&self, feats: &[(i64, i64)], device: Device) -> Vec<Tensor> {
        feats
            .iter()
            .enumerate()
            .map(|(l, &f)| self.grid_anchors(l, f, device))
            .collect()
    }

    /// Valid flags (h*w*A) of one level: a cell is valid when it lies within
    /// `ceil(pad / stride)` of the image's own padded shape (mmdet 2.28's `valid_flags` on
    /// `pad_shape`): cells that exist only because a larger image widened the batch are invalid.
    pub fn valid_flags(
        &self,
        level: usize,
        feat: (i64, i64),
        pad_hw: (i64, i64),
        device: Device,
    ) -> Tensor {
        let s = self.strides[level];
        let vh = ((pad_hw.0 + s - 1) / s).min(feat.0);
        let vw = ((pad_hw.1 + s - 1) / s).min(feat.1);
        let fx = Tensor::arange(feat.1, (Kind::Int64, device)).lt(vw);
        let fy = Tensor::arange(feat.0, (Kind::Int64, device)).lt(vh);
        let v = fy.unsqueeze(1).logical_and(&fx.unsqueeze(0)).reshape([-1]);
        v.unsqueeze(1)
            .expand([feat.0 * feat.1, self.num_anchors()], false)
            .reshape([-1])
    }
}

/// mmdet's `anchor_inside_flags`: with `allowed_border >= 0` an anchor is kept for target
/// assignment only when it lies inside the (unpadded) image `img_hw` widened by the border;
/// a negative border keeps every valid anchor (Mask R-CNN's `allowed_border = -1`; Cascade's
/// config uses 0).
pub fn inside_flags(
    anchors: &Tensor,
    valid: &Tensor,
    img_hw: (i64, i64),
    allowed_border: f64,
) -> Tensor {
    if allowed_border < 0.0 {
        return valid.shallow_clone();
    }
    let (h, w) = (img_hw.0 as f64, img_hw.1 as f64);
    let b = allowed_border;
    valid
        .logical_and(&anchors.select(1, 0).ge(-b))
        .logical_and(&anchors.select(1, 1).ge(-b))
        .logical_and(&anchors.select(1, 2).lt(w + b))
        .logical_and(&anchors.select(1, 3).lt(h + b))
}
