//! Dataset checks behind `cnx data check` and the existence check `cnx train` runs before it
//! starts: every image is read and decoded with the loader's own decoder ([`image_io`]), so
//! "decodable" here means exactly what it means to training, and every problem is listed (not
//! just the first) with a count per kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::ade::{AdeDataset, IGNORE};
use crate::coco::CocoDataset;
use crate::error::DatasetError;
use crate::image_io::{self, Image8};

/// Number of classes of ADE20K (SceneParsing 150), used when the root has no class list.
pub const ADE_CLASSES: usize = 150;

/// What is wrong with one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The image file does not exist.
    Missing,
    /// The image file exists but has zero bytes.
    Empty,
    /// A JPEG without its end marker, or a stream that ends early.
    Truncated,
    /// Not a JPEG/PNG the loader can decode.
    Undecodable,
    /// The file exists but cannot be read (permissions, a directory, an I/O error).
    Unreadable,
    /// The decoded size differs from the annotation's width/height (COCO).
    WrongSize,
    /// ADE: the label PNG of an image does not exist.
    LabelMissing,
    /// ADE: the label PNG cannot be read or decoded (zero-byte included).
    LabelUnreadable,
    /// ADE: the label map's size differs from its image's.
    LabelSize,
    /// ADE: label values above the class count (255, the ignore value, is allowed).
    LabelOutOfRange,
}

impl ProblemKind {
    /// The name used in `--json` and the summary (`wrong_size`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::Missing => "missing",
            ProblemKind::Empty => "empty",
            ProblemKind::Truncated => "truncated",
            ProblemKind::Undecodable => "undecodable",
            ProblemKind::Unreadable => "unreadable",
            ProblemKind::WrongSize => "wrong_size",
            ProblemKind::LabelMissing => "label_missing",
            ProblemKind::LabelUnreadable => "label_unreadable",
            ProblemKind::LabelSize => "label_size",
            ProblemKind::LabelOutOfRange => "label_out_of_range",
        }
    }
}

/// One problem found in one file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub file: String,
    pub kind: ProblemKind,
    pub detail: String,
}

/// Result of a check: images looked at, every problem (sorted by file), counts per kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub images: usize,
    pub problems: Vec<Problem>,
    pub counts: BTreeMap<String, usize>,
}

impl CheckReport {
    fn from_problems(images: usize, mut problems: Vec<Problem>) -> Self {
        problems.sort();
        let mut counts = BTreeMap::new();
        for p in &problems {
            *counts.entry(p.kind.name().to_string()).or_insert(0) += 1;
        }
        CheckReport {
            images,
            problems,
            counts,
        }
    }

    /// Append another report (e.g. a second split).
    pub fn merge(&mut self, other: CheckReport) {
        self.images += other.images;
        let mut all = std::mem::take(&mut self.problems);
        all.extend(other.problems);
        *self = CheckReport::from_problems(self.images, all);
    }

    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Count of one kind (0 when absent).
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.counts.get(kind.name()).copied().unwrap_or(0)
    }
}

fn problem(path: &Path, kind: ProblemKind, detail: impl Into<String>) -> Problem {
    Problem {
        file: path.display().to_string(),
        kind,
        detail: detail.into(),
    }
}

/// Read and decode an RGB image as the loader does, classifying a failure.
fn check_image(path: &Path) -> Result<Image8, Problem> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(problem(path, ProblemKind::Missing, "file not found"))
        }
        Err(e) => return Err(problem(path, ProblemKind::Unreadable, e.to_string())),
    };
    if bytes.is_empty() {
        return Err(problem(path, ProblemKind::Empty, "zero-byte file"));
    }
    image_io::decode_rgb(&bytes, path).map_err(|e| match e {
        DatasetError::TruncatedImage(_) => problem(
            path,
            ProblemKind::Truncated,
            format!("{} bytes, image data ends early", bytes.len()),
        ),
        DatasetError::Decode { msg, .. } => problem(path, ProblemKind::Undecodable, msg),
        other => problem(path, ProblemKind::Undecodable, other.to_string()),
    })
}

/// Decode every image of a COCO dataset (in parallel) and compare its size with the JSON.
/// `progress` is called once per image checked (from worker threads).
pub fn check_coco(ds: &CocoDataset, progress: &(dyn Fn() + Sync)) -> CheckReport {
    let problems: Vec<Problem> = (0..ds.images.len())
        .into_par_iter()
        .filter_map(|i| {
            let p = ds.image_path(i);
            let info = &ds.images[i];
            let r = match check_image(&p) {
                Err(e) => Some(e),
                Ok(img) if (img.w as u32, img.h as u32) != (info.width, info.height) => {
                    Some(problem(
                        &p,
                        ProblemKind::WrongSize,
                        format!(
                            "decoded {}x{}, annotation says {}x{}",
                            img.w, img.h, info.width, info.height
                        ),
                    ))
                }
                Ok(_) => None,
            };
            progress();
            r
        })
        .collect();
    CheckReport::from_problems(ds.images.len(), problems)
}

/// Class count of an ADE-layout root: the length of its class list (`objectInfo150.txt` /
/// `objectInfo.txt`) when present, else ADE20K's 150.
pub fn ade_num_classes(ds: &AdeDataset) -> usize {
    if ds.class_names.is_empty() {
        ADE_CLASSES
    } else {
        ds.class_names.len()
    }
}

/// Decode every image and label map of an ADE split (in parallel). Raw label values must lie in
/// `0..=num_classes` (0 = "other", which reduce_zero_label turns into the ignore value) or be
/// 255. `progress` is called once per item.
pub fn check_ade(ds: &AdeDataset, num_classes: usize, progress: &(dyn Fn() + Sync)) -> CheckReport {
    let problems: Vec<Problem> = ds
        .items
        .par_iter()
        .flat_map_iter(|(ip, lp)| {
            let mut out = Vec::new();
            let img = check_image(ip).map_err(|e| out.push(e)).ok();
            match image_io::read_label(lp) {
                Err(DatasetError::MissingImage(_)) => {
                    out.push(problem(lp, ProblemKind::LabelMissing, "file not found"))
                }
                Err(e) => {
                    let detail = match e {
                        DatasetError::Decode { msg, .. } => msg,
                        DatasetError::Io { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    out.push(problem(lp, ProblemKind::LabelUnreadable, detail))
                }
                Ok(lab) => {
                    if let Some(img) = &img {
                        if (lab.w, lab.h) != (img.w, img.h) {
                            out.push(problem(
                                lp,
                                ProblemKind::LabelSize,
                                format!("label {}x{}, image {}x{}", lab.w, lab.h, img.w, img.h),
                            ));
                        }
                    }
                    let bad = lab
                        .data
                        .iter()
                        .filter(|&&v| v as usize > num_classes && v != IGNORE);
                    let (n, max) = bad.fold((0usize, 0u8), |(n, m), &v| (n + 1, m.max(v)));
                    if n > 0 {
                        out.push(problem(
                            lp,
                            ProblemKind::LabelOutOfRange,
                            format!(
                                "{n} pixels above {num_classes} (max {max}; valid 0..={num_classes} and 255)"
                            ),
                        ));
                    }
                }
            }
            progress();
            out
        })
        .collect();
    CheckReport::from_problems(ds.items.len(), problems)
}

/// The paths among `paths` that do not exist (checked in parallel, order kept): the cheap check
/// `cnx train` runs before it starts.
pub fn missing_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.par_iter().filter(|p| !p.exists()).cloned().collect()
}

/// All image paths of a COCO dataset.
pub fn coco_image_paths(ds: &CocoDataset) -> Vec<PathBuf> {
    (0..ds.images.len()).map(|i| ds.image_path(i)).collect()
}

/// All image and label paths of an ADE split.
pub fn ade_paths(ds: &AdeDataset) -> Vec<PathBuf> {
    ds.items
        .iter()
        .flat_map(|(i, l)| [i.clone(), l.clone()])
        .collect()
}

/// "N files missing (of M): a, b, ... and K more": names the first `cap`, one per line.
pub fn missing_message(missing: &[PathBuf], of: usize, cap: usize) -> String {
    let mut s = format!("{} of {} files missing:", missing.len(), of);
    for p in missing.iter().take(cap) {
        s.push_str(&format!("\n  {}", p.display()));
    }
    if missing.len() > cap {
        s.push_str(&format!("\n  ... and {} more", missing.len() - cap));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_message_caps_and_counts() {
        let v: Vec<PathBuf> = (0..25)
            .map(|i| PathBuf::from(format!("f{i}.jpg")))
            .collect();
        let m = missing_message(&v, 100, 20);
        assert!(m.starts_with("25 of 100 files missing:"));
        assert!(m.contains("f0.jpg") && m.contains("f19.jpg") && !m.contains("f20.jpg"));
        assert!(m.ends_with("... and 5 more"));
        let m = missing_message(&v[..2], 2, 20);
        assert!(!m.contains("more"));
    }

    #[test]
    fn image_kinds() {
        let d = std::env::temp_dir().join(format!("cnx-check-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let good = d.join("good.jpg");
        let img = image::RgbImage::from_pixel(40, 30, image::Rgb([10, 200, 30]));
        img.save(&good).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(d.join("trunc.jpg"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(d.join("empty.jpg"), b"").unwrap();
        std::fs::write(d.join("junk.jpg"), b"this is not an image").unwrap();
        std::fs::create_dir_all(d.join("dir.jpg")).unwrap();
        let kind = |n: &str| check_image(&d.join(n)).err().map(|p| p.kind);
        assert_eq!(kind("good.jpg"), None);
        assert_eq!(kind("trunc.jpg"), Some(ProblemKind::Truncated));
        assert_eq!(kind("empty.jpg"), Some(ProblemKind::Empty));
        assert_eq!(kind("junk.jpg"), Some(ProblemKind::Undecodable));
        assert_eq!(kind("nothere.jpg"), Some(ProblemKind::Missing));
        assert_eq!(kind("dir.jpg"), Some(ProblemKind::Unreadable));
        let miss = missing_files(&[good.clone(), d.join("a.jpg"), d.join("b.jpg")]);
        assert_eq!(miss, vec![d.join("a.jpg"), d.join("b.jpg")]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
