//! Pictures of predictions, one path per kind for every caller (`cnx predict`, the training
//! tasks' drawings for `cnx demo` / `cnx train`): detections as boxes, labels, scores and
//! translucent masks; segmentations as the image blended with class colours (ignored pixels
//! left as they are), with a legend or beside the ground truth.

use cnx_datasets::classes::{ADE20K_CLASSES, ADE20K_PALETTE};
use cnx_datasets::draw;
use cnx_datasets::image_io::Image8;
use cnx_heads::structures::Detections;
use image::{Rgb, RgbImage};
use tch::{Device, Kind};

/// `img` with the detections scoring at least `score_thr` drawn (class names from `names`).
pub fn detections(img: &Image8, d: &Detections, names: &[String], score_thr: f64) -> RgbImage {
    let host =
        |t: &tch::Tensor, k: Kind| t.to_device(Device::Cpu).to_kind(k).contiguous().view([-1]);
    let b = Vec::<f32>::try_from(host(&d.boxes, Kind::Float)).unwrap_or_default();
    let s = Vec::<f32>::try_from(host(&d.scores, Kind::Float)).unwrap_or_default();
    let l = Vec::<i64>::try_from(host(&d.labels, Kind::Int64)).unwrap_or_default();
    let masks = d
        .masks
        .as_ref()
        .and_then(|m| Vec::<u8>::try_from(host(m, Kind::Uint8)).ok());
    let hw = img.h * img.w;
    let inst: Vec<draw::Instance> = (0..s.len())
        .filter(|&k| s[k] as f64 >= score_thr)
        .map(|k| draw::Instance {
            bbox: [b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]],
            label: l[k] as usize,
            score: Some(s[k]),
            mask: masks.as_ref().map(|m| &m[k * hw..(k + 1) * hw]),
        })
        .collect();
    let mut canvas = draw::to_rgb_image(img);
    draw::draw_instances(&mut canvas, &inst, names);
    canvas
}

/// `img` with each pixel blended 50/50 with its class colour (`labels` row-major class indices;
/// 255 = ignore, left as is).
pub fn blend_labels(img: &Image8, labels: &[u8]) -> RgbImage {
    let (w, h) = (img.w as u32, img.h as u32);
    let mut out = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let s = img.px(x as usize, y as usize);
            let l = labels[(y * w + x) as usize];
            let px = if l == 255 {
                [s[0], s[1], s[2]]
            } else {
                let c = class_color(l as usize);
                [0, 1, 2].map(|k| ((s[k] as u16 + c[k] as u16) / 2) as u8)
            };
            out.put_pixel(x, y, Rgb(px));
        }
    }
    out
}

/// Image | prediction | ground truth, side by side (the training tasks' drawings).
pub fn segmentation_panels(img: &Image8, pred: &[u8], gt: &[u8]) -> RgbImage {
    let (w, h) = (img.w as u32, img.h as u32);
    let mut out = RgbImage::new(3 * w, h);
    image::imageops::replace(&mut out, &draw::to_rgb_image(img), 0, 0);
    image::imageops::replace(&mut out, &blend_labels(img, pred), w as i64, 0);
    image::imageops::replace(&mut out, &blend_labels(img, gt), 2 * w as i64, 0);
    out
}

/// A class's name: the model's own, else ADE20K's, else its index.
pub fn class_name(c: usize, names: &[String]) -> String {
    names
        .get(c)
        .cloned()
        .or_else(|| ADE20K_CLASSES.get(c).map(|s| s.to_string()))
        .unwrap_or_else(|| c.to_string())
}

/// A class's colour: ADE20K's palette for its 150 classes, the generic palette beyond.
pub fn class_color(c: usize) -> [u8; 3] {
    ADE20K_PALETTE
        .get(c)
        .copied()
        .unwrap_or_else(|| draw::palette(c))
}

/// The image with each pixel blended 50/50 with its class colour, plus a legend panel on the
/// right listing the classes present by decreasing area.
pub fn overlay(img: &Image8, pred: &[u8], names: &[String]) -> RgbImage {
    let (w, h) = (img.w as u32, img.h as u32);
    let mut counts = [0usize; 256];
    for &p in pred {
        counts[p as usize] += 1;
    }
    let mut present: Vec<usize> = (0..256).filter(|&c| counts[c] > 0).collect();
    present.sort_by_key(|&c| std::cmp::Reverse(counts[c]));
    let legend_w = 240u32;
    let row = 20i32;
    let mut out = RgbImage::from_pixel(w + legend_w, h.max(row as u32 * 2), Rgb([255, 255, 255]));
    image::imageops::replace(&mut out, &blend_labels(img, pred), 0, 0);
    let rows = (out.height() as i32 / row - 1).max(1) as usize;
    let total = pred.len().max(1) as f64;
    for (k, &c) in present.iter().take(rows).enumerate() {
        let text = if k + 1 == rows && present.len() > rows {
            format!("+{} more classes", present.len() - rows + 1)
        } else {
            format!(
                "{} {:.1}%",
                class_name(c, names),
                100.0 * counts[c] as f64 / total
            )
        };
        draw::draw_label(
            &mut out,
            w as i32 + 6,
            (k as i32 + 1) * row + 2,
            &text,
            class_color(c),
            14.0,
        );
    }
    out
}
