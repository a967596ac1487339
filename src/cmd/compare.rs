//! `cnx compare --task det|seg PRESET... [--weights PRESET=FILE ...] [--fps] [--out DIR]`:
//! the paper's backbone-transfer tables (Table 3 COCO, Table 4 ADE20K) for the chosen presets —
//! parameters and FLOPs counted on the real network at the tables' input size (1280x800 for
//! detection, 2048x512 / 2560x640 for segmentation, as mmdet/mmseg `get_flops` take them),
//! frames per second measured on the current device (fp32 and, on CUDA, mixed precision;
//! warm-up then the median of several runs) — beside the paper's published figures. Writes
//! `report.md`, `report.json` and `report.png` (FPS, or the paper's accuracy without `--fps`,
//! against FLOPs).
//!
//! Every row is the heads crate's model for that preset (Swin / ResNet backbones through the
//! presets' backbone configs). With `--weights PRESET=FILE` and a dataset, the row's accuracy is
//! measured the way `cnx test` does it: COCO box AP (as pycocotools) or ADE20K mIoU with the
//! multi-scale + flip test the paper's Table 4 reports.

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use cnx_backbone::config as bbcfg;
use cnx_backbone::{flops, nn as cnn};
use cnx_eval::coco::IouType;
use cnx_heads::segmentor::Segmentor;
use cnx_heads::DenseModel;
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareTask {
    Det,
    Seg,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// det (COCO, Table 3) or seg (ADE20K, Table 4).
    #[arg(long, value_enum)]
    pub task: CompareTask,
    /// Presets to compare (e.g. mask_rcnn_swin_tiny_3x cascade_mask_rcnn_r50_3x).
    #[arg(required = true)]
    pub presets: Vec<String>,
    /// Trained weights per preset: PRESET=FILE (repeatable).
    #[arg(long = "weights", value_parser = parse_kv)]
    pub weights: Vec<(String, PathBuf)>,
    /// COCO annotation file (accuracy needs weights and data).
    #[arg(long)]
    pub coco: Option<PathBuf>,
    /// COCO image directory.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// ADE20K root (ADEChallengeData2016).
    #[arg(long)]
    pub ade_root: Option<PathBuf>,
    /// Measure frames per second on the current device.
    #[arg(long)]
    pub fps: bool,
    /// Timed runs per measurement (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Device: auto (cuda:0 when libtorch sees a GPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Output directory for report.md / report.json / report.png.
    #[arg(long, default_value = "compare_report")]
    pub out: PathBuf,
}

fn parse_kv(s: &str) -> Result<(String, PathBuf), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not PRESET=FILE"))?;
    Ok((k.to_string(), PathBuf::from(v)))
}

/// The paper's published figures for one row.
#[derive(Debug, Clone, Serialize)]
pub struct PaperRow {
    pub params_m: Option<f64>,
    pub gflops: f64,
    pub fps: Option<f64>,
    /// AP box (det) or mIoU multi-scale (seg).
    pub metric: f64,
}

/// A row of the comparison: what to build and what the paper says.
#[derive(Debug, Clone)]
pub struct RowSpec {
    pub name: String,
    pub arch: &'static str,
    pub input: (i64, i64),
    pub paper: PaperRow,
}

/// ConvNeXt rows of Tables 3 and 4 (name, arch, params M, GFLOPs, FPS, AP box / mIoU ms).
const CONVNEXT_ROWS: [(&str, &str, f64, f64, f64, f64); 13] = [
    (
        "mask_rcnn_convnext_tiny_3x",
        "mask_rcnn",
        48.0,
        262.0,
        25.6,
        46.2,
    ),
    (
        "cascade_mask_rcnn_convnext_tiny_3x",
        "cascade_mask_rcnn",
        86.0,
        741.0,
        13.5,
        50.4,
    ),
    (
        "cascade_mask_rcnn_convnext_small_3x",
        "cascade_mask_rcnn",
        108.0,
        827.0,
        12.0,
        51.9,
    ),
    (
        "cascade_mask_rcnn_convnext_base_3x",
        "cascade_mask_rcnn",
        146.0,
        964.0,
        11.4,
        52.7,
    ),
    (
        "cascade_mask_rcnn_convnext_base_3x_in22k",
        "cascade_mask_rcnn",
        146.0,
        964.0,
        11.5,
        54.0,
    ),
    (
        "cascade_mask_rcnn_convnext_large_3x_in22k",
        "cascade_mask_rcnn",
        255.0,
        1354.0,
        10.0,
        54.8,
    ),
    (
        "cascade_mask_rcnn_convnext_xlarge_3x_in22k",
        "cascade_mask_rcnn",
        407.0,
        1898.0,
        8.6,
        55.2,
    ),
    (
        "upernet_convnext_tiny_512_160k",
        "upernet",
        60.0,
        939.0,
        f64::NAN,
        46.7,
    ),
    (
        "upernet_convnext_small_512_160k",
        "upernet",
        82.0,
        1027.0,
        f64::NAN,
        49.6,
    ),
    (
        "upernet_convnext_base_512_160k",
        "upernet",
        122.0,
        1170.0,
        f64::NAN,
        49.9,
    ),
    (
        "upernet_convnext_base_640_160k_in22k",
        "upernet",
        122.0,
        1828.0,
        f64::NAN,
        53.1,
    ),
    (
        "upernet_convnext_large_640_160k_in22k",
        "upernet",
        235.0,
        2458.0,
        f64::NAN,
        53.7,
    ),
    (
        "upernet_convnext_xlarge_640_160k_in22k",
        "upernet",
        391.0,
        3335.0,
        f64::NAN,
        54.0,
    ),
];

/// Input (h, w) at which the tables count FLOPs.
fn table_input(arch: &str, crop: i64) -> (i64, i64) {
    match (arch, crop) {
        ("upernet", 640) => (2560, 640),
        ("upernet", _) => (2048, 512),
        _ => (1280, 800),
    }
}

/// Every preset name `cnx compare` knows.
pub fn known_presets() -> Vec<String> {
    let mut v: Vec<String> = bbcfg::comparison_presets()
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    v.extend(CONVNEXT_ROWS.iter().map(|r| r.0.to_string()));
    v
}

/// Resolve a preset name to its row.
pub fn row_spec(name: &str) -> Result<RowSpec> {
    if let Some(p) = bbcfg::comparison_presets()
        .into_iter()
        .find(|p| p.name == name)
    {
        return Ok(RowSpec {
            name: name.to_string(),
            arch: p.arch,
            input: table_input(p.arch, p.crop),
            paper: PaperRow {
                params_m: p.paper_params_m,
                gflops: p.paper_gflops,
                fps: p.paper_fps,
                metric: p.paper_metric,
            },
        });
    }
    if let Some(r) = CONVNEXT_ROWS.iter().find(|r| r.0 == name) {
        let crop = if name.contains("_640_") { 640 } else { 512 };
        let arch: &'static str = r.1;
        return Ok(RowSpec {
            name: name.to_string(),
            arch,
            input: table_input(arch, crop),
            paper: PaperRow {
                params_m: Some(r.2),
                gflops: r.3,
                fps: r.4.is_finite().then_some(r.4),
                metric: r.5,
            },
        });
    }
    bail!(
        "unknown preset '{name}'; known: {}",
        known_presets().join(", ")
    )
}

/// A built model ready to count and time: the heads crate's own model for the preset (Swin and
/// ResNet backbones are built by the presets' backbone configs, not swapped in).
pub struct Built {
    pub model: Box<dyn DenseModel>,
    pub vs: VarStore,
}

/// Build the row's whole model on `device` (random weights unless loaded afterwards).
pub fn build(spec: &RowSpec, device: Device) -> Result<Built> {
    let vs = VarStore::new(device);
    let model: Box<dyn DenseModel> = match spec.arch {
        "mask_rcnn" | "cascade_mask_rcnn" => Box::new(crate::model_source::preset_detector(
            &vs.root(),
            &spec.name,
        )?),
        "upernet" => Box::new(Segmentor::new_uninit(
            &vs.root(),
            &crate::engine::presets::segmentor(&spec.name)?,
        )?),
        a => bail!("unknown architecture {a}"),
    };
    Ok(Built { model, vs })
}

impl Built {
    pub fn params(&self) -> i64 {
        cnn::param_count(&self.vs)
    }

    /// What the tables' `get_flops` runs: mmdet's `forward_dummy` (1000 boxes through the box
    /// head(s), 100 through the mask head(s)) / mmseg's backbone + decode head.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.model.forward_dummy(x))
    }
}

/// (parameters, FLOPs) of a comparison preset at `h` x `w` (for `cnx flops`); `None` for names
/// that are not comparison presets.
pub fn count_preset(name: &str, h: i64, w: i64) -> Option<Result<(i64, f64)>> {
    bbcfg::comparison_preset(name)?;
    Some((|| {
        let spec = row_spec(name)?;
        let m = build(&spec, Device::Cpu)?;
        let x = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
        let (_, t) = flops::count(|| m.forward(&x));
        Ok((m.params(), t.total))
    })())
}

/// Median milliseconds of `f` over `runs` after one warm-up, synchronising CUDA.
fn median_ms(device: Device, runs: usize, f: impl Fn() -> Tensor) -> f64 {
    let sync = || crate::device::synchronize(device);
    let _ = f();
    sync();
    let mut ts: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            let _ = f();
            sync();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}

#[derive(Debug, Serialize)]
struct RowReport {
    name: String,
    arch: String,
    input: [i64; 2],
    params_m: Option<f64>,
    gflops: Option<f64>,
    fps_fp32: Option<f64>,
    fps_amp: Option<f64>,
    metric: Option<f64>,
    paper: PaperRow,
    note: String,
}

#[derive(Debug, Serialize)]
struct Report {
    task: CompareTask,
    device: String,
    metric_name: &'static str,
    rows: Vec<RowReport>,
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

pub fn run(args: Args) -> Result<()> {
    let device = crate::device::resolve(&args.device)?;
    let metric_name = match args.task {
        CompareTask::Det => "AP box",
        CompareTask::Seg => "mIoU (ms+flip)",
    };
    let mut rows = Vec::new();
    for name in &args.presets {
        let spec = row_spec(name)?;
        let is_seg = spec.arch == "upernet";
        if is_seg != (args.task == CompareTask::Seg) {
            bail!(
                "{name} is a {} preset, not --task {:?}",
                spec.arch,
                args.task
            );
        }
        let mut r = RowReport {
            name: name.clone(),
            arch: spec.arch.to_string(),
            input: [spec.input.0, spec.input.1],
            params_m: None,
            gflops: None,
            fps_fp32: None,
            fps_amp: None,
            metric: None,
            paper: spec.paper.clone(),
            note: String::new(),
        };
        eprintln!("== {name}");
        match build(&spec, Device::Cpu) {
            Err(e) => r.note = e.to_string(),
            Ok(m) => {
                r.params_m = Some(m.params() as f64 / 1e6);
                let x = Tensor::zeros(
                    [1, 3, spec.input.0, spec.input.1],
                    (Kind::Float, Device::Cpu),
                );
                let (_, t) = flops::count(|| m.forward(&x));
                r.gflops = Some(t.total / 1e9);
                eprintln!(
                    "   {:.1}M params, {:.1} GFLOPs",
                    m.params() as f64 / 1e6,
                    t.total / 1e9
                );
                drop(m);
                if args.fps {
                    // The whole inference as the paper times it: pre-processing of a decoded
                    // image (resize to the test scale, normalise, pad), the network, and the
                    // post-processing (NMS and mask pasting; segmentation's test mode).
                    let m = build(&spec, device)?;
                    let (h, w) = (spec.input.0 as usize, spec.input.1 as usize);
                    let mut img = cnx_datasets::image_io::Image8::new(w, h, 3);
                    for (i, v) in img.data.iter_mut().enumerate() {
                        *v = (i * 2654435761 % 251) as u8;
                    }
                    let pipe = cnx_datasets::pipeline::TestPipeline {
                        scale: (h.min(w), h.max(w)),
                        size_divisor: 32,
                    };
                    let run = || {
                        let (x, _) = crate::cmd::predict::prepare(&img, &pipe, device);
                        tch::no_grad(|| m.model.infer(&x))
                    };
                    let ms = median_ms(device, args.runs, run);
                    r.fps_fp32 = Some(1e3 / ms);
                    if device.is_cuda() {
                        let ms = median_ms(device, args.runs, || {
                            crate::engine::amp::autocast(
                                device,
                                crate::engine::config::Amp::Fp16,
                                run,
                            )
                        });
                        r.fps_amp = Some(1e3 / ms);
                    }
                    eprintln!(
                        "   fps fp32 {} amp {}",
                        fmt_opt(r.fps_fp32, 2),
                        fmt_opt(r.fps_amp, 2)
                    );
                }
            }
        }
        if let Some((_, f)) = args.weights.iter().find(|(k, _)| k == name) {
            match evaluate_row(&args, &spec, f, device) {
                Ok(Some(m)) => r.metric = Some(m),
                Ok(None) => {
                    r.note = format!("weights {} not evaluated: no dataset given", f.display())
                }
                Err(e) => bail!("evaluating {name} with {}: {e:#}", f.display()),
            }
        }
        rows.push(r);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let report = Report {
        task: args.task,
        device: format!("{device:?}"),
        metric_name,
        rows,
    };
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = render_md(&report);
    std::fs::write(args.out.join("report.md"), &md)?;
    plot(&args.out.join("report.png"), &report, args.fps)?;
    println!("{md}");
    println!("wrote {}/report.{{md,json,png}}", args.out.display());
    Ok(())
}

/// The row's accuracy with trained weights `f`: COCO box AP x100 (the whole annotation file),
/// or ADE20K validation mIoU (percent) with the multi-scale + flip test. `None` without a dataset.
fn evaluate_row(args: &Args, spec: &RowSpec, f: &Path, device: Device) -> Result<Option<f64>> {
    match args.task {
        CompareTask::Det => {
            let (Some(ann), Some(images)) = (&args.coco, &args.images) else {
                return Ok(None);
            };
            let src =
                crate::model_source::ModelSource::resolve(Some(&spec.name), None, None, Some(f))?;
            let (_vs, det) = src.load_detector(false, device)?;
            let out = args.out.join(format!("{}.bbox.json", spec.name));
            std::fs::create_dir_all(&args.out)?;
            let s = crate::cmd::test::coco_test(
                &det,
                &src.test_pipeline(),
                ann,
                images,
                None,
                1,
                &out,
                &[IouType::Bbox],
                device,
                None,
            )?;
            Ok(Some(s[0].1.ap * 100.0))
        }
        CompareTask::Seg => {
            let Some(root) = &args.ade_root else {
                return Ok(None);
            };
            let o = crate::cmd::seg::TestOpts {
                cfg: crate::engine::presets::segmentor(&spec.name)?,
                weights: f.to_path_buf(),
                ade_root: root.clone(),
                mode: None,
                aug_test: true,
                out_dir: None,
                device,
                shard: None,
            };
            Ok(Some(crate::cmd::seg::test_with(&o)?.summary.miou))
        }
    }
}

fn render_md(r: &Report) -> String {
    let table = match r.task {
        CompareTask::Det => {
            "Table 3 (COCO val2017, Mask / Cascade Mask R-CNN 3x; FLOPs at 1280x800)"
        }
        CompareTask::Seg => "Table 4 (ADE20K val, UperNet 160k; FLOPs at 2048x512 / 2560x640)",
    };
    let mut s = format!(
        "# cnx compare: {table}\n\nDevice for FPS: {}. Paper FPS: A100. `–`: not measured.\n\n",
        r.device
    );
    s += &format!(
        "| preset | params (M) | paper | GFLOPs | paper | FPS fp32 | FPS amp | paper FPS | {m} | paper {m} | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        m = r.metric_name
    );
    for x in &r.rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            x.name,
            fmt_opt(x.params_m, 1),
            fmt_opt(x.paper.params_m, 0),
            fmt_opt(x.gflops, 1),
            fmt_opt(Some(x.paper.gflops), 0),
            fmt_opt(x.fps_fp32, 2),
            fmt_opt(x.fps_amp, 2),
            fmt_opt(x.paper.fps, 1),
            fmt_opt(x.metric, 1),
            fmt_opt(Some(x.paper.metric), 1),
            x.note
        );
    }
    s
}

static FONT: std::sync::Once = std::sync::Once::new();

/// Scatter against GFLOPs of FPS (with --fps) or accuracy: the paper's rows hollow at the
/// paper's GFLOPs, ours filled at our counted GFLOPs.
fn plot(path: &Path, r: &Report, fps: bool) -> Result<()> {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../datasets/assets/fonts/DejaVuSansMono.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
    let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow!("{e}");
    // (label, our GFLOPs, paper GFLOPs, our y, paper y)
    type Pt = (String, Option<f64>, f64, Option<f64>, Option<f64>);
    let pts: Vec<Pt> = r
        .rows
        .iter()
        .map(|x| {
            let (ours, paper) = if fps {
                (x.fps_fp32, x.paper.fps)
            } else {
                (x.metric, Some(x.paper.metric))
            };
            (
                x.name.clone(),
                x.gflops,
                x.paper.gflops,
                ours.filter(|v| v.is_finite()),
                paper,
            )
        })
        .collect();
    let xs: Vec<f64> = pts
        .iter()
        .flat_map(|p| [p.1, Some(p.2)])
        .flatten()
        .collect();
    let ys: Vec<f64> = pts
        .iter()
        .flat_map(|p| [p.3, p.4])
        .flatten()
        .filter(|v| v.is_finite())
        .collect();
    let (xlo, xhi) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let (ylo, yhi) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let (ylo, yhi) = if ys.is_empty() {
        (0.0, 1.0)
    } else {
        (ylo, yhi)
    };
    let xpad = ((xhi - xlo) * 0.15).max(20.0);
    let ypad = ((yhi - ylo) * 0.15).max(0.5);
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let ylabel = if fps {
        "frames / s".to_string()
    } else {
        r.metric_name.to_string()
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{ylabel} vs GFLOPs ({:?})", r.task),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xlo - xpad)..(xhi + xpad), (ylo - ypad)..(yhi + ypad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("GFLOPs")
        .y_desc(ylabel.as_str())
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(
            pts.iter()
                .filter_map(|p| Some(Circle::new((p.2, p.4?), 6, orange.stroke_width(2)))),
        )
        .map_err(e)?
        .label("paper")
        .legend(move |(x, y)| Circle::new((x, y), 5, orange.stroke_width(2)));
    chart
        .draw_series(
            pts.iter()
                .filter_map(|p| Some(Circle::new((p.1?, p.3?), 5, blue.filled()))),
        )
        .map_err(e)?
        .label("ours (this device, our counter)")
        .legend(move |(x, y)| Circle::new((x, y), 5, blue.filled()));
    chart
        .draw_series(pts.iter().filter_map(|p| {
            let (x, y) = match (p.1, p.3) {
                (Some(x), Some(y)) => (x, y),
                _ => (p.2, p.4?),
            };
            Some(Text::new(
                p.0.clone(),
                (x, y),
                ("sans-serif", 12).into_font(),
            ))
        }))
        .map_err(e)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_resolves() {
        for n in known_presets() {
            let r = row_spec(&n).unwrap();
            assert!(r.paper.gflops > 0.0, "{n}");
        }
        assert!(row_spec("mask_rcnn_vgg").is_err());
        assert_eq!(parse_kv("a=b/c").unwrap().1, PathBuf::from("b/c"));
    }
}
