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
    /// Decode every image (and ADE label map), list every problem; exit status 1 if any.
    Check(CheckArgs),
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
#[command(group(clap::ArgGroup::new("layout").required(true).args(["coco", "ade_root"])))]
struct CheckArgs {
    /// COCO instances JSON (with --images).
    #[arg(long, requires = "images")]
    coco: Option<PathBuf>,
    /// Image directory of the COCO JSON.
    #[arg(long)]
    images: Option<PathBuf>,
    /// ADE20K root (ADEChallengeData2016 layout: images/<split>, annotations/<split>).
    #[arg(long, conflicts_with = "coco")]
    ade_root: Option<PathBuf>,
    /// ADE split to check (default: every split present, training and validation).
    #[arg(long, value_parser = ["training", "validation"], requires = "ade_root")]
    split: Option<String>,
    /// ADE class count: raw label values above it (other than 255) are out of range (default:
    /// the root's objectInfo list, else 150).
    #[arg(long, requires = "ade_root")]
    num_classes: Option<usize>,
    /// Print the report as JSON: {"images", "problems": [{"file", "kind", "detail"}], "counts"}.
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
        DataCmd::Check(a) => run_check(a),
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

/// A progress bar on stderr for `n` items; hidden for small sets, for --json and off a terminal
/// (indicatif hides itself there).
fn check_bar(n: usize, json: bool, what: &str) -> indicatif::ProgressBar {
    if json || n < 200 {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap(),
    );
    pb.set_message(what.to_string());
    pb
}

fn run_check(a: CheckArgs) -> anyhow::Result<()> {
    use cnx_datasets::ade::AdeDataset;
    use cnx_datasets::check;
    let t = Instant::now();
    let (what, report) = if let Some(ann) = &a.coco {
        let images = a.images.clone().unwrap_or_default();
        let ds = CocoDataset::load(ann, &images)?;
        let pb = check_bar(ds.images.len(), a.json, "checking");
        let r = check::check_coco(&ds, &|| pb.inc(1));
        pb.finish_and_clear();
        (format!("{} ({})", ann.display(), images.display()), r)
    } else {
        let root = a.ade_root.clone().expect("clap requires a layout");
        let splits: Vec<&str> = match &a.split {
            Some(s) => vec![s.as_str()],
            None => ["training", "validation"]
                .into_iter()
                .filter(|s| root.join("images").join(s).is_dir())
                .collect(),
        };
        if splits.is_empty() {
            bail!(
                "no images/training or images/validation under {} (ADE20K layout expected)",
                root.display()
            );
        }
        let mut report = check::CheckReport::default();
        for split in &splits {
            let ds = AdeDataset::load(&root, split)
                .with_context(|| format!("reading the {split} split of {}", root.display()))?;
            let n = a.num_classes.unwrap_or_else(|| check::ade_num_classes(&ds));
            let pb = check_bar(ds.len(), a.json, split);
            report.merge(check::check_ade(&ds, n, &|| pb.inc(1)));
            pb.finish_and_clear();
        }
        (
            format!("{} ({})", root.display(), splits.join(", ")),
            report,
        )
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("{:<18} {}: {}", p.kind.name(), p.file, p.detail);
        }
        println!(
            "{what}: {} images checked in {:.1}s, {} problems",
            report.images,
            t.elapsed().as_secs_f64(),
            report.problems.len()
        );
        for (k, n) in &report.counts {
            println!("  {k:<18} {n}");
        }
    }
    if !report.is_clean() {
        bail!(
            "{} problems found in {} images",
            report.problems.len(),
            report.images
        );
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
        let mut buf = vec![0u8; 3 * ph * pw];
        pipeline::chw_into(&s.img, &mut buf, pw, ph);
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
