//! `cnx`: one native binary for dense prediction with ConvNeXt backbones.
//!
//! Each subcommand lives in its own module under `cmd/`; the training engine (configs, presets,
//! optimizer groups, schedules, checkpoints) lives under `engine/`.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cnx", version, about = "Dense prediction with ConvNeXt backbones", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Versions of cnx and libtorch, CPU threads, CUDA devices.
    Doctor(cmd::doctor::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor(a) => cmd::doctor::run(a),
    }
}
