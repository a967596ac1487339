//! One module per subcommand: each exposes `Args` (clap) and `run(Args)`.

pub mod doctor;
