//! Semantic-segmentation metrics exactly as mmsegmentation computes them (`IoU` metric:
//! aAcc, mIoU, mAcc and per-class IoU / Acc), accumulated image by image.
//!
//! Per image, pixels whose (possibly zero-reduced) label equals the ignore index are dropped;
//! the remaining pixels are counted into per-class histograms of intersection, prediction and
//! label (`torch.histc` over `[0, num_classes)`, which silently drops labels outside that range).
//! Counts are exact integers here (u64), which is what mmseg's float64 accumulation of
//! per-image counts amounts to. IoU_c = I_c / U_c, Acc_c = I_c / L_c, aAcc = ΣI / ΣL, and
//! mIoU / mAcc are `np.nanmean` over classes (NaN for classes absent from GT and prediction).

use std::path::Path;

use serde::Serialize;

use crate::error::EvalError;
use crate::numpy;

/// mmseg's default ignore index.
pub const IGNORE_INDEX: u8 = 255;

/// Streaming accumulator of the per-class areas.
#[derive(Clone, Debug)]
pub struct Accumulator {
    num_classes: usize,
    reduce_zero_label: bool,
    ignore_index: u8,
    /// Per-class intersection areas.
    pub intersect: Vec<u64>,
    /// Per-class union areas.
    pub union: Vec<u64>,
    /// Per-class predicted areas.
    pub pred_area: Vec<u64>,
    /// Per-class label areas.
    pub label_area: Vec<u64>,
    /// Number of images added.
    pub num_images: usize,
}

/// Per-class result (percent; `None` where mmseg has NaN).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassResult {
    pub name: String,
    #[serde(rename = "IoU")]
    pub iou: Option<f64>,
    #[serde(rename = "Acc")]
    pub acc: Option<f64>,
}

/// aAcc, mIoU, mAcc (percent, unrounded) and the per-class table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    #[serde(rename = "aAcc")]
    pub aacc: f64,
    #[serde(rename = "mIoU")]
    pub miou: f64,
    #[serde(rename = "mAcc")]
    pub macc: f64,
    pub per_class: Vec<ClassResult>,
}

impl Summary {
    /// `mIoU`, `mAcc`, `aAcc` (percent): the `metrics` schema of every cnx command's JSON.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("mIoU".to_string(), self.miou),
            ("mAcc".to_string(), self.macc),
            ("aAcc".to_string(), self.aacc),
        ]
        .into_iter()
        .collect()
    }

    /// The table mmseg logs: per-class IoU/Acc and the summary, two decimals.
    pub fn format_table(&self) -> String {
        let fmt = |v: Option<f64>| match v {
            Some(v) => format!("{v:.2}"),
            None => "nan".to_string(),
        };
        let w = self
            .per_class
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!("{:<w$} | {:>6} | {:>6}\n", "Class", "IoU", "Acc");
        s.push_str(&format!(
            "{}-+-{}-+-{}\n",
            "-".repeat(w),
            "-".repeat(6),
            "-".repeat(6)
        ));
        for c in &self.per_class {
            s.push_str(&format!(
                "{:<w$} | {:>6} | {:>6}\n",
                c.name,
                fmt(c.iou),
                fmt(c.acc)
            ));
        }
        s.push_str(&format!(
            "\naAcc: {:.2}  mIoU: {:.2}  mAcc: {:.2}\n",
            self.aacc, self.miou, self.macc
        ));
        s
    }
}

impl Accumulator {
    /// `num_classes` classes, ignore index 255, optional ADE20K-style zero-label reduction.
    pub fn new(num_classes: usize, reduce_zero_label: bool) -> Accumulator {
        Accumulator {
            num_classes,
            reduce_zero_label,
            ignore_index: IGNORE_INDEX,
            intersect: vec![0; num_classes],
            union: vec![0; num_classes],
            pred_area: vec![0; num_classes],
            label_area: vec![0; num_classes],
            num_images: 0,
        }
    }

    /// Uses another ignore index than 255.
    pub fn with_ignore_index(mut self, ignore_index: u8) -> Accumulator {
        self.ignore_index = ignore_index;
        self
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Adds one image: `pred` holds class indices `0..num_classes`, `label` the raw label map
    /// (same pixel order; before zero-label reduction). `name` is used in errors only.
    pub fn add_named(&mut self, pred: &[u8], label: &[u8], name: &str) -> Result<(), EvalError> {
        if pred.len() != label.len() {
            return Err(EvalError::LengthMismatch {
                pred: pred.len(),
                label: label.len(),
            });
        }
        let n = self.num_classes;
        if let Some(pixel) = pred.iter().position(|&p| p as usize >= n) {
            return Err(EvalError::PredClassOutOfRange {
                name: name.to_string(),
                class: pred[pixel],
                pixel,
                num_classes: n,
            });
        }
        let mut hi = vec![0u64; n];
        let mut hp = vec![0u64; n];
        let mut hl = vec![0u64; n];
        let ig = self.ignore_index;
        for (&p, &l0) in pred.iter().zip(label) {
            // reduce_zero_label: 0 -> 255, others - 1 (255 stays 255), in uint8 as mmseg does.
            let l = if self.reduce_zero_label {
                if l0 == 0 {
                    255
                } else {
                    let v = l0 - 1;
                    if v == 254 {
                        255
                    } else {
                        v
                    }
                }
            } else {
                l0
            };
            if l == ig {
                continue;
            }
            hp[p as usize] += 1;
            if (l as usize) < n {
                hl[l as usize] += 1;
                if p == l {
                    hi[l as usize] += 1;
                }
            }
        }
        for c in 0..n {
            self.intersect[c] += hi[c];
            self.pred_area[c] += hp[c];
            self.label_area[c] += hl[c];
            self.union[c] += hp[c] + hl[c] - hi[c];
        }
        self.num_images += 1;
        Ok(())
    }

    /// [`Accumulator::add_named`] without a name.
    pub fn add(&mut self, pred: &[u8], label: &[u8]) -> Result<(), EvalError> {
        self.add_named(pred, label, "prediction")
    }

    /// Merges another accumulator (for parallel evaluation).
    pub fn merge(&mut self, other: &Accumulator) {
        for c in 0..self.num_classes {
            self.intersect[c] += other.intersect[c];
            self.union[c] += other.union[c];
            self.pred_area[c] += other.pred_area[c];
            self.label_area[c] += other.label_area[c];
        }
        self.num_images += other.num_images;
    }

    /// Per-class IoU (fraction, NaN where the union is empty).
    pub fn iou(&self) -> Vec<f64> {
        (0..self.num_classes)
            .map(|c| self.intersect[c] as f64 / self.union[c] as f64)
            .collect()
    }

    /// Per-class accuracy (fraction, NaN where the label area is empty).
    pub fn acc(&self) -> Vec<f64> {
        (0..self.num_classes)
            .map(|c| self.intersect[c] as f64 / self.label_area[c] as f64)
            .collect()
    }

    /// aAcc, mIoU, mAcc and per-class values in percent; `class_names` may be shorter than
    /// `num_classes` (missing names become the class index).
    pub fn summary(&self, class_names: &[String]) -> Summary {
        let iou = self.iou();
        let acc = self.acc();
        let ti: u64 = self.intersect.iter().sum();
        let tl: u64 = self.label_area.iter().sum();
        let opt = |v: f64| if v.is_nan() { None } else { Some(v * 100.0) };
        Summary {
            aacc: ti as f64 / tl as f64 * 100.0,
            miou: numpy::nanmean(&iou) * 100.0,
            macc: numpy::nanmean(&acc) * 100.0,
            per_class: (0..self.num_classes)
                .map(|c| ClassResult {
                    name: class_names.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    iou: opt(iou[c]),
                    acc: opt(acc[c]),
                })
                .collect(),
        }
    }
}

/// Class names from ADE20K's `objectInfo150.txt` (tab-separated, header line, name last);
/// like mmseg, each class is called by the first of its comma-separated synonyms.
pub fn parse_object_info(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let name = l.split('\t').next_back().unwrap_or("");
            name.split(',').next().unwrap_or("").trim().to_string()
        })
        .collect()
}

/// Reads class names: `objectInfo150.txt` format when the file has tab-separated columns,
/// otherwise one name per line.
pub fn load_class_names(path: impl AsRef<Path>) -> Result<Vec<String>, EvalError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if text.lines().next().is_some_and(|l| l.contains('\t')) {
        Ok(parse_object_info(&text))
    } else {
        Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny() {
        let mut acc = Accumulator::new(3, false);
        acc.add(&[0, 1, 2, 2], &[0, 1, 1, 255]).unwrap();
        assert_eq!(acc.intersect, vec![1, 1, 0]);
        assert_eq!(acc.union, vec![1, 2, 1]);
        let s = acc.summary(&[]);
        assert_eq!(s.aacc, 2.0 / 3.0 * 100.0);
        assert!(acc.add(&[3], &[0]).is_err());
    }

    #[test]
    fn reduce_zero() {
        let mut acc = Accumulator::new(2, true);
        acc.add(&[0, 1, 1, 0], &[0, 1, 2, 255]).unwrap();
        // label 0 and 255 ignored; 1 -> 0, 2 -> 1.
        assert_eq!(acc.intersect, vec![0, 1]);
        assert_eq!(acc.pred_area, vec![0, 2]);
        assert_eq!(acc.label_area, vec![1, 1]);
    }
}
