//! The training engine: configuration and presets, AdamW with the recipes' parameter groups,
//! lr schedules, mixed precision, checkpoints and resume, logs and plots, and the loop itself.

pub mod amp;
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod log;
pub mod optim;
pub mod presets;
pub mod schedule;
pub mod task;
pub mod tasks;
pub mod threads;
pub mod trainer;

#[cfg(test)]
mod tiny;
