//! `cnx demo det|seg`: the main job on data the project makes itself. Generates a synthetic
//! COCO-format (det) or ADE-format (seg) dataset, trains the small demo preset on CPU through
//! the same code path as `cnx train`, evaluates with cnx-eval, draws predictions on held-out
//! images, plots the curves, and says where everything is.

use crate::cmd::train::{resolve_config, train_config};
use crate::engine::trainer::RunOptions;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// Mask R-CNN on synthetic shapes (COCO format): box and mask AP.
    Det,
    /// UperNet on synthetic scenes (ADE20K format): mIoU.
    Seg,
}

#[derive(clap::Args)]
pub struct Args {
    which: Which,
    /// Output directory (data, checkpoints, log, curves, predictions).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Synthetic images to generate (80% train, 20% held out).
    #[arg(long)]
    images: Option<usize>,
    /// Override config fields of the demo preset (dotted TOML paths).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// End with one JSON object (metrics, out_dir, seconds).
    #[arg(long)]
    json: bool,
    /// Resume an interrupted demo run from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Only generate the synthetic dataset (under OUT/data) and exit.
    #[arg(long)]
    data_only: bool,
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let (preset, name, default_images) = match args.which {
        Which::Det => ("demo_mask_rcnn_convnext_nano", "demo_det", 300),
        Which::Seg => ("demo_upernet_convnext_nano", "demo_seg", 200),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("work_dirs").join(name));
    let data = out.join("data");
    let n = args.images.unwrap_or(default_images);
    let seed = 0u64;
    // Regenerate only when the set is missing or was made with another size.
    let stamp = data.join(".cnx-synth");
    let want = format!("{n} {seed}");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let _ = std::fs::remove_dir_all(&data);
        eprintln!("generating {n} synthetic images in {} ...", data.display());
        let s = match args.which {
            Which::Det => cnx_datasets::synth::coco(&data, n, seed),
            Which::Seg => cnx_datasets::synth::ade(&data, n, seed),
        }
        .context("generating the synthetic dataset")?;
        eprintln!(
            "  {} train / {} held-out images, {} annotations",
            s.train_images, s.val_images, s.annotations
        );
        std::fs::write(&stamp, &want)?;
    }
    if args.data_only {
        println!("{}", data.display());
        return Ok(());
    }
    let mut sets = vec![
        format!("data.root={:?}", data.display().to_string()),
        format!("runtime.work_dir={:?}", out.display().to_string()),
    ];
    sets.extend(args.sets.iter().cloned());
    let cfg = resolve_config(Some(preset), None, &sets)?;
    if !args.resume {
        clear_previous_run(&out)?;
    }
    let opts = RunOptions {
        resume: args.resume.then(|| "auto".to_string()),
        stop_at: None,
        quiet: false,
        no_eval: false,
        ..Default::default()
    };
    let (summary, mut task) = train_config(&cfg, &opts)?;
    if summary.interrupted {
        eprintln!(
            "demo interrupted: continue with `cnx demo {} --resume` (same --out/--set)",
            name.trim_start_matches("demo_")
        );
        std::process::exit(130);
    }
    let pred_dir = out.join("predictions");
    let drawn = task.draw_predictions(&pred_dir, 8)?;
    let seconds = t0.elapsed().as_secs_f64();
    let m = &summary.metrics;
    eprintln!();
    eprintln!("data         {}", data.display());
    eprintln!("config       {}", out.join("config.toml").display());
    if let Some(w) = &summary.weights {
        eprintln!("weights      {}", w.display());
    }
    eprintln!("log          {}", out.join("log.jsonl").display());
    eprintln!("curves       {}", out.join("curves.png").display());
    eprintln!(
        "predictions  {} ({} images)",
        pred_dir.display(),
        drawn.len()
    );
    match args.which {
        Which::Det => eprintln!(
            "held-out     box AP {:.3}  AP50 {:.3}  |  mask AP {:.3}  AP50 {:.3}",
            m.get("bbox_mAP").unwrap_or(&f64::NAN),
            m.get("bbox_mAP_50").unwrap_or(&f64::NAN),
            m.get("segm_mAP").unwrap_or(&f64::NAN),
            m.get("segm_mAP_50").unwrap_or(&f64::NAN)
        ),
        Which::Seg => eprintln!(
            "held-out     mIoU {:.2}  aAcc {:.2}  mAcc {:.2}",
            m.get("mIoU").unwrap_or(&f64::NAN),
            m.get("aAcc").unwrap_or(&f64::NAN),
            m.get("mAcc").unwrap_or(&f64::NAN)
        ),
    }
    eprintln!("time         {seconds:.0} s ({} iterations)", summary.iter);
    if args.json {
        let mut obj = serde_json::Map::new();
        match args.which {
            Which::Det => {
                for t in ["bbox", "segm"] {
                    let sub: serde_json::Map<String, serde_json::Value> = m
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((
                                k.strip_prefix(&format!("{t}_"))?.to_string(),
                                serde_json::json!(v),
                            ))
                        })
                        .collect();
                    obj.insert(t.into(), sub.into());
                }
            }
            Which::Seg => {
                for k in ["mIoU", "aAcc", "mAcc"] {
                    obj.insert(k.into(), serde_json::json!(m.get(k)));
                }
            }
        }
        obj.insert("metrics".into(), serde_json::json!(m));
        obj.insert("out_dir".into(), out.display().to_string().into());
        obj.insert("seconds".into(), seconds.into());
        println!("{}", serde_json::Value::Object(obj));
    }
    Ok(())
}

/// A demo starts over unless `--resume`: the previous demo run's own outputs in `out` (its
/// checkpoints, log, curves, evaluations, drawings) are removed; the dataset and anything else
/// stay. (`cnx train` itself refuses to start over a run.)
fn clear_previous_run(out: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let n = e.file_name().to_string_lossy().into_owned();
        let ours = matches!(
            n.as_str(),
            "latest.json" | "log.jsonl" | "curves.png" | "config.toml" | "eval" | "predictions"
        ) || n.starts_with("iter_")
            || n.starts_with("best_");
        if !ours {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("removing the previous demo run's {}", p.display()))?;
    }
    Ok(())
}
