//! `cnx-heads`: the detection and segmentation heads that sit on the ConvNeXt backbones.
//!
//! Mask R-CNN is built from small modules, one idea each (as torchvision's `models/detection`):
//! [`boxes`] (IoU / GIoU), [`coder`] (delta box coder), [`anchors`], [`nms`],
//! [`roi_align`], [`roi_extractor`], [`fpn`], [`assigner`] (max-IoU assigner, random sampler),
//! [`rpn`], [`bbox_head`] (`BoxHead` trait, Shared2FC head, post-processing), [`mask_head`],
//! [`roi_head`] (the `RoiHead` trait and Mask R-CNN's standard head; [`cascade`] has Cascade's),
//! assembled by [`two_stage`] from the serde configs of [`detector`] / [`cascade`].
//!
//! The crate depends on `cnx-backbone` only: it takes tensors and its own small structures
//! ([`structures`]: `ImgMeta`, `GtInstances`, `Proposals`, `Rois`, `Losses`, `Detections`); turning dataset batches into them, and COCO result
//! records, belong to the application (`cnx::adapters`, `cnx::results`).

pub mod anchors;
pub mod assigner;
pub mod bbox_head;
pub mod boxes;
pub mod cascade;
pub mod coder;
pub mod conv_module;
pub mod detector;
pub mod fpn;
pub mod init;
pub mod mask_head;
pub mod model;
pub mod nms;
pub mod roi_align;
pub mod roi_extractor;
pub mod roi_head;
pub mod rpn;
pub mod structures;
pub mod sync_count;
pub mod two_stage;
pub mod weights;
// UperNet semantic segmentation (owned by the segmentation work): heads and the segmentor.
pub mod segmentor;
pub mod upernet;

pub use detector::{Detector, DetectorConfig};
pub use model::DenseModel;
pub use structures::{Detections, GtInstances, ImgMeta, Losses, Proposals, Rois};
pub use two_stage::{DetectorSpec, TwoStageDetector};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Checkpoint(#[from] cnx_backbone::checkpoint::CheckpointError),
    #[error("{0}")]
    ClassMismatch(String),
}
