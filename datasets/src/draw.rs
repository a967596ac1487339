//! Drawing helpers shared by `cnx data show` and `cnx predict`: a colour palette, boxes,
//! translucent masks and text labels (imageproc, DejaVu Sans Mono embedded; see
//! `assets/fonts/LICENSE-DejaVu.txt`).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;

use crate::image_io::Image8;
use crate::mask::Masks;

static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// The embedded font.
pub fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT_BYTES).expect("embedded font parses")
}

/// A distinct, saturated colour for class / instance `i` (golden-ratio hue steps).
pub fn palette(i: usize) -> [u8; 3] {
    let h = (i as f64 * 0.618_033_988_75 + 0.1).fract() * 6.0;
    let (s, v) = (0.75, 0.95);
    let f = h.fract();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match h as usize {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// Convert to an `image::RgbImage` (3-channel input).
pub fn to_rgb_image(img: &Image8) -> RgbImage {
    assert_eq!(img.c, 3);
    RgbImage::from_raw(img.w as u32, img.h as u32, img.data.clone()).expect("buffer size")
}

/// Rectangle outline `[x1, y1, x2, y2]`, `thickness` px, clipped to the image.
pub fn draw_box(img: &mut RgbImage, b: [f32; 4], color: [u8; 3], thickness: u32) {
    for t in 0..thickness as i32 {
        let x = b[0].round() as i32 - t;
        let y = b[1].round() as i32 - t;
        let w = (b[2] - b[0]).round() as i32 + 2 * t;
        let h = (b[3] - b[1]).round() as i32 + 2 * t;
        if w > 0 && h > 0 {
            draw_hollow_rect_mut(img, Rect::at(x, y).of_size(w as u32, h as u32), Rgb(color));
        }
    }
}

/// Blend `color` with weight `alpha` where the row-major `mask` (same size as `img`) is set.
pub fn blend_mask(img: &mut RgbImage, mask: &[u8], color: [u8; 3], alpha: f32) {
    let w = img.width() as usize;
    for (i, &m) in mask.iter().enumerate() {
        if m != 0 {
            let p = img.get_pixel_mut((i % w) as u32, (i / w) as u32);
            for k in 0..3 {
                p.0[k] = (p.0[k] as f32 * (1.0 - alpha) + color[k] as f32 * alpha) as u8;
            }
        }
    }
}

/// Text on a filled background at `(x, y)` (top-left), clamped inside the image.
pub fn draw_label(img: &mut RgbImage, x: i32, y: i32, text: &str, bg: [u8; 3], size: f32) {
    let font = font();
    let scale = PxScale::from(size);
    let (tw, th) = text_size(scale, &font, text);
    let x = x.clamp(0, (img.width() as i32 - tw as i32 - 2).max(0));
    let y = (y - th as i32 - 3).clamp(0, (img.height() as i32 - th as i32 - 3).max(0));
    draw_filled_rect_mut(img, Rect::at(x, y).of_size(tw + 4, th + 4), Rgb(bg));
    let lum = 0.299 * bg[0] as f32 + 0.587 * bg[1] as f32 + 0.114 * bg[2] as f32;
    let fg = if lum > 140.0 {
        [0, 0, 0]
    } else {
        [255, 255, 255]
    };
    draw_text_mut(img, Rgb(fg), x + 2, y + 1, scale, &font, text);
}

/// One instance to draw.
pub struct Instance<'a> {
    pub bbox: [f32; 4],
    pub label: usize,
    pub score: Option<f32>,
    /// Row-major mask of the image's size.
    pub mask: Option<&'a [u8]>,
}

/// Draw instances (masks first, then boxes and labels), coloured by class.
pub fn draw_instances(img: &mut RgbImage, inst: &[Instance], class_names: &[String]) {
    for it in inst {
        if let Some(m) = it.mask {
            blend_mask(img, m, palette(it.label), 0.45);
        }
    }
    let size = (img.width().min(img.height()) as f32 / 40.0).clamp(11.0, 22.0);
    for it in inst {
        let c = palette(it.label);
        draw_box(img, it.bbox, c, 2);
        let name = class_names
            .get(it.label)
            .cloned()
            .unwrap_or_else(|| it.label.to_string());
        let text = match it.score {
            Some(s) => format!("{name} {s:.2}"),
            None => name,
        };
        draw_label(img, it.bbox[0] as i32, it.bbox[1] as i32, &text, c, size);
    }
}

/// Draw boxes, translucent masks and names of an annotated image (masks cropped to the image
/// when their canvas is the padded shape). Ignored (crowd) boxes are drawn dashed-grey.
pub fn draw_annotated(
    img: &Image8,
    boxes: &[[f32; 4]],
    labels: &[i64],
    masks: Option<&Masks>,
    ignore: &[[f32; 4]],
    class_names: &[String],
) -> RgbImage {
    let mut out = to_rgb_image(img);
    let dense: Vec<Vec<u8>> = match masks {
        Some(m) => (0..m.len())
            .map(|i| {
                let d = m.to_dense(i);
                let mut o = vec![0u8; img.w * img.h];
                for y in 0..img.h.min(m.height) {
                    for x in 0..img.w.min(m.width) {
                        o[y * img.w + x] = d[y * m.width + x];
                    }
                }
                o
            })
            .collect(),
        None => Vec::new(),
    };
    let inst: Vec<Instance> = boxes
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (b, &l))| Instance {
            bbox: *b,
            label: l as usize,
            score: None,
            mask: dense.get(i).map(|v| v.as_slice()),
        })
        .collect();
    draw_instances(&mut out, &inst, class_names);
    for b in ignore {
        draw_box(&mut out, *b, [128, 128, 128], 1);
        draw_label(
            &mut out,
            b[0] as i32,
            b[1] as i32,
            "crowd",
            [128, 128, 128],
            11.0,
        );
    }
    out
}
