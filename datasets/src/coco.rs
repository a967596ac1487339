//! COCO instance annotations: fast typed parsing, contiguous labels (sorted category ids ->
//! 0..K-1, as mmdet), mmdet 2.x `CocoDataset` filtering, crowd regions as ignored boxes, and a
//! record of every problem found (clipped boxes, degenerate polygons, dropped annotations).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::error::{DatasetError, Result};
use crate::mask::{BitMask, InstanceMask, MaskMode, Masks};
use crate::raster;

/// One `images[]` entry.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageInfo {
    pub id: i64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

/// One `categories[]` entry.
#[derive(Clone, Debug, Deserialize)]
pub struct Category {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub supercategory: String,
}

/// RLE counts as stored: uncompressed list or compressed string.
#[derive(Clone, Debug, PartialEq)]
pub enum RleCounts {
    List(Vec<u32>),
    Compressed(String),
}

/// An annotation's `segmentation`, kept compact.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Segmentation {
    #[default]
    None,
    Polygons(Vec<Vec<f64>>),
    Rle {
        counts: RleCounts,
        height: u32,
        width: u32,
    },
}

impl Segmentation {
    /// Uncompressed RLE counts and (h, w) of an RLE segmentation.
    pub fn rle_counts(&self) -> Option<(Vec<u32>, usize, usize)> {
        match self {
            Segmentation::Rle {
                counts,
                height,
                width,
            } => Some((
                match counts {
                    RleCounts::List(c) => c.clone(),
                    RleCounts::Compressed(s) => raster::decode_string(s),
                },
                *height as usize,
                *width as usize,
            )),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Segmentation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Segmentation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of polygons or an RLE object")
            }
            fn visit_unit<E>(self) -> std::result::Result<Segmentation, E> {
                Ok(Segmentation::None)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Segmentation, A::Error> {
                let mut polys = Vec::new();
                while let Some(p) = seq.next_element::<Vec<f64>>()? {
                    polys.push(p);
                }
                Ok(Segmentation::Polygons(polys))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Segmentation, A::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum C {
                    L(Vec<u32>),
                    S(String),
                }
                let mut counts = None;
                let mut size: Option<[u32; 2]> = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "counts" => {
                            counts = Some(match map.next_value::<C>()? {
                                C::L(l) => RleCounts::List(l),
                                C::S(s) => RleCounts::Compressed(s),
                            })
                        }
                        "size" => size = Some(map.next_value()?),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                let counts = counts.ok_or_else(|| de::Error::missing_field("counts"))?;
                let [height, width] = size.ok_or_else(|| de::Error::missing_field("size"))?;
                Ok(Segmentation::Rle {
                    counts,
                    height,
                    width,
                })
            }
        }
        d.deserialize_any(V)
    }
}

fn de_bool_int<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("0/1 or a boolean")
        }
        fn visit_bool<E>(self, v: bool) -> std::result::Result<bool, E> {
            Ok(v)
        }
        fn visit_u64<E>(self, v: u64) -> std::result::Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_i64<E>(self, v: i64) -> std::result::Result<bool, E> {
            Ok(v != 0)
        }
    }
    d.deserialize_any(V)
}

/// One `annotations[]` entry.
#[derive(Clone, Debug, Deserialize)]
pub struct Annotation {
    #[serde(default)]
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    #[serde(default)]
    pub area: f64,
    #[serde(default, deserialize_with = "de_bool_int")]
    pub iscrowd: bool,
    #[serde(default, deserialize_with = "de_bool_int")]
    pub ignore: bool,
    #[serde(default)]
    pub segmentation: Segmentation,
}

/// The top-level instances file.
#[derive(Debug, Deserialize)]
pub struct CocoFile {
    pub images: Vec<ImageInfo>,
    #[serde(default)]
    pub annotations: Vec<Annotation>,
    pub categories: Vec<Category>,
}

/// Counters of everything suspicious found while loading (and a few example messages).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Problems {
    /// Boxes extending past the image, clipped to it.
    pub boxes_clipped: usize,
    /// Annotations dropped as mmdet does: no overlap with the image, area <= 0, w < 1 or h < 1.
    pub anns_dropped: usize,
    /// Polygons with fewer than 3 points or an odd number of coordinates, dropped.
    pub degenerate_polygons: usize,
    /// Annotations whose category id is not in `categories`.
    pub unknown_category: usize,
    /// Annotations whose image id is not in `images`.
    pub unknown_image: usize,
    /// Non-crowd annotations without any usable segmentation.
    pub missing_segmentation: usize,
    /// Duplicate image ids.
    pub duplicate_image_ids: usize,
    /// Images smaller than 32 px on the shorter side.
    pub tiny_images: usize,
    /// Up to 20 example messages.
    pub examples: Vec<String>,
}

impl Problems {
    fn note(&mut self, msg: impl FnOnce() -> String) {
        if self.examples.len() < 20 {
            self.examples.push(msg());
        }
    }
    pub fn total(&self) -> usize {
        self.boxes_clipped
            + self.anns_dropped
            + self.degenerate_polygons
            + self.unknown_category
            + self.unknown_image
            + self.missing_segmentation
            + self.duplicate_image_ids
    }
}

/// Training/test targets of one image in original image coordinates, after mmdet's
/// `_parse_ann_info` filtering.
#[derive(Clone, Debug, Default)]
pub struct ImageAnns {
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<i64>,
    /// Index into `CocoDataset::anns` of each kept (non-crowd) annotation.
    pub ann_index: Vec<usize>,
    /// Crowd regions (`iscrowd=1`): ignored boxes.
    pub ignore: Vec<[f32; 4]>,
}

/// A loaded COCO instances file plus the image directory.
#[derive(Debug)]
pub struct CocoDataset {
    pub ann_file: PathBuf,
    pub image_dir: PathBuf,
    pub images: Vec<ImageInfo>,
    /// Sorted by id; label `k` is `categories[k]`.
    pub categories: Vec<Category>,
    pub anns: Vec<Annotation>,
    /// Category id -> contiguous label 0..K-1.
    pub cat_to_label: HashMap<i64, usize>,
    /// Annotation indices per image (same order as `images`).
    pub img_anns: Vec<Vec<u32>>,
    /// Parsed targets per image (mmdet filtering applied, boxes clipped).
    pub targets: Vec<ImageAnns>,
    pub problems: Problems,
}

/// Parse an instances JSON file (typed, no intermediate `Value`); errors give line and column.
pub fn parse_file(path: &Path) -> Result<CocoFile> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    parse_bytes(&bytes, path)
}

/// Parse instances JSON from memory (`path` names the source in errors).
pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<CocoFile> {
    serde_json::from_slice(bytes).map_err(|e| DatasetError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        msg: e.to_string(),
    })
}

impl CocoDataset {
    /// Load `ann_file` whose `file_name`s are relative to `image_dir`.
    pub fn load(ann_file: impl AsRef<Path>, image_dir: impl AsRef<Path>) -> Result<Self> {
        let f = parse_file(ann_file.as_ref())?;
        Ok(Self::from_file(f, ann_file.as_ref(), image_dir.as_ref()))
    }

    /// Build from a parsed file.
    pub fn from_file(f: CocoFile, ann_file: &Path, image_dir: &Path) -> Self {
        let CocoFile {
            images,
            mut annotations,
            mut categories,
        } = f;
        categories.sort_by_key(|c| c.id);
        let cat_to_label: HashMap<i64, usize> = categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        let mut problems = Problems::default();
        let mut id_to_idx = HashMap::with_capacity(images.len());
        for (i, im) in images.iter().enumerate() {
            if id_to_idx.insert(im.id, i).is_some() {
                problems.duplicate_image_ids += 1;
                problems.note(|| format!("duplicate image id {}", im.id));
            }
            if im.width.min(im.height) < 32 {
                problems.tiny_images += 1;
            }
        }
        let mut img_anns = vec![Vec::new(); images.len()];
        let mut targets = vec![ImageAnns::default(); images.len()];
        for (ai, a) in annotations.iter_mut().enumerate() {
            let Some(&ii) = id_to_idx.get(&a.image_id) else {
                problems.unknown_image += 1;
                problems
                    .note(|| format!("annotation {} refers to unknown image {}", a.id, a.image_id));
                continue;
            };
            img_anns[ii].push(ai as u32);
            // Degenerate polygons would make pycocotools produce garbage; drop and count them.
            if let Segmentation::Polygons(ps) = &mut a.segmentation {
                let before = ps.len();
                ps.retain(|p| p.len() >= 6 && p.len() % 2 == 0);
                if ps.len() != before {
                    problems.degenerate_polygons += before - ps.len();
                    let id = a.id;
                    problems.note(|| {
                        format!(
                            "annotation {id}: {} degenerate polygon(s) dropped",
                            before - ps.len()
                        )
                    });
                }
            }
            let im = &images[ii];
            if a.ignore {
                continue;
            }
            let [x1, y1, w, h] = a.bbox;
            let (iw, ih) = (im.width as f64, im.height as f64);
            let inter_w = ((x1 + w).min(iw) - x1.max(0.0)).max(0.0);
            let inter_h = ((y1 + h).min(ih) - y1.max(0.0)).max(0.0);
            if inter_w * inter_h == 0.0 || a.area <= 0.0 || w < 1.0 || h < 1.0 {
                problems.anns_dropped += 1;
                let id = a.id;
                problems.note(|| {
                    format!(
                        "annotation {id} dropped (bbox {:?}, area {})",
                        a.bbox, a.area
                    )
                });
                continue;
            }
            let Some(&label) = cat_to_label.get(&a.category_id) else {
                problems.unknown_category += 1;
                let id = a.id;
                problems.note(|| format!("annotation {id}: unknown category {}", a.category_id));
                continue;
            };
            let (x2, y2) = (x1 + w, y1 + h);
            let clipped = [
                x1.clamp(0.0, iw),
                y1.clamp(0.0, ih),
                x2.clamp(0.0, iw),
                y2.clamp(0.0, ih),
            ];
            if clipped != [x1, y1, x2, y2] {
                problems.boxes_clipped += 1;
                let id = a.id;
                problems.note(|| {
                    format!(
                        "annotation {id}: box {:?} clipped to image {}x{} ({})",
                        a.bbox, im.width, im.height, im.file_name
                    )
                });
            }
            let bb = clipped.map(|v| v as f32);
            let t = &mut targets[ii];
            if a.iscrowd {
                t.ignore.push(bb);
            } else {
                if matches!(&a.segmentation, Segmentation::None)
                    || matches!(&a.segmentation, Segmentation::Polygons(p) if p.is_empty())
                {
                    problems.missing_segmentation += 1;
                    let id = a.id;
                    problems.note(|| format!("annotation {id}: no usable segmentation"));
                }
                t.boxes.push(bb);
                t.labels.push(label as i64);
                t.ann_index.push(ai);
            }
        }
        CocoDataset {
            ann_file: ann_file.to_path_buf(),
            image_dir: image_dir.to_path_buf(),
            images,
            categories,
            anns: annotations,
            cat_to_label,
            img_anns,
            targets,
            problems,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// Category id of contiguous label `label`.
    pub fn label_to_cat(&self, label: usize) -> i64 {
        self.categories[label].id
    }

    /// Class names in label order.
    pub fn class_names(&self) -> Vec<String> {
        self.categories.iter().map(|c| c.name.clone()).collect()
    }

    /// Path of image `i`.
    pub fn image_path(&self, i: usize) -> PathBuf {
        self.image_dir.join(&self.images[i].file_name)
    }

    /// Indices of the training images, as mmdet `CocoDataset._filter_imgs` (filter_empty_gt,
    /// min_size 32): an image is kept when it has at least one annotation of a known category
    /// (mmdet counts crowd annotations here too) and its shorter side is >= 32.
    pub fn train_indices(&self) -> Vec<usize> {
        (0..self.images.len())
            .filter(|&i| {
                let im = &self.images[i];
                let has = self.img_anns[i].iter().any(|&a| {
                    self.cat_to_label
                        .contains_key(&self.anns[a as usize].category_id)
                });
                has && im.width.min(im.height) >= 32
            })
            .collect()
    }

    /// Masks of image `i`'s kept annotations on the original `width x height` canvas.
    pub fn masks(&self, i: usize, mode: MaskMode) -> Masks {
        let im = &self.images[i];
        let (w, h) = (im.width as usize, im.height as usize);
        let masks = self.targets[i]
            .ann_index
            .iter()
            .map(|&ai| instance_mask(&self.anns[ai].segmentation, w, h, mode))
            .collect();
        Masks {
            width: w,
            height: h,
            masks,
        }
    }
}

/// The mask of one segmentation on a `w x h` canvas (mmdet `_poly2mask` for bitmaps).
pub fn instance_mask(seg: &Segmentation, w: usize, h: usize, mode: MaskMode) -> InstanceMask {
    match (seg, mode) {
        (Segmentation::Polygons(ps), MaskMode::Polygon) => InstanceMask::Polygons(ps.clone()),
        (Segmentation::Polygons(ps), MaskMode::Bitmap) => InstanceMask::Bitmap(
            BitMask::from_dense(&raster::polygons_to_mask(ps, h, w), w, h),
        ),
        (Segmentation::Rle { .. }, _) => {
            let (counts, rh, rw) = seg.rle_counts().unwrap();
            // pycocotools decodes at the RLE's own size; it equals the image size in valid data.
            let dense = raster::decode_union(&[counts], rh, rw);
            let b = BitMask::from_dense(&dense, rw, rh);
            InstanceMask::Bitmap(b)
        }
        (Segmentation::None, _) => InstanceMask::Bitmap(BitMask::default()),
    }
}
