//! One module per subcommand: each exposes `Args` (clap) and `run(Args)`.

pub mod bench_forward;
pub mod bench_seg;
pub mod benchmark;
pub mod classify;
pub mod compare;
pub mod config;
pub mod convert;
pub mod data;
pub mod demo;
pub mod doctor;
pub mod eval;
pub mod flops;
pub mod inputs;
pub mod predict;
pub mod presets;
pub mod seg;
pub mod test;
pub mod train;
