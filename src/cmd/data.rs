//! `cnx data`: generate synthetic datasets, look at data through the pipelines, dataset
//! statistics and checks, and the data-pipeline benchmarks used by bench/datasets.sh.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use cnx_datasets::loader::keyed_rng;
use cnx_datasets::pipeline::{self, pad_up, DetSample};
use cnx_datasets::{draw, stats, synth, CocoDataset, TestPipeline, TrainPipeline};

#[derive(Parser)]
pub struct Args {
    #[command(subcommand)]
    cmd: DataCmd,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Write a synthetic dataset (shapes) in COCO or ADE20K layout.
    Synth(SynthArgs),
    /// Draw annotated images (boxes, translucent masks, class names) as PNGs.
    Show(ShowArgs),
    /// Counts per class, crowd regions and problems found in a COCO instances file.
    Stats(StatsArgs),
    /// Time the COCO train pipeline (decode + flip + policy + normalize + pad).
    #[command(hide = true)]
    BenchPipeline(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SynthKind {
    Coco,
    Ade,
}

#[derive(Parser)]
struct SynthArgs {
    kind: SynthKind,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Number of images (80% train, 20% val).
    #[arg(long, default_value_t = 200)]
    images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum PipelineKind {
    None,
    Train,
    Test,
}

#[derive(Parser)]
struct ShowArgs {
    /// COCO instances JSON.
    #[arg(long)]
    coco: PathBuf,
    /// Image directory.
    #[arg(long)]
    images: PathBuf,
    /// Show images as loaded (none), after the train pipeline, or after the test pipeline.
    #[arg(long, value_enum, default_value_t = PipelineKind::None)]
    pipeline: PipelineKind,
    /// Number of images.
    #[arg(short = 'n', default_value_t = 8)]
    n: usize,
    /// First image index.
    #[arg(long, default_value_t = 0)]
    start: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory for the PNGs.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Parser)]
struct StatsArgs {
    /// COCO instances JSON.
    #[arg(long)]
    coco: PathBuf,
    /// Image directory: also check that every file exists and has the JSON's size.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchArgs {
    #[arg(long)]
    coco: PathBuf,
    #[arg(long)]
    images: PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Images to process (cycling through the training images).
    #[arg(short = 'n', default_value_t = 200)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Include instance masks (mmdet's with_mask=True).
    #[arg(long)]
    masks: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        DataCmd::Synth(a) => run_synth(a),
        DataCmd::Show(a) => run_show(a),
        DataCmd::Stats(a) => run_stats(a),
        DataCmd::BenchPipeline(a) => run_bench(a),
    }
}

fn run_synth(a: SynthArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let s = match a.kind {
        SynthKind::Coco => synth::coco(&a.out, a.images, a.seed)?,
        SynthKind::Ade => synth::ade(&a.out, a.images, a.seed)?,
    };
    println!(
        "wrote {} train + {} val images to {} ({} annotations, {} crowd) in {:.1}s",
        s.train_images,
        s.val_images,
        a.out.display(),
        s.annotations,
        s.crowd,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_show(a: ShowArgs) -> anyhow::Result<()> {
    let ds = CocoDataset::load(&a.coco, &a.images)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let names = ds.class_names();
    let end = (a.start + a.n).min(ds.images.len());
    if a.start >= end {
        bail!("no images in range (dataset has {})", ds.images.len());
    }
    for i in a.start..end {
        let s: DetSample = match a.pipeline {
            PipelineKind::None => pipeline::plain(&ds, i, true)?,
            PipelineKind::Test => TestPipeline::default().run(&ds, i, true)?,
            PipelineKind::Train => {
                TrainPipeline::default().run(&ds, i, &mut keyed_rng(a.seed, 0, i as u64, 0))?
            }
        };
        let img = draw::draw_annotated(
            &s.img,
            &s.boxes,
            &s.labels,
            Some(&s.masks),
            &s.ignore,
            &names,
        );
        let stem = std::path::Path::new(&s.meta.file_name)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let p = a.out.join(format!("{stem}.png"));
        img.save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        println!(
            "{} ({}x{} -> {}x{}{}, {} boxes, {} crowd)",
            p.display(),
            s.meta.ori_shape.1,
            s.meta.ori_shape.0,
            s.meta.img_shape.1,
            s.meta.img_shape.0,
            if s.meta.flip { ", flipped" } else { "" },
            s.labels.len(),
            s.ignore.len()
        );
    }
    Ok(())
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn run_stats(a: StatsArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let ds = CocoDataset::load(&a.coco, a.images.clone().unwrap_or_default())?;
    let parse = t.elapsed().as_secs_f64();
    let st = stats::coco_stats(&ds, a.images.is_some(), parse);
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        v["peak_rss_mib"] = serde_json::json!(peak_rss_mib());
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", a.coco.display());
    println!(
        "images {}  annotations {}  crowd {}  categories {}  (parsed in {:.2}s)",
        st.images, st.annotations, st.crowd, st.categories, parse
    );
    println!(
        "training images (mmdet filter) {}  images without annotations {}",
        st.train_images, st.images_without_annotations
    );
    println!(
        "{:>4} {:>5} {:<20} {:>8} {:>6} {:>7}",
        "lbl", "id", "name", "anns", "crowd", "images"
    );
    for (l, c) in st.per_class.iter().enumerate() {
        println!(
            "{:>4} {:>5} {:<20} {:>8} {:>6} {:>7}",
            l, c.id, c.name, c.annotations, c.crowd, c.images
        );
    }
    let p = &st.problems;
    println!(
        "problems: {} boxes clipped, {} annotations dropped (empty/w<1/h<1/area<=0), {} degenerate polygons, {} unknown categories, {} unknown image ids, {} without segmentation, {} duplicate image ids, {} images under 32 px",
        p.boxes_clipped, p.anns_dropped, p.degenerate_polygons, p.unknown_category, p.unknown_image, p.missing_segmentation, p.duplicate_image_ids, p.tiny_images
    );
    for e in &p.examples {
        println!("  {e}");
    }
    if let (Some(m), Some(s), Some(u)) =
        (st.missing_images, st.size_mismatches, st.unreadable_images)
    {
        println!("images: {m} missing, {s} with a size different from the JSON, {u} unreadable");
        for e in &st.image_problems {
            println!("  {e}");
        }
    }
    Ok(())
}

fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    use rayon::prelude::*;
    let ds = Arc::new(CocoDataset::load(&a.coco, &a.images)?);
    let idx = ds.train_indices();
    if idx.is_empty() {
        bail!("no training images");
    }
    let p = TrainPipeline {
        with_masks: a.masks,
        ..TrainPipeline::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()?;
    let run_one = |k: usize| -> anyhow::Result<usize> {
        let i = idx[k % idx.len()];
        let s = p.run(&ds, i, &mut keyed_rng(a.seed, 0, k as u64, 0))?;
        let (ph, pw) = (pad_up(s.img.h, 32), pad_up(s.img.w, 32));
        let mut buf = vec![0f32; 3 * ph * pw];
        pipeline::normalize_into(&s.img, &mut buf, pw, ph);
        Ok(buf.len())
    };
    // Warm the page cache and the pool (not timed), then time one pass.
    pool.install(|| {
        (0..a.threads.min(a.n))
            .into_par_iter()
            .try_for_each(|k| run_one(k).map(|_| ()))
    })?;
    let t = Instant::now();
    pool.install(|| {
        (0..a.n)
            .into_par_iter()
            .try_for_each(|k| run_one(k).map(|_| ()))
    })?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"images": a.n, "threads": a.threads, "seconds": secs, "images_per_s": a.n as f64 / secs, "masks": a.masks})
    );
    Ok(())
}
