//! Dataset statistics and checks behind `cnx data stats`: counts per class, crowd regions,
//! problems found while parsing, and (with the image directory) missing files and JSON sizes
//! that differ from the stored images (read from the file headers only).

use serde::Serialize;

use crate::coco::{CocoDataset, Problems};

/// Per-class counts.
#[derive(Clone, Debug, Serialize)]
pub struct ClassCount {
    pub id: i64,
    pub name: String,
    pub annotations: usize,
    pub crowd: usize,
    pub images: usize,
}

/// Result of [`coco_stats`].
#[derive(Clone, Debug, Serialize)]
pub struct CocoStats {
    pub images: usize,
    pub annotations: usize,
    pub crowd: usize,
    pub categories: usize,
    pub train_images: usize,
    pub images_without_annotations: usize,
    pub per_class: Vec<ClassCount>,
    pub problems: Problems,
    /// Set when images were checked.
    pub missing_images: Option<usize>,
    pub size_mismatches: Option<usize>,
    pub unreadable_images: Option<usize>,
    /// Up to 20 messages from the image check.
    pub image_problems: Vec<String>,
    pub parse_seconds: f64,
}

/// Compute statistics; with `check_images`, every file is looked up and its header read.
pub fn coco_stats(ds: &CocoDataset, check_images: bool, parse_seconds: f64) -> CocoStats {
    use rayon::prelude::*;
    let mut per_class: Vec<ClassCount> = ds
        .categories
        .iter()
        .map(|c| ClassCount {
            id: c.id,
            name: c.name.clone(),
            annotations: 0,
            crowd: 0,
            images: 0,
        })
        .collect();
    let mut crowd = 0;
    for a in &ds.anns {
        crowd += a.iscrowd as usize;
        if let Some(&l) = ds.cat_to_label.get(&a.category_id) {
            per_class[l].annotations += 1;
            per_class[l].crowd += a.iscrowd as usize;
        }
    }
    let mut seen = vec![false; per_class.len()];
    for anns in &ds.img_anns {
        seen.iter_mut().for_each(|s| *s = false);
        for &a in anns {
            if let Some(&l) = ds.cat_to_label.get(&ds.anns[a as usize].category_id) {
                if !seen[l] {
                    seen[l] = true;
                    per_class[l].images += 1;
                }
            }
        }
    }
    let (mut missing, mut mismatch, mut unreadable, mut msgs) = (None, None, None, Vec::new());
    if check_images {
        let res: Vec<(u8, String)> = (0..ds.images.len())
            .into_par_iter()
            .filter_map(|i| {
                let p = ds.image_path(i);
                let im = &ds.images[i];
                match image::image_dimensions(&p) {
                    Err(_) if !p.exists() => Some((0, format!("missing: {}", p.display()))),
                    Err(e) => Some((2, format!("unreadable: {}: {e}", p.display()))),
                    Ok((w, h)) if (w, h) != (im.width, im.height) => Some((
                        1,
                        format!(
                            "size: {} is {w}x{h}, JSON says {}x{}",
                            p.display(),
                            im.width,
                            im.height
                        ),
                    )),
                    Ok(_) => None,
                }
            })
            .collect();
        let count = |k| res.iter().filter(|r| r.0 == k).count();
        missing = Some(count(0));
        mismatch = Some(count(1));
        unreadable = Some(count(2));
        msgs = res.into_iter().take(20).map(|r| r.1).collect();
    }
    CocoStats {
        images: ds.images.len(),
        annotations: ds.anns.len(),
        crowd,
        categories: ds.categories.len(),
        train_images: ds.train_indices().len(),
        images_without_annotations: ds.img_anns.iter().filter(|a| a.is_empty()).count(),
        per_class,
        problems: ds.problems.clone(),
        missing_images: missing,
        size_mismatches: mismatch,
        unreadable_images: unreadable,
        image_problems: msgs,
        parse_seconds,
    }
}
