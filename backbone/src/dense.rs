//! The interface every dense-prediction backbone offers the necks and heads: multi-scale feature
//! maps (strides 4, 8, 16, 32) from a normalized N,3,H,W image batch.

use tch::Tensor;

/// A backbone as the detectors and segmentors see it.
pub trait DenseBackbone: std::fmt::Debug + Send {
    /// Feature maps for the configured output stages, finest first.
    fn forward_features(&self, xs: &Tensor, train: bool) -> Vec<Tensor>;
    /// Channels of each returned feature map.
    fn out_channels(&self) -> Vec<i64>;
}
