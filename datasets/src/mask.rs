//! Instance masks kept compact through the pipeline, with mmdet 2.x semantics.
//!
//! * [`InstanceMask::Bitmap`] is mmdet's `BitmapMasks` (the default, `poly2mask=True`): the mask
//!   is rasterized once at the original image size and then flipped, resized (nearest, as
//!   mmcv.imrescale does for masks), cropped and padded pixel by pixel. Only the bounding region
//!   of the foreground is stored, so memory is proportional to the instance, not the image.
//! * [`InstanceMask::Polygons`] is mmdet's `PolygonMasks` (`poly2mask=False`): coordinates are
//!   transformed and rasterized only when a target is made.
//!
//! [`Masks::crop_and_resize`] makes the Mask R-CNN 28x28 targets exactly as
//! `BitmapMasks.crop_and_resize` (mmcv roi_align, aligned=True, sampling_ratio=0, avg, then >= 0.5)
//! and `PolygonMasks.crop_and_resize` (shift/scale into the box, pycocotools rasterization).

use crate::image_io::nearest_table;
use crate::raster;

/// A binary mask on a `canvas_w x canvas_h` canvas storing only the region
/// `[x0, x0+w) x [y0, y0+h)`; everything outside is 0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BitMask {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
    /// Row-major `h x w`, values 0/1.
    pub data: Vec<u8>,
}

impl BitMask {
    /// Compact a dense row-major `cw x ch` mask.
    pub fn from_dense(dense: &[u8], cw: usize, ch: usize) -> Self {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
        for y in 0..ch {
            let row = &dense[y * cw..(y + 1) * cw];
            if let Some(first) = row.iter().position(|&v| v != 0) {
                let last = row.iter().rposition(|&v| v != 0).unwrap();
                x0 = x0.min(first);
                x1 = x1.max(last + 1);
                y0 = y0.min(y);
                y1 = y + 1;
            }
        }
        if x0 == usize::MAX {
            return BitMask::default();
        }
        let (w, h) = (x1 - x0, y1 - y0);
        let mut data = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                data[y * w + x] = (dense[(y0 + y) * cw + x0 + x] != 0) as u8;
            }
        }
        BitMask { x0, y0, w, h, data }
    }

    /// Union of column-major RLE counts on an `h x w` canvas, decoded straight into the
    /// compact form (no full-size intermediate).
    pub fn from_rles(rles: &[Vec<u32>], h: usize, w: usize) -> Self {
        let n = h * w;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0usize, 0usize);
        for c in rles {
            raster::for_each_run(c, n, |start, len| {
                let (xa, ya) = (start / h, start % h);
                let end = start + len - 1;
                let (xb, yb) = (end / h, end % h);
                x0 = x0.min(xa);
                x1 = x1.max(xb + 1);
                if xa == xb {
                    y0 = y0.min(ya);
                    y1 = y1.max(yb + 1);
                } else {
                    y0 = 0;
                    y1 = h;
                }
            });
        }
        if x0 == usize::MAX {
            return BitMask::default();
        }
        let (bw, bh) = (x1 - x0, y1 - y0);
        let mut data = vec![0u8; bw * bh];
        for c in rles {
            raster::for_each_run(c, n, |start, len| {
                for idx in start..start + len {
                    let (x, y) = (idx / h, idx % h);
                    data[(y - y0) * bw + (x - x0)] = 1;
                }
            });
        }
        BitMask {
            x0,
            y0,
            w: bw,
            h: bh,
            data,
        }
    }

    #[inline]
    pub fn get(&self, x: usize, y: usize) -> u8 {
        if x < self.x0 || y < self.y0 || x >= self.x0 + self.w || y >= self.y0 + self.h {
            0
        } else {
            self.data[(y - self.y0) * self.w + (x - self.x0)]
        }
    }

    pub fn area(&self) -> usize {
        self.data.iter().map(|&v| v as usize).sum()
    }

    /// Dense row-major `cw x ch` copy.
    pub fn to_dense(&self, cw: usize, ch: usize) -> Vec<u8> {
        let mut out = vec![0u8; cw * ch];
        for y in 0..self.h.min(ch.saturating_sub(self.y0)) {
            for x in 0..self.w.min(cw.saturating_sub(self.x0)) {
                out[(self.y0 + y) * cw + self.x0 + x] = self.data[y * self.w + x];
            }
        }
        out
    }

    fn flip(&self, cw: usize) -> Self {
        if self.w == 0 {
            return self.clone();
        }
        let mut data = vec![0u8; self.data.len()];
        for y in 0..self.h {
            for x in 0..self.w {
                data[y * self.w + (self.w - 1 - x)] = self.data[y * self.w + x];
            }
        }
        BitMask {
            x0: cw - (self.x0 + self.w),
            data,
            ..*self
        }
    }

    /// cv2 INTER_NEAREST resize of the whole canvas `(cw, ch) -> (nw, nh)`.
    fn resize(&self, cw: usize, ch: usize, nw: usize, nh: usize) -> Self {
        if self.w == 0 || nw == 0 || nh == 0 {
            return BitMask::default();
        }
        let xt = nearest_table(cw, nw);
        let yt = nearest_table(ch, nh);
        let range = |t: &[usize], lo: usize, n: usize| {
            let a = t.partition_point(|&s| s < lo);
            let b = t.partition_point(|&s| s < lo + n);
            (a, b)
        };
        let (xa, xb) = range(&xt, self.x0, self.w);
        let (ya, yb) = range(&yt, self.y0, self.h);
        if xa >= xb || ya >= yb {
            return BitMask::default();
        }
        let (w, h) = (xb - xa, yb - ya);
        let mut data = vec![0u8; w * h];
        for y in 0..h {
            let sy = yt[ya + y] - self.y0;
            for x in 0..w {
                data[y * w + x] = self.data[sy * self.w + xt[xa + x] - self.x0];
            }
        }
        BitMask {
            x0: xa,
            y0: ya,
            w,
            h,
            data,
        }
        .tighten()
    }

    /// Crop to `[cx, cx+cw) x [cy, cy+ch)` (new canvas origin at (cx, cy)).
    fn crop(&self, cx: usize, cy: usize, cw: usize, ch: usize) -> Self {
        let xa = self.x0.max(cx);
        let xb = (self.x0 + self.w).min(cx + cw);
        let ya = self.y0.max(cy);
        let yb = (self.y0 + self.h).min(cy + ch);
        if xa >= xb || ya >= yb {
            return BitMask::default();
        }
        let (w, h) = (xb - xa, yb - ya);
        let mut data = vec![0u8; w * h];
        for y in 0..h {
            let s = (ya + y - self.y0) * self.w + (xa - self.x0);
            data[y * w..(y + 1) * w].copy_from_slice(&self.data[s..s + w]);
        }
        BitMask {
            x0: xa - cx,
            y0: ya - cy,
            w,
            h,
            data,
        }
        .tighten()
    }

    /// Shrink the stored region to the foreground's bounding box.
    fn tighten(self) -> Self {
        let t = BitMask::from_dense(&self.data, self.w, self.h);
        if t.w == 0 {
            return t;
        }
        BitMask {
            x0: self.x0 + t.x0,
            y0: self.y0 + t.y0,
            ..t
        }
    }

    /// Foreground bounding box `[x1, y1, x2, y2]` (pixel edges), `None` when empty.
    pub fn bbox(&self) -> Option<[f32; 4]> {
        (self.w > 0).then(|| {
            [
                self.x0 as f32,
                self.y0 as f32,
                (self.x0 + self.w) as f32,
                (self.y0 + self.h) as f32,
            ]
        })
    }

    /// mmcv `bilinear_interpolate` of roi_align on this mask (canvas `cw x ch`), in f32.
    #[inline]
    fn bilinear(&self, cw: usize, ch: usize, mut y: f32, mut x: f32) -> f32 {
        let (height, width) = (ch as f32, cw as f32);
        if y < -1.0 || y > height || x < -1.0 || x > width {
            return 0.0;
        }
        if y <= 0.0 {
            y = 0.0;
        }
        if x <= 0.0 {
            x = 0.0;
        }
        let mut y_low = y as usize;
        let mut x_low = x as usize;
        let y_high;
        let x_high;
        if y_low >= ch - 1 {
            y_low = ch - 1;
            y_high = y_low;
            y = y_low as f32;
        } else {
            y_high = y_low + 1;
        }
        if x_low >= cw - 1 {
            x_low = cw - 1;
            x_high = x_low;
            x = x_low as f32;
        } else {
            x_high = x_low + 1;
        }
        let ly = y - y_low as f32;
        let lx = x - x_low as f32;
        let hy = 1.0 - ly;
        let hx = 1.0 - lx;
        let v1 = self.get(x_low, y_low) as f32;
        let v2 = self.get(x_high, y_low) as f32;
        let v3 = self.get(x_low, y_high) as f32;
        let v4 = self.get(x_high, y_high) as f32;
        hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
    }

    /// mmcv roi_align (aligned=True, sampling_ratio=0, avg, spatial_scale 1) of this mask over
    /// `bbox`, `out x out` bins, binarized at 0.5 into `dst`.
    pub fn roi_align_binary(
        &self,
        cw: usize,
        ch: usize,
        bbox: [f32; 4],
        out: usize,
        dst: &mut [u8],
    ) {
        let vals = self.roi_align(cw, ch, bbox, out);
        for (d, v) in dst.iter_mut().zip(vals) {
            *d = (v >= 0.5) as u8;
        }
    }

    /// Soft roi_align output (see [`Self::roi_align_binary`]).
    pub fn roi_align(&self, cw: usize, ch: usize, bbox: [f32; 4], out: usize) -> Vec<f32> {
        let mut res = vec![0f32; out * out];
        if self.w == 0 || cw == 0 || ch == 0 {
            return res;
        }
        let offset = 0.5f32;
        let roi_start_w = bbox[0] - offset;
        let roi_start_h = bbox[1] - offset;
        let roi_end_w = bbox[2] - offset;
        let roi_end_h = bbox[3] - offset;
        let roi_width = roi_end_w - roi_start_w;
        let roi_height = roi_end_h - roi_start_h;
        let bin_h = roi_height / out as f32;
        let bin_w = roi_width / out as f32;
        let grid_h = (roi_height / out as f32).ceil().max(0.0) as usize;
        let grid_w = (roi_width / out as f32).ceil().max(0.0) as usize;
        let count = (grid_h * grid_w).max(1) as f32;
        for ph in 0..out {
            for pw in 0..out {
                let mut sum = 0f32;
                for iy in 0..grid_h {
                    let y =
                        roi_start_h + ph as f32 * bin_h + (iy as f32 + 0.5) * bin_h / grid_h as f32;
                    for ix in 0..grid_w {
                        let x = roi_start_w
                            + pw as f32 * bin_w
                            + (ix as f32 + 0.5) * bin_w / grid_w as f32;
                        sum += self.bilinear(cw, ch, y, x);
                    }
                }
                res[ph * out + pw] = sum / count;
            }
        }
        res
    }
}

/// One instance's mask.
#[derive(Clone, Debug, PartialEq)]
pub enum InstanceMask {
    /// mmdet BitmapMasks semantics (default).
    Bitmap(BitMask),
    /// mmdet PolygonMasks semantics: polygons `[x0, y0, x1, y1, ...]` in canvas coordinates.
    Polygons(Vec<Vec<f64>>),
}

/// How annotation masks are represented through the pipeline (mmdet's `poly2mask`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaskMode {
    /// `poly2mask=True` (the ConvNeXt configs): rasterize at load, pixel transforms.
    #[default]
    Bitmap,
    /// `poly2mask=False`: keep polygons, rasterize only in crop_and_resize.
    Polygon,
}

/// All instance masks of one image on a common canvas (after the pipeline: the padded shape).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Masks {
    pub width: usize,
    pub height: usize,
    pub masks: Vec<InstanceMask>,
}

impl Masks {
    pub fn len(&self) -> usize {
        self.masks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.masks.is_empty()
    }

    /// Horizontal flip (`x' = W - x` for polygons, mirrored pixels for bitmaps).
    pub fn flip(&self) -> Masks {
        let w = self.width;
        let masks = self
            .masks
            .iter()
            .map(|m| match m {
                InstanceMask::Bitmap(b) => InstanceMask::Bitmap(b.flip(w)),
                InstanceMask::Polygons(ps) => InstanceMask::Polygons(
                    ps.iter()
                        .map(|p| {
                            let mut p = p.clone();
                            for x in p.iter_mut().step_by(2) {
                                *x = w as f64 - *x;
                            }
                            p
                        })
                        .collect(),
                ),
            })
            .collect();
        Masks { masks, ..*self }
    }

    /// Resize the canvas to `(nw, nh)`: nearest for bitmaps, coordinate scaling for polygons
    /// (mmdet `PolygonMasks.resize` scales by `nw / W`, `nh / H`).
    pub fn resize(&self, nw: usize, nh: usize) -> Masks {
        let (cw, ch) = (self.width, self.height);
        let (sx, sy) = (nw as f64 / cw as f64, nh as f64 / ch as f64);
        let masks = self
            .masks
            .iter()
            .map(|m| match m {
                InstanceMask::Bitmap(b) => InstanceMask::Bitmap(b.resize(cw, ch, nw, nh)),
                InstanceMask::Polygons(ps) => InstanceMask::Polygons(
                    ps.iter()
                        .map(|p| {
                            p.iter()
                                .enumerate()
                                .map(|(i, &v)| if i % 2 == 0 { v * sx } else { v * sy })
                                .collect()
                        })
                        .collect(),
                ),
            })
            .collect();
        Masks {
            width: nw,
            height: nh,
            masks,
        }
    }

    /// Crop the canvas to `[x, x+w) x [y, y+h)` (polygons are shifted; pycocotools clips them).
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> Masks {
        let masks = self
            .masks
            .iter()
            .map(|m| match m {
                InstanceMask::Bitmap(b) => InstanceMask::Bitmap(b.crop(x, y, w, h)),
                InstanceMask::Polygons(ps) => InstanceMask::Polygons(
                    ps.iter()
                        .map(|p| {
                            p.iter()
                                .enumerate()
                                .map(|(i, &v)| {
                                    if i % 2 == 0 {
                                        v - x as f64
                                    } else {
                                        v - y as f64
                                    }
                                })
                                .collect()
                        })
                        .collect(),
                ),
            })
            .collect();
        Masks {
            width: w,
            height: h,
            masks,
        }
    }

    /// Pad the canvas bottom/right to `(w, h)` (zeros).
    pub fn pad(&self, w: usize, h: usize) -> Masks {
        Masks {
            width: w,
            height: h,
            masks: self.masks.clone(),
        }
    }

    /// Keep the masks at `keep` indices.
    pub fn select(&self, keep: &[usize]) -> Masks {
        Masks {
            masks: keep.iter().map(|&i| self.masks[i].clone()).collect(),
            ..*self
        }
    }

    /// Dense row-major `height x width` 0/1 mask of instance `i`.
    pub fn to_dense(&self, i: usize) -> Vec<u8> {
        match &self.masks[i] {
            InstanceMask::Bitmap(b) => b.to_dense(self.width, self.height),
            InstanceMask::Polygons(ps) => raster::polygons_to_mask(ps, self.height, self.width),
        }
    }

    /// Mask R-CNN targets: for each box `boxes[k]` (x1y1x2y2 on this canvas) crop mask
    /// `inds[k]` and resize it to `out x out` (binary), as mmdet 2.x `mask_target_single`:
    /// boxes are first clipped to the canvas, then `crop_and_resize` of the mask kind.
    /// Returns `boxes.len() * out * out` bytes (0/1), row-major per target.
    pub fn crop_and_resize(&self, boxes: &[[f32; 4]], inds: &[usize], out: usize) -> Vec<u8> {
        assert_eq!(boxes.len(), inds.len(), "one mask index per box");
        let mut res = vec![0u8; boxes.len() * out * out];
        let (maxw, maxh) = (self.width as f32, self.height as f32);
        for (k, (b, &i)) in boxes.iter().zip(inds).enumerate() {
            let bb = [
                b[0].clamp(0.0, maxw),
                b[1].clamp(0.0, maxh),
                b[2].clamp(0.0, maxw),
                b[3].clamp(0.0, maxh),
            ];
            let dst = &mut res[k * out * out..(k + 1) * out * out];
            match &self.masks[i] {
                InstanceMask::Bitmap(m) => {
                    m.roi_align_binary(self.width, self.height, bb, out, dst)
                }
                InstanceMask::Polygons(ps) => {
                    dst.copy_from_slice(&polygon_crop_and_resize(ps, bb, out));
                }
            }
        }
        res
    }
}

/// mmdet `PolygonMasks.crop_and_resize` for one instance and box, rasterized `out x out`.
pub fn polygon_crop_and_resize(ps: &[Vec<f64>], bbox: [f32; 4], out: usize) -> Vec<u8> {
    let [x1, y1, x2, y2] = bbox.map(|v| v as f64);
    let w = (x2 - x1).max(1.0);
    let h = (y2 - y1).max(1.0);
    let h_scale = out as f64 / h.max(0.1);
    let w_scale = out as f64 / w.max(0.1);
    let polys: Vec<Vec<f64>> = ps
        .iter()
        .map(|p| {
            p.iter()
                .enumerate()
                .map(|(i, &v)| {
                    if i % 2 == 0 {
                        (v - x1) * w_scale
                    } else {
                        (v - y1) * h_scale
                    }
                })
                .collect()
        })
        .collect();
    raster::polygons_to_mask(&polys, out, out)
}
