//! Synthetic datasets the project generates itself, so demos and tests run the real loaders on
//! real files: [`coco`] writes COCO instance JSON + JPEGs, [`ade`] an ADEChallengeData2016-style
//! tree of JPEGs and label PNGs. Shapes of six classes with a clear colour/shape identity
//! (circle, rectangle, triangle, ellipse, star, ring), varied sizes, aspect ratios and rotations,
//! several per image with occlusion, and crowd regions (clusters of small shapes, `iscrowd=1`
//! with uncompressed RLE).
//!
//! Annotations are derived from the painted label map: each instance's polygon traces the
//! outline of its visible pixels along pixel corners (all outline loops joined in one polygon
//! by back-and-forth connectors, which cancel in pycocotools' even-odd rasterization), so
//! pycocotools rasterizes exactly the pixels drawn for the instance.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{DatasetError, Result};
use crate::raster;

/// Class names of the synthetic shape classes (category ids 1..=6).
pub const SHAPE_CLASSES: [&str; 6] = ["circle", "rectangle", "triangle", "ellipse", "star", "ring"];
const SHAPE_COLORS: [[u8; 3]; 6] = [
    [220, 40, 40],
    [40, 180, 60],
    [40, 80, 230],
    [235, 205, 40],
    [205, 50, 205],
    [40, 205, 215],
];
/// Class names of the synthetic ADE set: label 0 = other, 1 = sky, 2 = floor, 3.. = shapes.
pub const ADE_CLASSES: [&str; 8] = [
    "sky",
    "floor",
    "circle",
    "rectangle",
    "triangle",
    "ellipse",
    "star",
    "ring",
];

/// What [`coco`] / [`ade`] wrote.
#[derive(Clone, Debug, Default)]
pub struct SynthSummary {
    pub train_images: usize,
    pub val_images: usize,
    pub annotations: usize,
    pub crowd: usize,
    pub files: Vec<PathBuf>,
}

/// Amodal outline of one shape: a polygon (even-odd; rings carry their hole).
fn shape_polygon(class: usize, cx: f64, cy: f64, r: f64, aspect: f64, rot: f64) -> Vec<f64> {
    let (s, c) = rot.sin_cos();
    let tf = |x: f64, y: f64| -> [f64; 2] { [cx + x * c - y * s, cy + x * s + y * c] };
    let mut pts: Vec<[f64; 2]> = Vec::new();
    let circle = |rx: f64, ry: f64, n: usize, rev: bool| -> Vec<[f64; 2]> {
        (0..n)
            .map(|i| {
                let k = if rev { n - i } else { i } % n;
                let t = k as f64 / n as f64 * std::f64::consts::TAU;
                tf(rx * t.cos(), ry * t.sin())
            })
            .collect()
    };
    match class {
        0 => pts = circle(r, r, 48, false),
        1 => {
            let (hw, hh) = (r * aspect.sqrt(), r / aspect.sqrt());
            for (x, y) in [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)] {
                pts.push(tf(x, y));
            }
        }
        2 => {
            for k in 0..3 {
                let t = k as f64 / 3.0 * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
                pts.push(tf(r * aspect.sqrt() * t.cos(), r / aspect.sqrt() * t.sin()));
            }
        }
        3 => {
            pts = circle(
                r * aspect.sqrt().max(1.3),
                r / aspect.sqrt().max(1.3),
                48,
                false,
            )
        }
        4 => {
            for k in 0..10 {
                let t = k as f64 / 10.0 * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
                let rr = if k % 2 == 0 { r } else { r * 0.45 };
                pts.push(tf(rr * t.cos(), rr * t.sin()));
            }
        }
        _ => {
            let outer = circle(r, r, 48, false);
            let inner = circle(r * 0.55, r * 0.55, 40, true);
            pts.extend(&outer);
            pts.push(outer[0]);
            pts.extend(&inner);
            pts.push(inner[0]);
            pts.push(outer[0]);
        }
    }
    pts.into_iter().flatten().collect()
}

/// Outline of a binary mask (row-major `w x h`) as one polygon with vertices on pixel corners;
/// pycocotools rasterizes it back to exactly `mask`. Empty mask -> empty polygon.
pub fn mask_outline_polygon(mask: &[u8], w: usize, h: usize) -> Vec<f64> {
    use std::collections::HashMap;
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize] != 0
    };
    // Directed boundary edges with the interior on the right (image y axis points down).
    let mut out: HashMap<(i64, i64), Vec<(i64, i64)>> = HashMap::new();
    let mut n_edges = 0;
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if !inside(x, y) {
                continue;
            }
            let mut add = |a: (i64, i64), b: (i64, i64)| {
                out.entry(a).or_default().push(b);
                n_edges += 1;
            };
            if !inside(x, y - 1) {
                add((x, y), (x + 1, y));
            }
            if !inside(x + 1, y) {
                add((x + 1, y), (x + 1, y + 1));
            }
            if !inside(x, y + 1) {
                add((x + 1, y + 1), (x, y + 1));
            }
            if !inside(x - 1, y) {
                add((x, y + 1), (x, y));
            }
        }
    }
    if n_edges == 0 {
        return Vec::new();
    }
    let mut starts: Vec<(i64, i64)> = out.keys().copied().collect();
    starts.sort_unstable_by_key(|&(x, y)| (y, x));
    let mut loops: Vec<Vec<(i64, i64)>> = Vec::new();
    for s in starts {
        while out.get(&s).is_some_and(|v| !v.is_empty()) {
            let mut lp = vec![s];
            let mut cur = s;
            loop {
                let nexts = out.get_mut(&cur).unwrap();
                let nxt = nexts.pop().unwrap();
                if nxt == s {
                    break;
                }
                lp.push(nxt);
                cur = nxt;
            }
            // Drop collinear vertices.
            let n = lp.len();
            let simp: Vec<(i64, i64)> = (0..n)
                .filter(|&i| {
                    let (p, c, q) = (lp[(i + n - 1) % n], lp[i], lp[(i + 1) % n]);
                    (c.0 - p.0) * (q.1 - c.1) - (c.1 - p.1) * (q.0 - c.0) != 0
                })
                .map(|i| lp[i])
                .collect();
            loops.push(if simp.len() >= 3 { simp } else { lp });
        }
    }
    // Join: loop 0, then for every other loop go there and back (the connectors cancel).
    let mut poly: Vec<(i64, i64)> = Vec::new();
    let first = loops[0].clone();
    poly.extend(&first);
    poly.push(first[0]);
    for lp in &loops[1..] {
        poly.extend(lp);
        poly.push(lp[0]);
        poly.push(first[0]);
    }
    poly.into_iter()
        .flat_map(|(x, y)| [x as f64, y as f64])
        .collect()
}

struct Painted {
    rgb: Vec<u8>,
    /// Instance id per pixel (0 = none), ids index `objects` + 1.
    inst: Vec<u16>,
    /// (class, is_crowd) per instance.
    objects: Vec<(usize, bool)>,
}

fn background(rng: &mut ChaCha8Rng, w: usize, h: usize) -> Vec<u8> {
    let base: [f64; 3] = std::array::from_fn(|_| rng.gen_range(90.0..170.0));
    let gx: [f64; 3] = std::array::from_fn(|_| rng.gen_range(-50.0..50.0));
    let gy: [f64; 3] = std::array::from_fn(|_| rng.gen_range(-50.0..50.0));
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for k in 0..3 {
                let v = base[k] * 0.8
                    + 25.0
                    + gx[k] * x as f64 / w as f64
                    + gy[k] * y as f64 / h as f64
                    + rng.gen_range(-10.0..10.0);
                rgb[(y * w + x) * 3 + k] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    rgb
}

fn paint_mask(p: &mut Painted, mask: &[u8], color: [u8; 3], id: u16, rng: &mut ChaCha8Rng) {
    for (i, &m) in mask.iter().enumerate() {
        if m != 0 {
            p.inst[i] = id;
            for k in 0..3 {
                let v = color[k] as i32 + rng.gen_range(-12..=12);
                p.rgb[i * 3 + k] = v.clamp(0, 255) as u8;
            }
        }
    }
}

/// Paint one image's objects; `crowd_p` = probability of a crowd cluster.
fn paint_image(rng: &mut ChaCha8Rng, w: usize, h: usize, crowd_p: f64, bg: Vec<u8>) -> Painted {
    let mut p = Painted {
        rgb: bg,
        inst: vec![0; w * h],
        objects: Vec::new(),
    };
    let min_side = w.min(h) as f64;
    if rng.gen::<f64>() < crowd_p {
        // A crowd: a tight cluster of small shapes of one class, annotated as one region.
        let class = rng.gen_range(0..SHAPE_CLASSES.len());
        let (cx, cy) = (
            rng.gen_range(0.2..0.8) * w as f64,
            rng.gen_range(0.2..0.8) * h as f64,
        );
        let spread = min_side * rng.gen_range(0.08..0.15);
        let mut union = vec![0u8; w * h];
        for _ in 0..rng.gen_range(5..10) {
            let r = min_side * rng.gen_range(0.025..0.045);
            let poly = shape_polygon(
                class,
                cx + rng.gen_range(-spread..spread),
                cy + rng.gen_range(-spread..spread),
                r,
                rng.gen_range(0.7..1.4),
                rng.gen_range(0.0..6.3),
            );
            for (u, m) in union
                .iter_mut()
                .zip(raster::polygons_to_mask(&[poly], h, w))
            {
                *u |= m;
            }
        }
        let color = SHAPE_COLORS[class];
        p.objects.push((class, true));
        let id = p.objects.len() as u16;
        paint_mask(&mut p, &union, color, id, rng);
    }
    let n = rng.gen_range(2..=6);
    for _ in 0..n {
        for _attempt in 0..8 {
            let class = rng.gen_range(0..SHAPE_CLASSES.len());
            let r = min_side * rng.gen_range(0.06..0.22);
            let aspect = rng.gen_range(0.5..2.0);
            let cx = rng.gen_range(-0.05..1.05) * w as f64;
            let cy = rng.gen_range(-0.05..1.05) * h as f64;
            let poly = shape_polygon(class, cx, cy, r, aspect, rng.gen_range(0.0..6.3));
            let m = raster::polygons_to_mask(&[poly], h, w);
            let area: usize = m.iter().map(|&v| v as usize).sum();
            if area < 150 {
                continue;
            }
            // Keep at least half of every earlier instance visible.
            let mut hidden = vec![0usize; p.objects.len() + 1];
            let mut total = vec![0usize; p.objects.len() + 1];
            for (i, &id) in p.inst.iter().enumerate() {
                total[id as usize] += 1;
                if m[i] != 0 {
                    hidden[id as usize] += 1;
                }
            }
            if (1..total.len())
                .any(|k| 2 * (total[k] - hidden[k]) < total[k] || total[k] - hidden[k] < 100)
            {
                continue;
            }
            let jitter: [i32; 3] = std::array::from_fn(|_| rng.gen_range(-20..=20));
            let color = SHAPE_COLORS[class]
                .map(|c| c as i32)
                .map(|c| c.clamp(0, 255));
            let color = [0, 1, 2].map(|k| (color[k] + jitter[k]).clamp(0, 255) as u8);
            p.objects.push((class, false));
            let id = p.objects.len() as u16;
            paint_mask(&mut p, &m, color, id, rng);
            break;
        }
    }
    p
}

fn save_jpeg(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| DatasetError::io(path, e))?;
    let mut bw = std::io::BufWriter::new(f);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bw, 92)
        .encode(rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| DatasetError::Encode {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

fn save_png_l8(path: &Path, data: &[u8], w: usize, h: usize) -> Result<()> {
    image::save_buffer(path, data, w as u32, h as u32, image::ExtendedColorType::L8).map_err(|e| {
        DatasetError::Encode {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    })
}

#[derive(Serialize)]
struct OutImage {
    id: i64,
    file_name: String,
    width: usize,
    height: usize,
}
#[derive(Serialize)]
struct OutRle {
    counts: Vec<u32>,
    size: [usize; 2],
}
#[derive(Serialize)]
#[serde(untagged)]
enum OutSeg {
    Poly(Vec<Vec<f64>>),
    Rle(OutRle),
}
#[derive(Serialize)]
struct OutAnn {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: [f64; 4],
    area: f64,
    iscrowd: u8,
    segmentation: OutSeg,
}
#[derive(Serialize)]
struct OutCat {
    id: i64,
    name: String,
    supercategory: String,
}
#[derive(Serialize)]
struct OutFile {
    info: serde_json::Value,
    images: Vec<OutImage>,
    annotations: Vec<OutAnn>,
    categories: Vec<OutCat>,
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| DatasetError::io(p, e))
}

fn image_size(rng: &mut ChaCha8Rng) -> (usize, usize) {
    let long = rng.gen_range(320..=512);
    let short = rng.gen_range(256..=long.min(400));
    if rng.gen_bool(0.5) {
        (long, short)
    } else {
        (short, long)
    }
}

/// Write a synthetic COCO dataset: `out/{train,val}/*.jpg` and
/// `out/annotations/instances_{train,val}.json` (80/20 split), six shape categories.
pub fn coco(out: &Path, n_images: usize, seed: u64) -> Result<SynthSummary> {
    mkdir(&out.join("annotations"))?;
    let n_train = ((n_images as f64) * 0.8).round() as usize;
    let mut summary = SynthSummary::default();
    for (split, range) in [("train", 0..n_train), ("val", n_train..n_images)] {
        let dir = out.join(split);
        mkdir(&dir)?;
        use rayon::prelude::*;
        let per: Vec<Result<(OutImage, Vec<OutAnn>)>> = range
            .clone()
            .into_par_iter()
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1),
                );
                let (w, h) = image_size(&mut rng);
                let bg = background(&mut rng, w, h);
                let p = paint_image(&mut rng, w, h, 0.15, bg);
                let file_name = format!("{:012}.jpg", i + 1);
                save_jpeg(&dir.join(&file_name), &p.rgb, w, h)?;
                let image_id = i as i64 + 1;
                let mut anns = Vec::new();
                for (k, &(class, crowd)) in p.objects.iter().enumerate() {
                    let id = (k + 1) as u16;
                    let m: Vec<u8> = p.inst.iter().map(|&v| (v == id) as u8).collect();
                    let area: usize = m.iter().map(|&v| v as usize).sum();
                    if area == 0 {
                        continue;
                    }
                    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
                    for y in 0..h {
                        for x in 0..w {
                            if m[y * w + x] != 0 {
                                x0 = x0.min(x);
                                y0 = y0.min(y);
                                x1 = x1.max(x + 1);
                                y1 = y1.max(y + 1);
                            }
                        }
                    }
                    let segmentation = if crowd {
                        OutSeg::Rle(OutRle {
                            counts: raster::encode_mask(&m, h, w),
                            size: [h, w],
                        })
                    } else {
                        OutSeg::Poly(vec![mask_outline_polygon(&m, w, h)])
                    };
                    anns.push(OutAnn {
                        id: image_id * 100 + k as i64,
                        image_id,
                        category_id: class as i64 + 1,
                        bbox: [x0 as f64, y0 as f64, (x1 - x0) as f64, (y1 - y0) as f64],
                        area: area as f64,
                        iscrowd: crowd as u8,
                        segmentation,
                    });
                }
                Ok((
                    OutImage {
                        id: image_id,
                        file_name,
                        width: w,
                        height: h,
                    },
                    anns,
                ))
            })
            .collect();
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for r in per {
            let (im, anns) = r?;
            images.push(im);
            annotations.extend(anns);
        }
        summary.crowd += annotations.iter().filter(|a| a.iscrowd == 1).count();
        summary.annotations += annotations.len();
        if split == "train" {
            summary.train_images = images.len();
        } else {
            summary.val_images = images.len();
        }
        let file = OutFile {
            info: serde_json::json!({"description": "cnx synthetic shapes", "seed": seed}),
            images,
            annotations,
            categories: SHAPE_CLASSES
                .iter()
                .enumerate()
                .map(|(i, n)| OutCat {
                    id: i as i64 + 1,
                    name: n.to_string(),
                    supercategory: "shape".into(),
                })
                .collect(),
        };
        let path = out
            .join("annotations")
            .join(format!("instances_{split}.json"));
        let f = std::fs::File::create(&path).map_err(|e| DatasetError::io(&path, e))?;
        serde_json::to_writer(std::io::BufWriter::new(f), &file).map_err(|e| {
            DatasetError::Encode {
                path: path.clone(),
                msg: e.to_string(),
            }
        })?;
        summary.files.push(path);
    }
    Ok(summary)
}

/// Write a synthetic ADE20K-layout dataset: `out/images/{training,validation}/*.jpg`,
/// `out/annotations/{training,validation}/*.png` (labels 0..=8, 0 = other) and
/// `out/objectInfo.txt` with the class names.
pub fn ade(out: &Path, n_images: usize, seed: u64) -> Result<SynthSummary> {
    let n_train = ((n_images as f64) * 0.8).round() as usize;
    let mut summary = SynthSummary::default();
    for (split, range) in [("training", 0..n_train), ("validation", n_train..n_images)] {
        let idir = out.join("images").join(split);
        let adir = out.join("annotations").join(split);
        mkdir(&idir)?;
        mkdir(&adir)?;
        use rayon::prelude::*;
        range
            .clone()
            .into_par_iter()
            .try_for_each(|i| -> Result<()> {
                let mut rng = ChaCha8Rng::seed_from_u64(
                    seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ (i as u64 + 7),
                );
                let (w, h) = image_size(&mut rng);
                let mut bg = background(&mut rng, w, h);
                let mut label = vec![0u8; w * h];
                // Stuff: a sky band on top and a floor band at the bottom, wavy borders.
                let sky_h = rng.gen_range(0.15..0.35) * h as f64;
                let floor_h = rng.gen_range(0.6..0.85) * h as f64;
                let (ph1, ph2) = (rng.gen_range(0.0..6.3), rng.gen_range(0.0..6.3));
                for y in 0..h {
                    for x in 0..w {
                        let t = x as f64 / w as f64 * 6.0;
                        let idx = y * w + x;
                        let (lab, col) = if (y as f64) < sky_h + 8.0 * (t + ph1).sin() {
                            (1u8, [120, 170, 235])
                        } else if (y as f64) > floor_h + 8.0 * (t + ph2).sin() {
                            (2u8, [120, 85, 50])
                        } else {
                            continue;
                        };
                        label[idx] = lab;
                        for k in 0..3 {
                            bg[idx * 3 + k] =
                                (col[k] + rng.gen_range(-10..=10)).clamp(0, 255) as u8;
                        }
                    }
                }
                let p = paint_image(&mut rng, w, h, 0.0, bg);
                for (idx, &id) in p.inst.iter().enumerate() {
                    if id > 0 {
                        label[idx] = p.objects[id as usize - 1].0 as u8 + 3;
                    }
                }
                let stem = format!(
                    "ADE_{}_{:08}",
                    if split == "training" { "train" } else { "val" },
                    i + 1
                );
                save_jpeg(&idir.join(format!("{stem}.jpg")), &p.rgb, w, h)?;
                save_png_l8(&adir.join(format!("{stem}.png")), &label, w, h)
            })?;
        if split == "training" {
            summary.train_images = range.len();
        } else {
            summary.val_images = range.len();
        }
    }
    let info: String = std::iter::once("Idx\tName\n".to_string())
        .chain(
            ADE_CLASSES
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{}\t{}\n", i + 1, n)),
        )
        .collect();
    let path = out.join("objectInfo.txt");
    std::fs::write(&path, info).map_err(|e| DatasetError::io(&path, e))?;
    summary.files.push(path);
    Ok(summary)
}
