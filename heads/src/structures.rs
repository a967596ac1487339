//! The small typed structures a detector consumes, passes between its stages and produces
//! (detectron2's `structures`, mmdet's `img_metas` / `proposal_list` / `rois`): image metas,
//! ground-truth instances, RPN proposals, the RoIs of a batch, named losses and detections.

use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

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

/// `(h, w)` padded up to a multiple of `divisor` (the data pipeline's `Pad(size_divisor)`).
pub fn pad_shape(hw: (i64, i64), divisor: i64) -> (i64, i64) {
    let up = |x: i64| (x + divisor - 1) / divisor * divisor;
    (up(hw.0), up(hw.1))
}

impl ImgMeta {
    /// `scale_factor` as mmdet's 4-vector (w, h, w, h).
    pub(crate) fn sf4(&self) -> [f32; 4] {
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
    /// The instances' masks for mask targets (canvas = the padded image); `None` trains no
    /// mask branch signal (all-zero targets).
    pub masks: Option<Arc<dyn InstanceMasks>>,
}

/// Ground-truth instance masks as the mask head's targets need them: mmdet's
/// `BitmapMasks.crop_and_resize` (each positive's GT mask cropped to its proposal box and
/// resized to `out` x `out`, binarised). The data side implements it for its own mask storage,
/// so the heads do not depend on a dataset crate.
pub trait InstanceMasks: Send + Sync + std::fmt::Debug {
    /// `out*out` bytes (0/1) per `(box, gt index)` pair, row-major, concatenated.
    fn crop_and_resize(&self, boxes: &[[f32; 4]], gt_inds: &[usize], out: usize) -> Vec<u8>;
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

/// RPN proposals of one image (an entry of mmdet's `proposal_list`), in the resized image's
/// coordinates, best first.
#[derive(Debug)]
pub struct Proposals {
    /// (K,4) x1, y1, x2, y2.
    pub boxes: Tensor,
    /// (K) objectness.
    pub scores: Tensor,
}

impl Proposals {
    pub fn new(boxes: Tensor, scores: Tensor) -> Self {
        Self { boxes, scores }
    }

    /// No proposals (an image whose every candidate box was too small).
    pub fn empty(device: Device) -> Self {
        Self {
            boxes: Tensor::zeros([0, 4], (Kind::Float, device)),
            scores: Tensor::zeros([0], (Kind::Float, device)),
        }
    }

    pub fn len(&self) -> i64 {
        self.boxes.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The (K,5) rows mmdet writes (x1, y1, x2, y2, score): what reference fixtures hold.
    pub fn to_rows(&self) -> Tensor {
        Tensor::cat(&[&self.boxes, &self.scores.unsqueeze(1)], 1)
    }
}

/// The RoIs of a batch as RoIAlign takes them: rows (image index, x1, y1, x2, y2) (mmdet's
/// `bbox2roi`), with each image's count kept so per-RoI outputs split back into images without
/// reading the index column.
#[derive(Debug)]
pub struct Rois {
    /// (R,5) rows, image by image.
    pub rows: Tensor,
    /// RoIs of each image, in order (sums to R).
    pub counts: Vec<i64>,
}

impl Rois {
    /// mmdet's `bbox2roi`: each image's (K,4) boxes (extra columns ignored) under its index.
    pub fn from_boxes(per_image: &[&Tensor]) -> Self {
        let counts: Vec<i64> = per_image.iter().map(|b| b.size()[0]).collect();
        let parts: Vec<Tensor> = per_image
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let b = b.slice(1, 0, 4, 1);
                let idx = Tensor::full([b.size()[0], 1], i as f64, (b.kind(), b.device()));
                Tensor::cat(&[idx, b], 1)
            })
            .collect();
        Self {
            rows: Tensor::cat(&parts, 0),
            counts,
        }
    }

    /// The RoIs of a batch's proposals.
    pub fn from_proposals(proposals: &[Proposals]) -> Self {
        Self::from_boxes(&proposals.iter().map(|p| &p.boxes).collect::<Vec<_>>())
    }

    /// RoIs of one image at the image index 0 (`forward_dummy`'s random boxes).
    pub fn single(boxes: &Tensor) -> Self {
        Self::from_boxes(&[boxes])
    }

    /// New boxes (R,4) for the same RoIs (a cascade stage's refinement).
    pub fn with_boxes(&self, boxes: &Tensor) -> Self {
        Self {
            rows: Tensor::cat(&[&self.rows.slice(1, 0, 1, 1), boxes], 1),
            counts: self.counts.clone(),
        }
    }

    pub fn len(&self) -> i64 {
        self.counts.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The (R,4) boxes without the image index.
    pub fn boxes(&self) -> Tensor {
        self.rows.slice(1, 1, 5, 1)
    }

    /// A per-RoI tensor (R, ...) split into its images.
    pub fn split(&self, per_roi: &Tensor) -> Vec<Tensor> {
        per_roi.split_with_sizes(&self.counts, 0)
    }

    /// The first `n` RoIs of the batch (mmdet's `forward_dummy` sends the first 100 through
    /// the mask head).
    pub fn first(&self, n: i64) -> Self {
        let mut left = n.min(self.len());
        let counts = self
            .counts
            .iter()
            .map(|&c| {
                let k = c.min(left);
                left -= k;
                k
            })
            .collect();
        Self {
            rows: self.rows.slice(0, 0, n.min(self.len()), 1),
            counts,
        }
    }

    pub fn device(&self) -> Device {
        self.rows.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rois_keep_image_index_and_counts() {
        let a = Tensor::from_slice(&[0f32, 0., 4., 4., 1., 1., 5., 5.]).view([2, 4]);
        let b = Tensor::from_slice(&[2f32, 2., 6., 6.]).view([1, 4]);
        let r = Rois::from_boxes(&[&a, &b]);
        assert_eq!(r.counts, vec![2, 1]);
        let idx = Vec::<f32>::try_from(r.rows.select(1, 0)).unwrap();
        assert_eq!(idx, vec![0.0, 0.0, 1.0]);
        let first = r.first(1);
        assert_eq!(first.counts, vec![1, 0]);
        assert_eq!(first.rows.size(), vec![1, 5]);
        let parts = r.split(&Tensor::arange(3, (Kind::Int64, Device::Cpu)));
        assert_eq!(parts[1].int64_value(&[0]), 2);
        let moved = r.with_boxes(&(r.boxes() + 1.0));
        assert_eq!(moved.rows.double_value(&[2, 0]), 1.0);
        assert_eq!(moved.rows.double_value(&[2, 1]), 3.0);
    }

    #[test]
    fn proposals_rows_are_mmdet_order() {
        let p = Proposals::new(
            Tensor::from_slice(&[0f32, 1., 2., 3.]).view([1, 4]),
            Tensor::from_slice(&[0.5f32]),
        );
        assert_eq!(
            Vec::<f32>::try_from(p.to_rows().view([-1])).unwrap(),
            vec![0.0, 1.0, 2.0, 3.0, 0.5]
        );
        assert!(Proposals::empty(Device::Cpu).is_empty());
    }
}
