//! The `cnx` application layer: what the commands and the training engine share.
//!
//! - `cmd/`: one module per subcommand (argument parsing and output).
//! - `engine/`: training (configs, presets, optimizer groups, schedules, checkpoints, tasks).
//! - `model_source`: a model from a preset, a config, a work dir or a checkpoint's own card.
//! - `adapters`: dataset structures to the heads' typed inputs, and the one test-time
//!   preprocessing of an image (the heads crate knows tensors, not datasets).
//! - `results`: detections as COCO result records; `evaluation`: the one COCO evaluation loop.
//! - `drawing`: pictures of detections and segmentations.
//! - `device`: the one `--device` rule.

pub mod adapters;
pub mod cmd;
pub mod device;
pub mod drawing;
pub mod engine;
pub mod evaluation;
pub mod host_memory;
pub mod model_source;
pub mod results;
