//! One module per subcommand: each exposes `Args` (clap) and `run(Args)`.

pub mod doctor;
pub mod bench_forward;
pub mod classify;
pub mod convert;
pub mod flops;
pub mod eval;
pub mod config;
pub mod demo;
pub mod presets;
pub mod train;
pub mod data;
pub mod seg;
pub mod compare;
pub mod bench_seg;
pub mod predict;
pub mod test;
