//! The evaluation command line, shared by `cnx eval` (the libtorch binary re-exports it) and the
//! libtorch-free `cnx-eval` binary, so both run one implementation: COCO mAP (bbox / segm,
//! identical to pycocotools) and semantic-segmentation mIoU (identical to mmsegmentation) from
//! files on disk. The metrics live in the library; this module only reads files (JSON, PNG),
//! runs them in parallel and prints. Behind the `cli` feature, so library users get no clap.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::coco::{self, CocoGt, IouType};
use crate::miou::{self, Accumulator};
use crate::EvalError;
use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use rayon::prelude::*;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// COCO bbox / segm AP, printed exactly as pycocotools' COCOeval.summarize().
    Coco(CocoArgs),
    /// Semantic segmentation aAcc / mIoU / mAcc as mmsegmentation computes them.
    Seg(SegArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IouTypeArg {
    Bbox,
    Segm,
    Both,
}

#[derive(clap::Args, Debug)]
pub struct CocoArgs {
    /// Ground-truth annotations (instances_*.json).
    #[arg(long)]
    pub gt: PathBuf,
    /// Results: a JSON list of {image_id, category_id, score, bbox | segmentation}.
    #[arg(long)]
    pub results: PathBuf,
    /// What to evaluate [default: both when the results have masks, else bbox].
    #[arg(long, value_enum)]
    pub iou_type: Option<IouTypeArg>,
    /// Also print AP@[.5:.95] per category.
    #[arg(long)]
    pub per_class: bool,
    /// Print JSON instead of text: {"bbox": {"AP": .., "AP50": .., ...}, "segm": {...}}.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct SegArgs {
    /// Directory of ground-truth label PNGs (8-bit, class per pixel).
    #[arg(long)]
    pub gt_dir: PathBuf,
    /// Directory of predicted PNGs with the same file names, holding classes 0..N-1.
    #[arg(long)]
    pub pred_dir: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 150)]
    pub num_classes: usize,
    /// Map label 0 to ignore (255) and shift the others down by one (ADE20K).
    #[arg(long)]
    pub reduce_zero_label: bool,
    /// Class names: ADE20K's objectInfo150.txt or one name per line [default: objectInfo150.txt
    /// two levels above --gt-dir when present, else class indices].
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// Print JSON instead of text (percent): {"aAcc", "mIoU", "mAcc", "per_class": [..]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        EvalCommand::Coco(a) => run_coco(a),
        EvalCommand::Seg(a) => run_seg(a),
    }
}

fn run_coco(a: CocoArgs) -> Result<()> {
    let t0 = Instant::now();
    // Ground truth and results are independent: parse them on both cores at once.
    // Box-only evaluation skips the ground-truth polygons (most of the file) unparsed.
    let load_gt = || match a.iou_type {
        Some(IouTypeArg::Bbox) => CocoGt::load_boxes_only(&a.gt),
        _ => CocoGt::load(&a.gt),
    };
    let (gt, dets) = rayon::join(load_gt, || coco::load_results(&a.results));
    let gt = gt?;
    let dets = dets?;
    let t_load = t0.elapsed().as_secs_f64();
    if dets.is_empty() {
        eprintln!(
            "warning: {} holds no detections; every metric is 0 (-1 where there is no ground \
             truth). pycocotools raises an IndexError on such a file.",
            a.results.display()
        );
    }
    let types: Vec<IouType> = match a.iou_type {
        Some(IouTypeArg::Bbox) => vec![IouType::Bbox],
        Some(IouTypeArg::Segm) => vec![IouType::Segm],
        Some(IouTypeArg::Both) => vec![IouType::Bbox, IouType::Segm],
        None => {
            if dets.first().is_some_and(|d| d.segmentation.is_some()) {
                vec![IouType::Bbox, IouType::Segm]
            } else {
                vec![IouType::Bbox]
            }
        }
    };
    let mut json: Vec<(IouType, TypeJson)> = Vec::new();
    for t in types {
        let t1 = Instant::now();
        let ev = coco::evaluate(&gt, &dets, t)?;
        let dt = t1.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} images, {} categories, {} detections: evaluated in {dt:.2}s (loading {t_load:.2}s)",
            t.name(),
            ev.num_images,
            ev.k(),
            ev.num_detections
        );
        if a.json {
            let per_class = a.per_class.then(|| {
                ev.per_category_ap()
                    .into_iter()
                    .map(|(id, name, ap)| ClassAp { id, name, ap })
                    .collect()
            });
            json.push((
                t,
                TypeJson {
                    summary: ev.summary,
                    per_class,
                },
            ));
        } else {
            println!("Evaluate annotation type *{}*", t.name());
            print!("{}", ev.summary.format_pycocotools());
            if a.per_class {
                print!("{}", per_class_table(&ev));
            }
        }
    }
    if a.json {
        let mut out = CocoJson {
            metrics: Default::default(),
            bbox: None,
            segm: None,
        };
        for (t, v) in json {
            out.metrics.extend(v.summary.metrics(t.name()));
            match t {
                IouType::Bbox => out.bbox = Some(v),
                IouType::Segm => out.segm = Some(v),
            }
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    // A command runs once per process: freeing half a million detections one by one just
    // before exit costs tens of milliseconds the OS does for free.
    std::mem::forget(dets);
    std::mem::forget(gt);
    Ok(())
}

/// `--json` output of `cnx eval coco` (fields in pycocotools' stats order), plus `metrics` in
/// the names every cnx command's JSON uses (bbox_mAP, ..., segm_mAP_l).
#[derive(Serialize)]
struct CocoJson {
    metrics: std::collections::BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bbox: Option<TypeJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segm: Option<TypeJson>,
}

#[derive(Serialize)]
struct TypeJson {
    #[serde(flatten)]
    summary: coco::Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_class: Option<Vec<ClassAp>>,
}

#[derive(Serialize)]
struct ClassAp {
    id: i64,
    name: String,
    #[serde(rename = "AP")]
    ap: Option<f64>,
}

/// mmdet-style classwise table: AP@[.5:.95] per category, `nan` without ground truth.
fn per_class_table(ev: &coco::CocoEval) -> String {
    let rows: Vec<(String, String)> = ev
        .per_category_ap()
        .into_iter()
        .map(|(_, name, ap)| {
            let ap = ap.map_or_else(|| "nan".to_string(), |v| format!("{v:.3}"));
            (name, ap)
        })
        .collect();
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(8).max(8);
    let mut s = format!(
        "\n{:<w$} | {:>5}\n{}-+-{}\n",
        "category",
        "AP",
        "-".repeat(w),
        "-".repeat(5)
    );
    for (n, ap) in rows {
        s.push_str(&format!("{n:<w$} | {ap:>5}\n"));
    }
    s
}

fn run_seg(a: SegArgs) -> Result<()> {
    if a.num_classes == 0 || a.num_classes > 255 {
        bail!("--num-classes must be in 1..=255 for 8-bit label maps");
    }
    let names = match &a.class_names {
        Some(p) => miou::load_class_names(p)?,
        None => {
            let guess = a.gt_dir.join("../../objectInfo150.txt");
            if a.num_classes == 150 && guess.is_file() {
                miou::load_class_names(&guess)?
            } else {
                Vec::new()
            }
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.gt_dir)
        .with_context(|| format!("cannot list {}", a.gt_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .png label maps in {}", a.gt_dir.display());
    }
    let t0 = Instant::now();
    let acc = files
        .par_iter()
        .map(|gt_path| -> Result<Accumulator> {
            let name = gt_path.file_name().unwrap();
            let pred_path = a.pred_dir.join(name);
            if !pred_path.is_file() {
                bail!(
                    "no prediction {} for ground truth {}",
                    pred_path.display(),
                    gt_path.display()
                );
            }
            let (gw, gh, label) = read_gray(gt_path)?;
            let (pw, ph, pred) = read_gray(&pred_path)?;
            if (gw, gh) != (pw, ph) {
                return Err(EvalError::SizeMismatch {
                    pred: pred_path.display().to_string(),
                    pw,
                    ph,
                    gt: gt_path.display().to_string(),
                    gw,
                    gh,
                }
                .into());
            }
            let mut acc = Accumulator::new(a.num_classes, a.reduce_zero_label);
            acc.add_named(&pred, &label, &pred_path.display().to_string())?;
            Ok(acc)
        })
        .try_reduce(
            || Accumulator::new(a.num_classes, a.reduce_zero_label),
            |mut x, y| {
                x.merge(&y);
                Ok(x)
            },
        )?;
    let s = acc.summary(&names);
    eprintln!(
        "{} images evaluated in {:.2}s",
        acc.num_images,
        t0.elapsed().as_secs_f64()
    );
    if a.json {
        // NaN (class absent from GT and prediction) is written as null; `metrics` in the names
        // every cnx command's JSON uses.
        let mut v = serde_json::to_value(&s)?;
        v["metrics"] = serde_json::to_value(s.metrics())?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", s.format_table());
    }
    Ok(())
}

/// An 8-bit single-channel PNG as (width, height, row-major pixels).
fn read_gray(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode {}", path.display()))?;
    match img {
        image::DynamicImage::ImageLuma8(g) => {
            let (w, h) = g.dimensions();
            Ok((w as usize, h as usize, g.into_raw()))
        }
        other => bail!(
            "{}: expected an 8-bit grayscale PNG of class indices, got {:?} (palette PNGs are \
             expanded to colors by the decoder; save indices as mode 'L')",
            path.display(),
            other.color()
        ),
    }
}
