//! Watching a run: a JSONL log in the work dir (one object per logged iteration and per
//! evaluation) and a PNG of the loss curves and evaluation metrics, redrawn as training goes.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Once;

/// One logged point: iteration and named values.
#[derive(Debug, Clone)]
pub struct Point {
    pub iter: u64,
    pub values: BTreeMap<String, f64>,
}

/// Append-only JSONL log plus the in-memory history the plot is drawn from.
pub struct RunLog {
    /// `None` for a process that keeps the history but writes nothing (data-parallel ranks
    /// other than 0: one writer per run).
    file: Option<std::fs::File>,
    pub train: Vec<Point>,
    pub val: Vec<Point>,
}

impl RunLog {
    /// Open (append to) `dir/log.jsonl`. When resuming, previous lines up to `upto_iter` are
    /// read back into the history so the curves continue; later lines (from a run that went on
    /// past its last checkpoint) are dropped from the file.
    pub fn open(dir: &Path, upto_iter: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("log.jsonl");
        let (mut train, mut val) = (vec![], vec![]);
        let mut keep = String::new();
        if let (Some(upto), Ok(text)) = (upto_iter, std::fs::read_to_string(&path)) {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let it = v.get("iter").and_then(|x| x.as_u64()).unwrap_or(0);
                if it > upto {
                    continue;
                }
                keep += line;
                keep.push('\n');
                let values: BTreeMap<String, f64> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
                    .filter(|(k, _)| k != "iter")
                    .collect();
                match v.get("mode").and_then(|m| m.as_str()) {
                    Some("train") => train.push(Point { iter: it, values }),
                    Some("val") => val.push(Point { iter: it, values }),
                    _ => {}
                }
            }
        }
        std::fs::write(&path, keep).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok(Self {
            file: Some(file),
            train,
            val,
        })
    }

    /// A log that writes no file (the ranks of a data-parallel run other than 0).
    pub fn in_memory() -> Self {
        Self {
            file: None,
            train: Vec::new(),
            val: Vec::new(),
        }
    }

    fn write_line(&mut self, obj: serde_json::Map<String, serde_json::Value>) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{}", serde_json::Value::Object(obj))?;
            f.flush()?;
        }
        Ok(())
    }

    /// Log one line; `mode` is "train" or "val". Non-numeric extras go in `extra`.
    pub fn log(
        &mut self,
        mode: &str,
        iter: u64,
        values: &BTreeMap<String, f64>,
        extra: &[(&str, serde_json::Value)],
    ) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("mode".into(), mode.into());
        obj.insert("iter".into(), iter.into());
        for (k, v) in values {
            obj.insert(
                k.clone(),
                serde_json::Number::from_f64(*v)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null),
            );
        }
        for (k, v) in extra {
            obj.insert((*k).into(), v.clone());
        }
        self.write_line(obj)?;
        let p = Point {
            iter,
            values: values.clone(),
        };
        if mode == "val" {
            self.val.push(p);
        } else {
            self.train.push(p);
        }
        Ok(())
    }

    /// Log one event line (`mode` e.g. "data") that is not a point of the curves.
    pub fn event(
        &mut self,
        mode: &str,
        iter: u64,
        fields: &[(&str, serde_json::Value)],
    ) -> Result<()> {
        let mut obj = serde_json::Map::new();
        obj.insert("mode".into(), mode.into());
        obj.insert("iter".into(), iter.into());
        for (k, v) in fields {
            obj.insert((*k).into(), v.clone());
        }
        self.write_line(obj)
    }
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../datasets/assets/fonts/DejaVuSansMono.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Draw loss curves (left) and evaluation metrics (right) into a PNG. Loss keys are those
/// starting with `loss`; metric keys are every numeric value of the val points.
pub fn plot_curves(path: &Path, title: &str, train: &[Point], val: &[Point]) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);
    let loss_keys: Vec<String> = {
        let mut k: Vec<String> = train
            .iter()
            .flat_map(|p| p.values.keys().filter(|k| k.starts_with("loss")).cloned())
            .collect();
        k.sort();
        k.dedup();
        k
    };
    let metric_keys: Vec<String> = {
        // The headline numbers only (AP, AP50, mIoU, aAcc, mAcc): size-split APs would crowd it.
        let mut k: Vec<String> = val
            .iter()
            .flat_map(|p| p.values.keys().cloned())
            .filter(|k| {
                !(k.ends_with("_s")
                    || k.ends_with("_m")
                    || k.ends_with("_l")
                    || k.ends_with("_75")
                    || k == "eval_seconds")
            })
            .collect();
        k.sort();
        k.dedup();
        k
    };
    draw_panel(&left, "training losses", train, &loss_keys)?;
    draw_panel(&right, "evaluation", val, &metric_keys)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    caption: &str,
    pts: &[Point],
    keys: &[String],
) -> Result<()> {
    let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");
    let max_x = pts.iter().map(|p| p.iter).max().unwrap_or(1).max(1) as f64;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in pts {
        for k in keys {
            if let Some(v) = p.values.get(k).filter(|v| v.is_finite()) {
                lo = lo.min(*v);
                hi = hi.max(*v);
            }
        }
    }
    if !lo.is_finite() {
        lo = 0.0;
        hi = 1.0;
    }
    lo = lo.min(0.0);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..max_x, lo..hi * 1.05)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    for (i, k) in keys.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let series: Vec<(f64, f64)> = pts
            .iter()
            .filter_map(|p| Some((p.iter as f64, *p.values.get(k).filter(|v| v.is_finite())?)))
            .collect();
        if series.is_empty() {
            continue;
        }
        let style = ShapeStyle {
            color: c.to_rgba(),
            filled: true,
            stroke_width: 2,
        };
        chart
            .draw_series(LineSeries::new(series.clone(), style))
            .map_err(e)?
            .label(k.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        if series.len() < 30 {
            chart
                .draw_series(series.iter().map(|&(x, y)| Circle::new((x, y), 3, style)))
                .map_err(e)?;
        }
    }
    if !keys.is_empty() && !pts.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_roundtrip_truncates_on_resume_and_plots() {
        let dir = std::env::temp_dir().join(format!("cnx-log-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut log = RunLog::open(&dir, None).unwrap();
            for it in [10u64, 20, 30] {
                let v: BTreeMap<String, f64> = [
                    ("loss".to_string(), 1.0 / it as f64),
                    ("lr".to_string(), 1e-4),
                ]
                .into_iter()
                .collect();
                log.log("train", it, &v, &[]).unwrap();
            }
            let m: BTreeMap<String, f64> = [("bbox_mAP".to_string(), 0.5)].into_iter().collect();
            log.log("val", 20, &m, &[]).unwrap();
        }
        let log = RunLog::open(&dir, Some(20)).unwrap();
        assert_eq!(log.train.len(), 2);
        assert_eq!(log.val.len(), 1);
        let png = dir.join("curves.png");
        plot_curves(&png, "test", &log.train, &log.val).unwrap();
        let img = image::open(&png).unwrap();
        assert_eq!(img.width(), 1400);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
