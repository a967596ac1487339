//! `cnx-datasets`: COCO and ADE20K loaders, the ConvNeXt paper's augmentation pipelines with
//! mmdet/mmseg/cv2 semantics, parallel reproducible batching, synthetic datasets and drawing
//! helpers. No libtorch: batches are plain `Vec<f32>` buffers with a shape.
//!
//! Main entry points:
//! * [`coco::CocoDataset::load`], [`loader::CocoTrain`], [`loader::Loader`], [`loader::TestIter`]
//! * [`ade::AdeDataset`], [`ade::AdeTrain`], [`ade::AdeTestIter`]
//! * [`mask::Masks::crop_and_resize`] (Mask R-CNN 28x28 targets)
//! * [`synth::coco`], [`synth::ade`], [`draw`]
//! * [`check::check_coco`], [`check::check_ade`] (`cnx data check`)

// Pixel loops index several parallel buffers by channel / coordinate; iterator chains would
// hide the correspondence with the cv2 / mmcv code they mirror.
#![allow(clippy::needless_range_loop)]

pub mod ade;
pub mod check;
pub mod classes;
pub mod coco;
pub mod draw;
pub mod error;
pub mod image_io;
pub mod loader;
pub mod mask;
pub mod pipeline;
pub mod raster;
pub mod stats;
pub mod synth;

pub use coco::CocoDataset;
pub use error::{DatasetError, Result};
pub use loader::{CocoTrain, DetBatch, DetTargets, Loader, LoaderConfig, Source, TestIter};
pub use mask::{InstanceMask, MaskMode, Masks};
pub use pipeline::{ImageMeta, TestPipeline, TrainPipeline, MEAN, STD};
