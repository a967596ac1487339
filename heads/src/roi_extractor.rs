//! mmdet's `SingleRoIExtractor`: each RoI is pooled from one FPN level chosen by its size
//! (`level = floor(log2(sqrt(w*h) / finest_scale + 1e-6))`, clamped to the levels given).

use crate::roi_align::roi_align_levels;
use crate::structures::Rois;
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct RoiExtractor {
    pub output_size: i64,
    pub strides: Vec<i64>,
    pub finest_scale: f64,
    pub sampling_ratio: i64,
}

impl RoiExtractor {
    pub fn new(output_size: i64, strides: Vec<i64>) -> Self {
        Self {
            output_size,
            strides,
            finest_scale: 56.0,
            sampling_ratio: 0,
        }
    }

    /// Target level of each RoI row (R,5: image index, x1, y1, x2, y2).
    pub fn map_levels(&self, rois: &Tensor) -> Tensor {
        let scale = ((rois.select(1, 3) - rois.select(1, 1))
            * (rois.select(1, 4) - rois.select(1, 2)))
        .sqrt();
        let lv = (scale / self.finest_scale + 1e-6).log2().floor();
        lv.clamp(0.0, (self.strides.len() - 1) as f64)
            .to_kind(Kind::Int64)
    }

    /// Pooled features (R, C, S, S) of `rois` from `feats` (the first `strides.len()` levels):
    /// all levels in one [`roi_align_levels`] call, so the level split costs no host read of
    /// its own.
    pub fn forward(&self, feats: &[Tensor], rois: &Rois) -> Tensor {
        let rois = &rois.rows;
        let r = rois.size()[0];
        let c = feats[0].size()[1];
        let s = self.output_size;
        let device = rois.device();
        if r == 0 {
            return Tensor::zeros([0, c, s, s], (feats[0].kind(), device));
        }
        let nl = self.strides.len();
        // RoIs mapped to no level (NaN scale from degenerate boxes) keep zero features, as in
        // mmdet, where `roi_feats` starts as zeros and each level fills its own rows; they get
        // level `nl` explicitly (a NaN cast to an integer is platform-dependent).
        let scale = ((rois.select(1, 3) - rois.select(1, 1))
            * (rois.select(1, 4) - rois.select(1, 2)))
        .sqrt();
        let lv = (scale / self.finest_scale + 1e-6).log2().floor();
        let levels = lv
            .clamp(0.0, (nl - 1) as f64)
            .to_kind(Kind::Int64)
            .where_self(
                &lv.isnan().logical_not(),
                &Tensor::full([r], nl as i64, (Kind::Int64, device)),
            );
        let fs: Vec<&Tensor> = feats[..nl].iter().collect();
        let scales: Vec<f64> = self.strides.iter().map(|&st| 1.0 / st as f64).collect();
        roi_align_levels(
            &fs,
            &scales,
            rois,
            &levels,
            (s, s),
            self.sampling_ratio,
            true,
        )
    }
}
