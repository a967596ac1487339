//! `cnx-eval`: `cnx eval` without libtorch. Loading libtorch costs the `cnx` binary ~0.35 s and
//! ~470 MB before it does anything, which dominates evaluating a results file; this binary
//! links only the evaluation crate and takes the same subcommands and flags
//! (`cnx-eval coco ...`, `cnx-eval seg ...`).

use clap::Parser;
use cnx_eval::cli::{self, EvalCommand};

#[derive(Parser)]
#[command(
    name = "cnx-eval",
    version,
    about = "COCO mAP (bbox/segm, identical to pycocotools) and segmentation mIoU (as mmseg), \
             without libtorch",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: EvalCommand,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli::run(cli::Args {
        command: cli.command,
    })
}
