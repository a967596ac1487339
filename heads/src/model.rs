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
    /// The whole test-time inference of one normalised (1,3,H,W) image at its test scale, with
    /// post-processing (detectors: proposals, NMS, box decoding, mask pasting at H x W;
    /// segmentors: the configured whole / slide inference and the per-pixel argmax); returns a
    /// small tensor that depends on every output (what `cnx compare --fps` times).
    fn infer(&self, image: &Tensor) -> Tensor;
}

impl DenseModel for crate::two_stage::TwoStageDetector {
    fn forward_dummy(&self, images: &Tensor) -> Tensor {
        crate::two_stage::TwoStageDetector::forward_dummy(self, images)
    }
    fn num_classes(&self) -> i64 {
        crate::two_stage::TwoStageDetector::num_classes(self)
    }
    fn infer(&self, image: &Tensor) -> Tensor {
        let s = image.size();
        let hw = (s[2], s[3]);
        let meta = crate::structures::ImgMeta {
            img_shape: hw,
            pad_shape: crate::structures::pad_shape(hw, 32),
            ori_shape: hw,
            scale_factor: (1.0, 1.0),
        };
        let d = self.predict(image, std::slice::from_ref(&meta));
        let mut out = d[0].scores.sum(tch::Kind::Float);
        if let Some(m) = &d[0].masks {
            out += m.sum(tch::Kind::Float);
        }
        out
    }
}

impl DenseModel for crate::segmentor::Segmentor {
    fn forward_dummy(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| self.encode_decode(images))
    }
    fn num_classes(&self) -> i64 {
        self.cfg.num_classes
    }
    fn infer(&self, image: &Tensor) -> Tensor {
        let s = image.size();
        self.inference_logits(image, self.cfg.test.mode, [s[2], s[3]])
            .argmax(1, false)
            .sum(tch::Kind::Int64)
    }
}
