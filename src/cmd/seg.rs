//! Semantic segmentation behind `cnx predict` and `cnx test` for the UperNet presets
//! (`upernet_*`): `predict` writes a colour overlay with a legend and an 8-bit label PNG per
//! image; `test` runs an ADE20K validation split and reports mmseg's mIoU with cnx-eval.
//! `cmd::predict` / `cmd::test` dispatch here; the option structs keep this module usable from
//! anywhere else too.

use anyhow::{bail, Context, Result};
use cnx_backbone::checkpoint::{self, LoadOptions};
use cnx_datasets::ade::AdeDataset;
use cnx_datasets::classes::ADE20K_CLASSES;

use cnx_datasets::image_io;
use cnx_eval::miou::Accumulator;
use cnx_heads::segmentor::{argmax_u8, Segmentor, SegmentorConfig, TestMode};
use image::GrayImage;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device};

/// What `cnx predict` asks of a segmentor.
#[derive(Debug, Clone)]
pub struct PredictOpts {
    /// The preset's configuration (`SegmentorConfig::preset`).
    pub cfg: SegmentorConfig,
    pub weights: PathBuf,
    /// `None`: the preset's single-scale mode (slide for the paper's presets).
    pub mode: Option<TestMode>,
    pub aug_test: bool,
    pub out_dir: PathBuf,
    pub images: Vec<crate::cmd::inputs::Input>,
    /// Class names recorded with the model (empty: ADE20K's).
    pub classes: Vec<String>,
    pub device: Device,
}

/// What `cnx test` asks of a segmentor.
#[derive(Debug, Clone)]
pub struct TestOpts {
    pub cfg: SegmentorConfig,
    pub weights: PathBuf,
    pub ade_root: PathBuf,
    pub mode: Option<TestMode>,
    pub aug_test: bool,
    /// Where to write the predicted label PNGs (optional).
    pub out_dir: Option<PathBuf>,
    pub device: Device,
    /// Data parallel: this rank's share of the images (rank 0 reports).
    pub shard: Option<crate::evaluation::Shard>,
}

/// Builds the segmentor on `device` and loads `weights` (mmseg UperNet checkpoint layout
/// `backbone.` / `decode_head.` / `auxiliary_head.`, as .pth or the safetensors `cnx convert`
/// writes). Everything but the auxiliary head (unused at test time) must be present with the
/// right shapes; nothing unexpected may be in the checkpoint.
pub fn load_segmentor(
    cfg: &SegmentorConfig,
    weights: &Path,
    device: Device,
) -> Result<(VarStore, Segmentor)> {
    let preset = &cfg.name;
    let mut vs = VarStore::new(device);
    let seg = Segmentor::new_uninit(&vs.root(), cfg)?;
    let sd = checkpoint::read_state_dict(weights)
        .with_context(|| format!("reading {}", weights.display()))?;
    let sd = match cfg.backbone.named()? {
        Some(b) => cnx_heads::weights::convert_backbone_keys(&sd, &b),
        None => sd,
    };
    // Training-only checkpoints may lack the auxiliary head; it does not run at test time.
    let report = checkpoint::load_into(&mut vs, &sd, &LoadOptions::partial())
        .with_context(|| format!("loading {}", weights.display()))?;
    let needed: Vec<_> = report
        .missing
        .iter()
        .filter(|(n, _)| !n.starts_with("auxiliary_head."))
        .collect();
    if !needed.is_empty() || !report.mismatched.is_empty() || !report.unexpected.is_empty() {
        bail!(
            "{}: checkpoint does not match {preset}:\n{report}",
            weights.display()
        );
    }
    eprintln!("{}: {}", weights.display(), report.summary());
    Ok((vs, seg))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "image".into())
}

pub use crate::drawing::overlay;

/// Writes `pred` (row-major class indices) as an 8-bit grayscale PNG.
pub fn write_label_png(path: &Path, pred: &[u8], w: usize, h: usize) -> Result<()> {
    GrayImage::from_raw(w as u32, h as u32, pred.to_vec())
        .context("label buffer size")?
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

fn mode_of(seg: &Segmentor, mode: Option<TestMode>, aug: bool) -> (TestMode, String) {
    let m = mode.unwrap_or(seg.cfg.test.mode);
    let desc = if aug {
        format!(
            "multi-scale {:?} + flip ({} mode)",
            seg.cfg.test.aug_ratios,
            format!("{:?}", seg.cfg.test.aug_mode).to_lowercase()
        )
    } else {
        format!(
            "{} @ {}x{}",
            format!("{m:?}").to_lowercase(),
            seg.cfg.test.img_scale[0],
            seg.cfg.test.img_scale[1]
        )
    };
    (m, desc)
}

/// What `cnx predict` wrote for a segmentor: (image, label PNG, overlay) per image read, and
/// the images that could not be read.
pub struct PredictOutcome {
    pub written: Vec<(PathBuf, PathBuf, PathBuf)>,
    pub skipped: Vec<PathBuf>,
}

/// `cnx predict` for a segmentor.
pub fn predict_with(o: &PredictOpts) -> Result<PredictOutcome> {
    if o.images.is_empty() {
        bail!("no images given");
    }
    let (_vs, seg) = load_segmentor(&o.cfg, &o.weights, o.device)?;
    std::fs::create_dir_all(&o.out_dir)
        .with_context(|| format!("creating {}", o.out_dir.display()))?;
    let (mode, desc) = mode_of(&seg, o.mode, o.aug_test);
    eprintln!("{}: {desc}", o.cfg.name);
    let names: Vec<String> = if o.classes.is_empty() {
        ADE20K_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        o.classes.clone()
    };
    let mut out = PredictOutcome {
        written: vec![],
        skipped: vec![],
    };
    for input in &o.images {
        let path = &input.path;
        let img = match image_io::read_rgb(path) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("skipping {}: {e}", path.display());
                out.skipped.push(path.clone());
                continue;
            }
        };
        let t = std::time::Instant::now();
        let scores = crate::adapters::predict_image(&seg, &img, mode, o.aug_test, o.device);
        let pred = argmax_u8(&scores);
        let label = input.output(&o.out_dir, ".png")?;
        write_label_png(&label, &pred, img.w, img.h)?;
        let ov = input.output(&o.out_dir, "_overlay.png")?;
        overlay(&img, &pred, &names)
            .save(&ov)
            .with_context(|| format!("writing {}", ov.display()))?;
        let mut counts = [0usize; 256];
        for &p in &pred {
            counts[p as usize] += 1;
        }
        let mut top: Vec<usize> = (0..256).filter(|&c| counts[c] > 0).collect();
        top.sort_by_key(|&c| std::cmp::Reverse(counts[c]));
        let top: Vec<String> = top
            .iter()
            .take(5)
            .map(|&c| {
                format!(
                    "{} {:.0}%",
                    crate::drawing::class_name(c, &names),
                    100.0 * counts[c] as f64 / pred.len() as f64
                )
            })
            .collect();
        println!(
            "{} ({}x{}, {:.2}s): {} -> {}, {}",
            path.display(),
            img.w,
            img.h,
            t.elapsed().as_secs_f64(),
            top.join(", "),
            label.display(),
            ov.display()
        );
        out.written.push((path.clone(), label, ov));
    }
    Ok(out)
}

/// Raw label values that are neither a class (1..=num_classes) nor ignored (0, 255) after
/// mmseg's reduce_zero_label: (first such value, how many pixels).
pub fn bad_label_values(raw: &[u8], num_classes: usize) -> Option<(u8, usize)> {
    let bad = |v: u8| v != 0 && v != 255 && v as usize > num_classes;
    let n = raw.iter().filter(|&&v| bad(v)).count();
    (n > 0).then(|| (*raw.iter().find(|&&v| bad(v)).unwrap(), n))
}

/// mIoU of one test run: the summary, and how many images were skipped for a missing label.
#[cfg_attr(not(test), allow(dead_code))] // `cnx test` prints these; tests and callers read them
pub struct TestOutcome {
    pub summary: cnx_eval::miou::Summary,
    pub evaluated: usize,
    pub skipped_no_label: usize,
}

/// `cnx test` for a segmentor: the `validation` split of an ADE20K-layout root.
pub fn test_with(o: &TestOpts) -> Result<TestOutcome> {
    let ds = AdeDataset::load(&o.ade_root, "validation").with_context(|| {
        format!(
            "reading ADE20K validation split under {}",
            o.ade_root.display()
        )
    })?;
    if ds.is_empty() {
        bail!("no images under {}/images/validation", o.ade_root.display());
    }
    let (_vs, seg) = load_segmentor(&o.cfg, &o.weights, o.device)?;
    let nc = seg.cfg.num_classes as usize;
    let (mode, desc) = mode_of(&seg, o.mode, o.aug_test);
    eprintln!("{}: {} validation images, {desc}", o.cfg.name, ds.len());
    if let Some(d) = &o.out_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // mmseg's own class names (its per-class table); objectInfo150.txt's long synonym lists
    // only for a dataset with another class count.
    let names: Vec<String> = if nc != ADE20K_CLASSES.len() && ds.class_names.len() == nc {
        ds.class_names.clone()
    } else {
        ADE20K_CLASSES.iter().map(|s| s.to_string()).collect()
    };
    let mut acc = Accumulator::new(nc, true);
    let main = o.shard.as_ref().is_none_or(|s| s.is_main());
    let pb = if main {
        ProgressBar::new(ds.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut evaluated, mut skipped) = (0usize, 0usize);
    for (i, (ip, lp)) in ds.items.iter().enumerate() {
        if o.shard.as_ref().is_some_and(|s| !s.owns(i)) {
            continue;
        }
        if !lp.exists() {
            pb.suspend(|| {
                eprintln!(
                    "warning: no label {} for {}; image skipped",
                    lp.display(),
                    ip.display()
                )
            });
            skipped += 1;
            pb.inc(1);
            continue;
        }
        let img = image_io::read_rgb(ip).with_context(|| format!("reading {}", ip.display()))?;
        let label =
            image_io::read_label(lp).with_context(|| format!("reading {}", lp.display()))?;
        if (label.w, label.h) != (img.w, img.h) {
            bail!(
                "{}: label is {}x{} but the image {} is {}x{}",
                lp.display(),
                label.w,
                label.h,
                ip.display(),
                img.w,
                img.h
            );
        }
        if let Some((v, n)) = bad_label_values(&label.data, nc) {
            bail!(
                "{}: {n} pixels have label value {v}{}, which is class {} after reduce_zero_label, \
                 but the model has {nc} classes (valid raw values: 0 = ignore, 1..={nc}, 255 = ignore)",
                lp.display(),
                if n > 1 { " (first bad value)" } else { "" },
                v - 1
            );
        }
        let scores = crate::adapters::predict_image(&seg, &img, mode, o.aug_test, o.device);
        let pred = argmax_u8(&scores);
        acc.add_named(&pred, &label.data, &ip.display().to_string())?;
        if let Some(d) = &o.out_dir {
            write_label_png(&d.join(format!("{}.png", stem(ip))), &pred, img.w, img.h)?;
        }
        evaluated += 1;
        pb.inc(1);
        if evaluated % 10 == 0 {
            let s = acc.summary(&names);
            pb.set_message(format!("mIoU so far {:.2}", s.miou));
        }
    }
    pb.finish_and_clear();
    if let Some(s) = &o.shard {
        // Areas and counts add up over the ranks; the image counts ride along as skipped
        // entries' count and the accumulator's image count.
        let missing: Vec<cnx_datasets::loader::BrokenSample> = (0..skipped)
            .map(|k| cnx_datasets::loader::BrokenSample {
                index: k,
                file: String::new(),
                error: "label missing".into(),
            })
            .collect();
        match crate::evaluation::gather_miou(s, &acc, &missing)? {
            Some((all, broken)) => {
                acc = all;
                skipped = broken.len();
                evaluated = acc.num_images;
            }
            None => {
                return Ok(TestOutcome {
                    summary: acc.summary(&names),
                    evaluated,
                    skipped_no_label: skipped,
                })
            }
        }
    }
    if evaluated == 0 {
        bail!("no image with a label to evaluate ({skipped} skipped for a missing label)");
    }
    let summary = acc.summary(&names);
    println!("{}", summary.format_table());
    println!(
        "{}: mIoU {:.2}  mAcc {:.2}  aAcc {:.2}  ({evaluated} images{})",
        o.cfg.name,
        summary.miou,
        summary.macc,
        summary.aacc,
        if skipped > 0 {
            format!(", {skipped} skipped: label missing")
        } else {
            String::new()
        }
    );
    Ok(TestOutcome {
        summary,
        evaluated,
        skipped_no_label: skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/heads/tests/fixtures/segmentation"
    );
    const ADE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ade-sample");
    const STEMS: [&str; 3] = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"];

    /// The reduced 8-class model of the parity fixtures (weights in `model.pth`).
    fn fixture_cfg() -> SegmentorConfig {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{FIX}/config.json")).unwrap())
                .unwrap();
        let ints = |v: &serde_json::Value| -> Vec<i64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        };
        let mut cfg = SegmentorConfig::upernet_convnext("tiny").unwrap();
        cfg.backbone.depths = ints(&c["depths"]);
        cfg.backbone.dims = ints(&c["dims"]);
        cfg.decode_head.channels = c["channels"].as_i64().unwrap();
        cfg.auxiliary_head.as_mut().unwrap().channels = c["aux_channels"].as_i64().unwrap();
        cfg.num_classes = c["num_classes"].as_i64().unwrap();
        let s = ints(&c["img_scale"]);
        cfg.test.img_scale = [s[0], s[1]];
        let s = ints(&c["crop_size"]);
        cfg.test.crop_size = [s[0], s[1]];
        cfg.test.stride = cfg.test.crop_size.map(|v| v * 2 / 3);
        cfg.test.aug_ratios = vec![0.5, 1.0];
        cfg
    }

    /// An ADE20K-layout root with the three sample images; labels folded to 8 classes (raw
    /// values 0..=8), `bad` written into the first label when given, `drop` label left out.
    fn ade_root(name: &str, bad: Option<u8>, drop: Option<usize>) -> PathBuf {
        let root = std::env::temp_dir().join(format!("cnx-seg-{name}-{}", std::process::id()));
        let (idir, adir) = (
            root.join("images/validation"),
            root.join("annotations/validation"),
        );
        std::fs::create_dir_all(&idir).unwrap();
        std::fs::create_dir_all(&adir).unwrap();
        for (i, s) in STEMS.iter().enumerate() {
            std::fs::copy(format!("{FIX}/{s}.png"), idir.join(format!("{s}.png"))).unwrap();
            if drop == Some(i) {
                continue;
            }
            let mut l =
                image_io::read_label(Path::new(&format!("{ADE}/annotations/validation/{s}.png")))
                    .unwrap();
            for v in l.data.iter_mut() {
                *v %= 9;
            }
            if i == 0 {
                if let Some(b) = bad {
                    l.data[10] = b;
                    l.data[11] = b;
                }
            }
            write_label_png(&adir.join(format!("{s}.png")), &l.data, l.w, l.h).unwrap();
        }
        root
    }

    fn test_opts(root: PathBuf) -> TestOpts {
        TestOpts {
            cfg: fixture_cfg(),
            weights: PathBuf::from(format!("{FIX}/model.pth")),
            ade_root: root,
            mode: None,
            aug_test: false,
            out_dir: None,
            device: Device::Cpu,
            shard: None,
        }
    }

    #[test]
    fn label_values_beyond_the_classes_are_found() {
        assert_eq!(bad_label_values(&[0, 1, 150, 255], 150), None);
        assert_eq!(
            bad_label_values(&[0, 151, 3, 200, 151], 150),
            Some((151, 3))
        );
        assert_eq!(bad_label_values(&[9], 8), Some((9, 1)));
    }

    #[test]
    fn test_skips_and_counts_images_without_label() {
        let root = ade_root("missing", None, Some(1));
        let mut o = test_opts(root.clone());
        o.out_dir = Some(root.join("pred"));
        let r = test_with(&o).unwrap();
        assert_eq!((r.evaluated, r.skipped_no_label), (2, 1));
        assert!(r.summary.miou.is_finite());
        let p = image_io::read_label(&root.join("pred/ADE_val_00000001.png")).unwrap();
        assert_eq!((p.w, p.h), (683, 512));
        assert!(p.data.iter().all(|&v| v < 8));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn test_reports_label_values_above_the_classes_with_the_file() {
        let root = ade_root("bad", Some(200), None);
        let e = test_with(&test_opts(root.clone()))
            .err()
            .expect("bad label must fail");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("ADE_val_00000001.png") && msg.contains("label value 200"),
            "{msg}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn predict_writes_label_png_and_overlay() {
        let dir = std::env::temp_dir().join(format!("cnx-seg-predict-{}", std::process::id()));
        let o = PredictOpts {
            cfg: fixture_cfg(),
            weights: PathBuf::from(format!("{FIX}/model.pth")),
            mode: Some(TestMode::Whole),
            aug_test: true,
            out_dir: dir.clone(),
            images: crate::cmd::inputs::collect(
                &[PathBuf::from(format!("{FIX}/ADE_val_00000003.png"))],
                false,
            )
            .unwrap(),
            classes: vec![],
            device: Device::Cpu,
        };
        predict_with(&o).unwrap();
        let l = image_io::read_label(&dir.join("ADE_val_00000003.png")).unwrap();
        assert_eq!((l.w, l.h), (400, 300));
        assert!(l.data.iter().all(|&v| v < 8));
        let ov = image_io::read_rgb(&dir.join("ADE_val_00000003_overlay.png")).unwrap();
        assert_eq!((ov.w, ov.h), (400 + 240, 300));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
