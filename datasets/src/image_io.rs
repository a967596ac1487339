//! Image decoding (JPEG, PNG) to 8-bit RGB without applying EXIF orientation (COCO annotations
//! refer to the stored pixel grid), and the cv2-exact geometric primitives used by the
//! pipelines: bilinear resize (cv2.INTER_LINEAR on 8-bit images), nearest resize
//! (cv2.INTER_NEAREST), horizontal flip and crop.

use std::path::Path;

use crate::error::{DatasetError, Result};

/// An 8-bit image, row-major, `c` interleaved channels (3 = RGB, 1 = label map / mask).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    pub fn new(w: usize, h: usize, c: usize) -> Self {
        Image8 {
            w,
            h,
            c,
            data: vec![0; w * h * c],
        }
    }
    pub fn from_vec(w: usize, h: usize, c: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), w * h * c, "image buffer size");
        Image8 { w, h, c, data }
    }
    #[inline]
    pub fn px(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.w + x) * self.c;
        &self.data[i..i + self.c]
    }
}

/// Read and decode an image file to RGB. Missing and truncated files get their own errors.
pub fn read_rgb(path: &Path) -> Result<Image8> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DatasetError::MissingImage(path.to_path_buf()))
        }
        Err(e) => return Err(DatasetError::io(path, e)),
    };
    decode_rgb(&bytes, path)
}

/// Whether a JPEG stream ends with its EOI marker (decoders silently fill truncated scans with
/// grey, so truncation is checked explicitly; a few bytes of trailing garbage are tolerated).
fn jpeg_complete(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decode image bytes (JPEG or PNG) to RGB; grayscale, grey+alpha, RGBA, 16-bit and CMYK inputs
/// are converted. `path` only names the file in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path) -> Result<Image8> {
    let is_jpeg = bytes.len() >= 3 && bytes[..3] == [0xFF, 0xD8, 0xFF];
    if is_jpeg && !jpeg_complete(bytes) {
        return Err(DatasetError::TruncatedImage(path.to_path_buf()));
    }
    let img = image::load_from_memory(bytes).map_err(|e| match e {
        image::ImageError::IoError(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DatasetError::TruncatedImage(path.to_path_buf())
        }
        other => {
            let msg = other.to_string();
            if msg.contains("EOF")
                || msg.to_lowercase().contains("truncat")
                || msg.contains("end of")
            {
                DatasetError::TruncatedImage(path.to_path_buf())
            } else {
                DatasetError::Decode {
                    path: path.to_path_buf(),
                    msg,
                }
            }
        }
    })?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok(Image8::from_vec(w, h, 3, rgb.into_raw()))
}

/// Read a single-channel 8-bit PNG label map (values kept as stored, no palette conversion).
pub fn read_label(path: &Path) -> Result<Image8> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DatasetError::MissingImage(path.to_path_buf()))
        }
        Err(e) => return Err(DatasetError::io(path, e)),
    };
    let img = image::load_from_memory(&bytes).map_err(|e| DatasetError::Decode {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    // Palette PNGs decode to RGB in `image`; ADE labels are plain grayscale, so luma8 keeps values.
    let l = img.into_luma8();
    let (w, h) = (l.width() as usize, l.height() as usize);
    Ok(Image8::from_vec(w, h, 1, l.into_raw()))
}

/// mmcv `rescale_size`: keep-ratio target size for scale `(a, b)` (order irrelevant: the larger
/// bounds the long side, the smaller the short side). Returns `((new_w, new_h), factor)`.
pub fn rescale_size(w: usize, h: usize, scale: (usize, usize)) -> ((usize, usize), f64) {
    let long = scale.0.max(scale.1) as f64;
    let short = scale.0.min(scale.1) as f64;
    let f = (long / w.max(h) as f64).min(short / w.min(h) as f64);
    (
        ((w as f64 * f + 0.5) as usize, (h as f64 * f + 0.5) as usize),
        f,
    )
}

const COEF_BITS: i32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// cv2 `saturate_cast<short>(float)`: round half to even (lrint), saturate.
#[inline]
fn round_i16(v: f32) -> i32 {
    (v.round_ties_even() as i32).clamp(-32768, 32767)
}

/// Source offsets and fixed-point weights of cv2's linear resize along one axis.
fn linear_tables(src: usize, dst: usize) -> (Vec<usize>, Vec<[i32; 2]>) {
    let scale = 1.0 / (dst as f64 / src as f64);
    let mut ofs = Vec::with_capacity(dst);
    let mut wts = Vec::with_capacity(dst);
    for d in 0..dst {
        let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
        let mut s = f.floor() as i64;
        f -= s as f32;
        if s < 0 {
            f = 0.0;
            s = 0;
        }
        if s >= src as i64 - 1 {
            f = 0.0;
            s = src as i64 - 1;
        }
        ofs.push(s as usize);
        wts.push([round_i16((1.0 - f) * COEF_SCALE), round_i16(f * COEF_SCALE)]);
    }
    (ofs, wts)
}

/// cv2.resize(src, (dw, dh), interpolation=cv2.INTER_LINEAR) on an 8-bit image: half-pixel
/// centres, 11-bit fixed-point weights, the vertical pass rounded as cv2's SIMD path does
/// (`((b0*(S0>>4))>>16) + ((b1*(S1>>4))>>16) + 2) >> 2`), and cv2's switch to INTER_AREA for an
/// exact 2x downscale.
pub fn resize_bilinear(src: &Image8, dw: usize, dh: usize) -> Image8 {
    let c = src.c;
    if dw == src.w && dh == src.h {
        return src.clone();
    }
    if dw * 2 == src.w && dh * 2 == src.h {
        return area_half(src);
    }
    let (xofs, xw) = linear_tables(src.w, dw);
    let (yofs, yw) = linear_tables(src.h, dh);
    let mut out = Image8::new(dw, dh, c);
    let sw = src.w;
    // Per output column: source offsets of both taps (already times `c`) and weights.
    let xtab: Vec<(usize, usize, i32, i32)> = (0..dw)
        .map(|dx| {
            let sx = xofs[dx];
            (sx * c, (sx + 1).min(sw - 1) * c, xw[dx][0], xw[dx][1])
        })
        .collect();
    let hrow = |y: usize, buf: &mut Vec<i32>| {
        let row = &src.data[y * sw * c..(y + 1) * sw * c];
        buf.clear();
        buf.resize(dw * c, 0);
        if c == 3 {
            for (o, &(s0, s1, a0, a1)) in buf.chunks_exact_mut(3).zip(&xtab) {
                let (p, q) = (&row[s0..s0 + 3], &row[s1..s1 + 3]);
                o[0] = p[0] as i32 * a0 + q[0] as i32 * a1;
                o[1] = p[1] as i32 * a0 + q[1] as i32 * a1;
                o[2] = p[2] as i32 * a0 + q[2] as i32 * a1;
            }
        } else {
            for (o, &(s0, s1, a0, a1)) in buf.chunks_exact_mut(c).zip(&xtab) {
                for k in 0..c {
                    o[k] = row[s0 + k] as i32 * a0 + row[s1 + k] as i32 * a1;
                }
            }
        }
    };
    let mut r0 = Vec::with_capacity(dw * c);
    let mut r1 = Vec::with_capacity(dw * c);
    let (mut y0c, mut y1c) = (usize::MAX, usize::MAX);
    for dy in 0..dh {
        let sy = yofs[dy];
        let sy1 = (sy + 1).min(src.h - 1);
        // Reuse horizontally resized rows between consecutive output rows, as cv2 does.
        if y0c != sy {
            if y1c == sy {
                std::mem::swap(&mut r0, &mut r1);
                y0c = sy;
                y1c = usize::MAX;
            } else {
                hrow(sy, &mut r0);
                y0c = sy;
            }
        }
        if y1c != sy1 {
            hrow(sy1, &mut r1);
            y1c = sy1;
        }
        let [b0, b1] = yw[dy];
        let orow = &mut out.data[dy * dw * c..(dy + 1) * dw * c];
        for ((o, &a), &b) in orow.iter_mut().zip(&r0).zip(&r1) {
            let v = (((b0 * (a >> 4)) >> 16) + ((b1 * (b >> 4)) >> 16) + 2) >> 2;
            *o = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// cv2's fast INTER_AREA for an exact 2x downscale: rounded mean of each 2x2 block.
fn area_half(src: &Image8) -> Image8 {
    let (dw, dh, c) = (src.w / 2, src.h / 2, src.c);
    let mut out = Image8::new(dw, dh, c);
    for y in 0..dh {
        for x in 0..dw {
            for k in 0..c {
                let p = |xx: usize, yy: usize| src.data[(yy * src.w + xx) * c + k] as u32;
                let s = p(2 * x, 2 * y)
                    + p(2 * x + 1, 2 * y)
                    + p(2 * x, 2 * y + 1)
                    + p(2 * x + 1, 2 * y + 1);
                out.data[(y * dw + x) * c + k] = ((s + 2) >> 2) as u8;
            }
        }
    }
    out
}

/// cv2 INTER_NEAREST source index table: `min(floor(d * src/dst), src-1)`.
pub fn nearest_table(src: usize, dst: usize) -> Vec<usize> {
    let ifx = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| ((d as f64 * ifx).floor() as usize).min(src - 1))
        .collect()
}

/// cv2.resize(src, (dw, dh), interpolation=cv2.INTER_NEAREST).
pub fn resize_nearest(src: &Image8, dw: usize, dh: usize) -> Image8 {
    let c = src.c;
    let xt = nearest_table(src.w, dw);
    let yt = nearest_table(src.h, dh);
    let mut out = Image8::new(dw, dh, c);
    for (dy, &sy) in yt.iter().enumerate() {
        let srow = &src.data[sy * src.w * c..(sy + 1) * src.w * c];
        let orow = &mut out.data[dy * dw * c..(dy + 1) * dw * c];
        for (dx, &sx) in xt.iter().enumerate() {
            orow[dx * c..dx * c + c].copy_from_slice(&srow[sx * c..sx * c + c]);
        }
    }
    out
}

/// Mirror left-right (mmcv imflip 'horizontal').
pub fn flip_h(src: &Image8) -> Image8 {
    let c = src.c;
    let mut out = Image8::new(src.w, src.h, c);
    for y in 0..src.h {
        let srow = &src.data[y * src.w * c..(y + 1) * src.w * c];
        let orow = &mut out.data[y * src.w * c..(y + 1) * src.w * c];
        for x in 0..src.w {
            let ox = src.w - 1 - x;
            orow[ox * c..ox * c + c].copy_from_slice(&srow[x * c..x * c + c]);
        }
    }
    out
}

/// Crop `[x0, x0+w) x [y0, y0+h)` (must lie inside the image).
pub fn crop(src: &Image8, x0: usize, y0: usize, w: usize, h: usize) -> Image8 {
    let c = src.c;
    let mut out = Image8::new(w, h, c);
    for y in 0..h {
        let s = ((y0 + y) * src.w + x0) * c;
        out.data[y * w * c..(y + 1) * w * c].copy_from_slice(&src.data[s..s + w * c]);
    }
    out
}

/// Pad bottom/right to `(w, h)` with `val`.
pub fn pad_to(src: &Image8, w: usize, h: usize, val: u8) -> Image8 {
    let c = src.c;
    let mut out = Image8::from_vec(w, h, c, vec![val; w * h * c]);
    for y in 0..src.h.min(h) {
        let n = src.w.min(w) * c;
        out.data[y * w * c..y * w * c + n]
            .copy_from_slice(&src.data[y * src.w * c..y * src.w * c + n]);
    }
    out
}
