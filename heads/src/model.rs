//! One interface over the dense-prediction models of this crate (the two-stage detectors and
//! the UperNet segmentor), for what every model offers regardless of task: the network that
//! mmdet's / mmseg's `get_flops` counts, and the classes it predicts.

use tch::Tensor;

pub trait DenseModel: std::fmt::Debug {
    /// The test-time network on a (N,3,H,W) batch without post-processing, reduced to one
    /// tensor (detectors: mmdet's `forward_dummy`; segmentors: backbone + decode head).
    fn forward_dummy(&self, images: &Tensor) -> Tensor;
    /// Classes the model predicts (object classes without background; segmentation classes).
    fn num_classes(&self) -> i64;
}

impl DenseModel for crate::two_stage::TwoStageDetector {
    fn forward_dummy(&self, images: &Tensor) -> Tensor {
        crate::two_stage::TwoStageDetector::forward_dummy(self, images)
    }
    fn num_classes(&self) -> i64 {
        crate::two_stage::TwoStageDetector::num_classes(self)
    }
}

impl DenseModel for crate::segmentor::Segmentor {
    fn forward_dummy(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| self.encode_decode(images))
    }
    fn num_classes(&self) -> i64 {
        self.cfg.num_classes
    }
}
