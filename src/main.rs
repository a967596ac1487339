//! `cnx`: one native binary for dense prediction with ConvNeXt backbones. The command line only:
//! every subcommand is a module of the `cnx` library (`cmd/`).

use clap::{Parser, Subcommand};
use cnx::cmd;

#[derive(Parser)]
#[command(name = "cnx", version, about = "Dense prediction with ConvNeXt backbones", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect (Mask R-CNN) or segment (UperNet) image files: annotated PNGs + predictions.
    Predict(cmd::predict::Args),
    /// Run a preset over a COCO (or ADE20K) dataset and evaluate it.
    Test(cmd::test::Args),
    /// Versions of cnx and libtorch, CPU threads, CUDA devices.
    Doctor(cmd::doctor::Args),
    /// ImageNet classification with a ConvNeXt checkpoint (official evaluation preprocessing).
    Classify(cmd::classify::Args),
    /// Parameters and FLOPs of a model at an input size (conv, linear and matmul multiply-adds).
    Flops(cmd::flops::Args),
    /// Rewrite a checkpoint (.pth / timm / mmdet / safetensors) as safetensors with official names.
    Convert(cmd::convert::Args),
    /// Time a backbone forward (for bench/ and scripts/gpu_check.sh).
    #[command(hide = true)]
    BenchForward(cmd::bench_forward::Args),
    /// Times UperNet inference (bench/segmentation.sh, scripts/gpu_check.sh).
    #[command(hide = true)]
    BenchSeg(cmd::bench_seg::Args),
    /// COCO mAP (bbox/segm, identical to pycocotools) and segmentation mIoU (as mmseg).
    Eval(cmd::eval::Args),
    /// Datasets: synthetic data, show annotated images, statistics and checks.
    Data(cmd::data::Args),
    /// Train a detector / segmentor from a preset or a TOML config (resume, AMP, checkpoints).
    Train(cmd::train::Args),
    /// The paper's training presets with their settings and paper numbers.
    Presets(cmd::presets::Args),
    /// Show a preset's full config as TOML, or check an edited config file.
    Config(cmd::config::Args),
    /// Synthetic data → train → evaluate → draw, on CPU in minutes (`make demo`).
    Demo(cmd::demo::Args),
    /// Backbone-transfer tables (paper Tables 3/4): params, FLOPs, FPS beside the paper's rows.
    Compare(cmd::compare::Args),
    /// Speed (images/s, ms per iteration) and peak memory of a preset, inference or training.
    Benchmark(cmd::benchmark::Args),
}

fn main() -> anyhow::Result<()> {
    cnx::host_memory::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Predict(a) => cmd::predict::run(a),
        Command::Test(a) => cmd::test::run(a),
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Presets(a) => cmd::presets::run(a),
        Command::Config(a) => cmd::config::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Benchmark(a) => cmd::benchmark::run(a),
        Command::Classify(a) => cmd::classify::run(a),
        Command::Flops(a) => cmd::flops::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::BenchForward(a) => cmd::bench_forward::run(a),
        Command::BenchSeg(a) => cmd::bench_seg::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Data(a) => cmd::data::run(a),
    }
}
