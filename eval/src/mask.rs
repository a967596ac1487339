//! COCO mask API: run-length encoding (RLE) with pycocotools' exact semantics.
//!
//! Everything here is a line-by-line port of pycocotools' `maskApi.c` (the version shipped in
//! pycocotools 2.0.x, including the fixed `rleToBbox`), so counts, compressed strings, areas,
//! boxes and IoUs are bit-identical to what pycocotools produces. In particular polygons are
//! rasterized the pycocotools way (upsample by 5, trace edges, subsample), which differs from a
//! scanline fill on boundary pixels; datasets and evaluation must use this one rasterizer.
//!
//! Memory layout: an RLE describes a mask in **column-major** (Fortran) order, i.e. pixel
//! `(y, x)` has linear index `x * h + y`. Counts alternate runs of 0 and 1 and always start with
//! a (possibly empty) run of 0. [`Rle::encode`]/[`Rle::decode`] use that column-major layout;
//! [`Rle::encode_row_major`]/[`Rle::decode_row_major`] take/return the usual `y * w + x` layout.

use crate::error::MaskError;

/// A binary mask of `h x w` pixels, run-length encoded in column-major order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rle {
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// Alternating run lengths of 0s and 1s, column-major, starting with 0s.
    pub counts: Vec<u32>,
}

/// `(int)x` of C on x86-64: truncation toward zero; NaN and out-of-range values give
/// `INT_MIN` (what `cvttsd2si` returns), where Rust's `as` would saturate.
#[inline]
fn c_int(x: f64) -> i32 {
    if x > -2147483649.0 && x < 2147483648.0 {
        x as i32
    } else {
        i32::MIN
    }
}

impl Rle {
    /// Builds an RLE from raw counts, checking that they cover exactly `h * w` pixels.
    pub fn new(h: usize, w: usize, counts: Vec<u32>) -> Result<Rle, MaskError> {
        let r = Rle { h, w, counts };
        r.validate()?;
        Ok(r)
    }

    /// The empty mask (all zeros).
    pub fn zeros(h: usize, w: usize) -> Rle {
        Rle {
            h,
            w,
            counts: vec![(h * w) as u32],
        }
    }

    /// Checks that the counts sum to `h * w` (pycocotools does not check, but a mismatch
    /// silently corrupts every IoU computed with the mask).
    pub fn validate(&self) -> Result<(), MaskError> {
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        if total != (self.h as u64) * (self.w as u64) {
            return Err(MaskError::CountsMismatch {
                sum: total,
                h: self.h,
                w: self.w,
            });
        }
        Ok(())
    }

    /// pycocotools `rleEncode`: `mask` holds `h * w` bytes in **column-major** order; any
    /// nonzero byte is foreground.
    pub fn encode(mask: &[u8], h: usize, w: usize) -> Rle {
        assert_eq!(mask.len(), h * w, "mask length must be h*w");
        let mut counts = Vec::new();
        let mut p = false;
        let mut c: u32 = 0;
        for &v in mask {
            let v = v != 0;
            if v != p {
                counts.push(c);
                c = 0;
                p = v;
            }
            c += 1;
        }
        counts.push(c);
        Rle { h, w, counts }
    }

    /// Like [`Rle::encode`] but `mask` is in **row-major** order (`mask[y * w + x]`).
    pub fn encode_row_major(mask: &[u8], h: usize, w: usize) -> Rle {
        assert_eq!(mask.len(), h * w, "mask length must be h*w");
        let mut counts = Vec::new();
        let mut p = false;
        let mut c: u32 = 0;
        for x in 0..w {
            for y in 0..h {
                let v = mask[y * w + x] != 0;
                if v != p {
                    counts.push(c);
                    c = 0;
                    p = v;
                }
                c += 1;
            }
        }
        counts.push(c);
        Rle { h, w, counts }
    }

    /// pycocotools `rleDecode`: the mask as `h * w` bytes (0/1) in **column-major** order.
    /// Fails when the counts run past `h * w` pixels (pycocotools: "Invalid RLE mask").
    pub fn decode(&self) -> Result<Vec<u8>, MaskError> {
        let n = self.h * self.w;
        let mut m = Vec::with_capacity(n);
        let mut v = 0u8;
        for &c in &self.counts {
            if m.len() + c as usize > n {
                return Err(MaskError::CountsMismatch {
                    sum: self.counts.iter().map(|&c| c as u64).sum(),
                    h: self.h,
                    w: self.w,
                });
            }
            m.resize(m.len() + c as usize, v);
            v ^= 1;
        }
        // pycocotools leaves short RLEs' tail uninitialized; we zero it.
        m.resize(n, 0);
        Ok(m)
    }

    /// Like [`Rle::decode`] but returns the mask in **row-major** order (`mask[y * w + x]`).
    pub fn decode_row_major(&self) -> Result<Vec<u8>, MaskError> {
        let col = self.decode()?;
        let (h, w) = (self.h, self.w);
        let mut out = vec![0u8; h * w];
        for x in 0..w {
            let src = &col[x * h..(x + 1) * h];
            for (y, &v) in src.iter().enumerate() {
                out[y * w + x] = v;
            }
        }
        Ok(out)
    }

    /// pycocotools `rleArea`: number of foreground pixels (C `uint` arithmetic).
    pub fn area(&self) -> u32 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .fold(0u32, |a, &c| a.wrapping_add(c))
    }

    /// pycocotools `rleToBbox`: `[x, y, w, h]` of the foreground, `[0, 0, 0, 0]` when empty.
    pub fn to_bbox(&self) -> [f64; 4] {
        let h = self.h as u32;
        let w = self.w as u32;
        let m = (self.counts.len() / 2) * 2;
        if m == 0 {
            return [0.0; 4];
        }
        let (mut xs, mut ys, mut xe, mut ye) = (w, h, 0u32, 0u32);
        let mut cc: u32 = 0;
        for j in 0..m {
            let start = cc;
            cc = cc.wrapping_add(self.counts[j]);
            if j % 2 == 0 || self.counts[j] == 0 {
                continue;
            }
            let y_start = start % h;
            let x_start = (start - y_start) / h;
            let y_end = (cc - 1) % h;
            let x_end = (cc - 1 - y_end) / h;
            xs = xs.min(x_start);
            xe = xe.max(x_end);
            if x_start < x_end {
                ys = 0;
                ye = h - 1;
            } else {
                ys = ys.min(y_start);
                ye = ye.max(y_end);
            }
        }
        [
            xs as f64,
            ys as f64,
            xe.wrapping_sub(xs).wrapping_add(1) as f64,
            ye.wrapping_sub(ys).wrapping_add(1) as f64,
        ]
    }

    /// pycocotools `rleFrPoly`: rasterizes one polygon `[x0, y0, x1, y1, ...]` (an odd trailing
    /// coordinate is dropped, as `int(len(p)/2)` does).
    pub fn from_polygon(xy: &[f64], h: usize, w: usize) -> Rle {
        let k = xy.len() / 2;
        if k == 0 {
            return Rle::zeros(h, w);
        }
        let scale = 5.0f64;
        let mut x: Vec<i32> = Vec::with_capacity(k + 1);
        let mut y: Vec<i32> = Vec::with_capacity(k + 1);
        for j in 0..k {
            x.push(c_int(scale * xy[j * 2] + 0.5));
        }
        x.push(x[0]);
        for j in 0..k {
            y.push(c_int(scale * xy[j * 2 + 1] + 0.5));
        }
        y.push(y[0]);
        let mut m: usize = 0;
        for j in 0..k {
            let dx = x[j].wrapping_sub(x[j + 1]).unsigned_abs();
            let dy = y[j].wrapping_sub(y[j + 1]).unsigned_abs();
            m += dx.max(dy) as usize + 1;
        }
        let mut u: Vec<i32> = Vec::with_capacity(m);
        let mut v: Vec<i32> = Vec::with_capacity(m);
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = xe.wrapping_sub(xs).wrapping_abs();
            let dy = ys.wrapping_sub(ye).wrapping_abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            let s = if dx >= dy {
                (ye - ys) as f64 / dx as f64
            } else {
                (xe - xs) as f64 / dy as f64
            };
            if dx >= dy {
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push(c_int(ys as f64 + s * t as f64 + 0.5));
                }
            } else {
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push(c_int(xs as f64 + s * t as f64 + 0.5));
                }
            }
        }
        // Points along the y-boundary, downsampled to the original grid.
        let kk = u.len();
        let mut a: Vec<u32> = Vec::with_capacity(kk + 1);
        let (hf, wm1) = (h as f64, (w as u64).wrapping_sub(1) as f64);
        for j in 1..kk {
            if u[j] != u[j - 1] {
                let mut xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
                xd = (xd + 0.5) / scale - 0.5;
                // `floor(xd) != xd` without a libm call (no SSE4.1 on the baseline target):
                // xd is a small multiple of 0.2, so truncation decides integrality exactly.
                if (xd as i64) as f64 != xd || xd < 0.0 || xd > wm1 {
                    continue;
                }
                let mut yd = (if v[j] < v[j - 1] { v[j] } else { v[j - 1] }) as f64;
                yd = (yd + 0.5) / scale - 0.5;
                if yd < 0.0 {
                    yd = 0.0;
                } else if yd > hf {
                    yd = hf;
                }
                // ceil for 0 <= yd <= h, exactly, without libm.
                let c = yd as i64 as f64;
                yd = if c < yd { c + 1.0 } else { c };
                let (xi, yi) = (xd as i32, yd as i32);
                a.push(xi.wrapping_mul(h as i32).wrapping_add(yi) as u32);
            }
        }
        a.push((h * w) as u32);
        a.sort_unstable();
        let mut p: u32 = 0;
        for e in a.iter_mut() {
            let t = *e;
            *e = e.wrapping_sub(p);
            p = t;
        }
        let mut b: Vec<u32> = Vec::with_capacity(a.len());
        let mut j = 0;
        b.push(a[j]);
        j += 1;
        while j < a.len() {
            if a[j] > 0 {
                b.push(a[j]);
                j += 1;
            } else {
                j += 1;
                if j < a.len() {
                    *b.last_mut().unwrap() += a[j];
                    j += 1;
                }
            }
        }
        Rle { h, w, counts: b }
    }

    /// Union of several polygons of one object, as pycocotools' `annToRLE` does for a list
    /// of polygons (`merge(frPyObjects(polys, h, w))`). Note the pycocotools quirk kept here
    /// (see [`Rle::from_segm_list`]): use that one for raw COCO JSON.
    pub fn from_polygons(polys: &[Vec<f64>], h: usize, w: usize) -> Rle {
        let rles: Vec<Rle> = polys.iter().map(|p| Rle::from_polygon(p, h, w)).collect();
        Rle::merge(&rles, false)
    }

    /// pycocotools `frPyObjects(list, h, w)` followed by `merge`, exactly as `annToRLE` treats
    /// a list-valued `segmentation`: when the first entry has exactly 4 numbers the whole list
    /// is read as boxes `[x, y, w, h]`, when it has more than 4 as polygons; anything else is
    /// rejected (pycocotools raises too).
    pub fn from_segm_list(polys: &[Vec<f64>], h: usize, w: usize) -> Result<Rle, MaskError> {
        let first = polys.first().ok_or(MaskError::EmptyPolygonList)?;
        let rles: Vec<Rle> = if first.len() == 4 {
            let mut v = Vec::with_capacity(polys.len());
            for p in polys {
                if p.len() != 4 {
                    return Err(MaskError::BadPolygon(p.len()));
                }
                v.push(Rle::from_bbox([p[0], p[1], p[2], p[3]], h, w));
            }
            v
        } else if first.len() > 4 {
            polys.iter().map(|p| Rle::from_polygon(p, h, w)).collect()
        } else {
            return Err(MaskError::BadPolygon(first.len()));
        };
        Ok(Rle::merge(&rles, false))
    }

    /// pycocotools `rleFrBbox`: the box `[x, y, w, h]` rasterized as a 4-point polygon.
    pub fn from_bbox(bb: [f64; 4], h: usize, w: usize) -> Rle {
        let (xs, ys) = (bb[0], bb[1]);
        let (xe, ye) = (xs + bb[2], ys + bb[3]);
        Rle::from_polygon(&[xs, ys, xs, ye, xe, ye, xe, ys], h, w)
    }

    /// pycocotools `rleMerge`: union (`intersect == false`) or intersection of masks of equal
    /// size. Masks of different sizes give an empty 0x0 RLE, as in pycocotools.
    pub fn merge(rles: &[Rle], intersect: bool) -> Rle {
        match rles.len() {
            0 => return Rle::default(),
            1 => return rles[0].clone(),
            _ => {}
        }
        let (h, w) = (rles[0].h, rles[0].w);
        let mut cnts: Vec<u32> = rles[0].counts.clone();
        let mut out: Vec<u32> = Vec::with_capacity(cnts.len());
        for bm in &rles[1..] {
            if bm.h != h || bm.w != w {
                return Rle::default();
            }
            let am = &cnts;
            let b = &bm.counts;
            out.clear();
            let mut ca = am.first().copied().unwrap_or(0);
            let mut cb = b.first().copied().unwrap_or(0);
            let (mut v, mut va, mut vb) = (false, false, false);
            let (mut ai, mut bi) = (1usize, 1usize);
            let mut cc: u32 = 0;
            let mut ct: u32 = 1;
            while ct > 0 {
                let c = ca.min(cb);
                cc = cc.wrapping_add(c);
                ct = 0;
                ca -= c;
                if ca == 0 && ai < am.len() {
                    ca = am[ai];
                    ai += 1;
                    va = !va;
                }
                ct = ct.wrapping_add(ca);
                cb -= c;
                if cb == 0 && bi < b.len() {
                    cb = b[bi];
                    bi += 1;
                    vb = !vb;
                }
                ct = ct.wrapping_add(cb);
                let vp = v;
                v = if intersect { va && vb } else { va || vb };
                if v != vp || ct == 0 {
                    out.push(cc);
                    cc = 0;
                }
            }
            std::mem::swap(&mut cnts, &mut out);
        }
        Rle { h, w, counts: cnts }
    }

    /// pycocotools `rleToString`: the compressed ASCII form (6 bits per char, chars 48..111,
    /// counts after the second delta-coded against the count two before).
    pub fn to_compressed_string(&self) -> String {
        let mut s: Vec<u8> = Vec::with_capacity(self.counts.len() * 2);
        for i in 0..self.counts.len() {
            let mut x = self.counts[i] as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            let mut more = true;
            while more {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push(c + 48);
            }
        }
        // Every byte is in 48..=111, i.e. ASCII.
        String::from_utf8(s).expect("ascii")
    }

    /// pycocotools `rleFrString`: decodes the compressed form. Rejects characters outside
    /// 48..111, a truncated last value and negative counts (pycocotools reads out of bounds or
    /// wraps around on those).
    pub fn from_compressed_string(s: &str, h: usize, w: usize) -> Result<Rle, MaskError> {
        let counts = decode_counts(s.as_bytes())?;
        Ok(Rle { h, w, counts })
    }
}

/// Decodes the compressed counts string into run lengths (see [`Rle::from_compressed_string`]).
pub fn decode_counts(s: &[u8]) -> Result<Vec<u32>, MaskError> {
    // Exact capacity (a value ends at each char without the continuation bit): with 500k
    // masks in memory, over-allocating would cost more than this extra pass.
    let n = s
        .iter()
        .filter(|&&c| c.wrapping_sub(48) & 0x20 == 0)
        .count();
    let mut cnts: Vec<u32> = Vec::with_capacity(n);
    let mut p = 0;
    while p < s.len() {
        let mut x: i64 = 0;
        let mut k = 0u32;
        loop {
            let ch = s[p];
            if !(48..=111).contains(&ch) {
                return Err(MaskError::BadRleChar(ch as char, p));
            }
            if k > 6 {
                return Err(MaskError::BadRleString("value too long"));
            }
            let c = (ch - 48) as i64;
            x |= (c & 0x1f) << (5 * k);
            let more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
            if p >= s.len() {
                return Err(MaskError::BadRleString("truncated value"));
            }
        }
        let m = cnts.len();
        if m > 2 {
            x += cnts[m - 2] as i64;
        }
        if !(0..=u32::MAX as i64).contains(&x) {
            return Err(MaskError::BadRleString("negative or too large count"));
        }
        cnts.push(x as u32);
    }
    Ok(cnts)
}

/// pycocotools `bbIou` for one pair: boxes are `[x, y, w, h]`; for a crowd ground truth the
/// union is the detection's own area.
#[inline]
pub fn bbox_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let ga = g[2] * g[3];
    let da = d[2] * d[3];
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// `fmin`/`fmax` of C ignore NaN the same way Rust's `min`/`max` do, so [`bbox_iou`] matches.
/// IoU of one detection mask with one ground-truth mask, pycocotools `rleIou` (including its
/// box pre-check, the `-1` for mismatched sizes and the crowd rule). `dbb`/`gbb` are the
/// masks' [`Rle::to_bbox`] boxes.
pub fn rle_iou_pair(
    dt: &Rle,
    gt: &Rle,
    dbb: &[f64; 4],
    gbb: &[f64; 4],
    crowd: bool,
    dt_area: u32,
) -> f64 {
    let o = bbox_iou(dbb, gbb, crowd);
    if o <= 0.0 {
        return o;
    }
    if dt.h != gt.h || dt.w != gt.w {
        return -1.0;
    }
    let a = &dt.counts;
    let b = &gt.counts;
    let mut ca = a.first().copied().unwrap_or(0);
    let mut cb = b.first().copied().unwrap_or(0);
    let (mut va, mut vb) = (false, false);
    let (mut ai, mut bi) = (1usize, 1usize);
    let (mut i, mut u): (u32, u32) = (0, 0);
    let mut ct: u32 = 1;
    while ct > 0 {
        let c = ca.min(cb);
        if va || vb {
            u = u.wrapping_add(c);
            if va && vb {
                i = i.wrapping_add(c);
            }
        }
        ct = 0;
        ca -= c;
        if ca == 0 && ai < a.len() {
            ca = a[ai];
            ai += 1;
            va = !va;
        }
        ct = ct.wrapping_add(ca);
        cb -= c;
        if cb == 0 && bi < b.len() {
            cb = b[bi];
            bi += 1;
            vb = !vb;
        }
        ct = ct.wrapping_add(cb);
    }
    if i == 0 {
        u = 1;
    } else if crowd {
        u = dt_area;
    }
    i as f64 / u as f64
}

/// pycocotools `maskUtils.iou` for masks: the `dets.len() x gts.len()` matrix, row-major
/// (`out[d * gts.len() + g]`). `iscrowd[g]` applies the crowd rule to ground truth `g`.
pub fn iou(dets: &[Rle], gts: &[Rle], iscrowd: &[bool]) -> Vec<f64> {
    assert_eq!(
        gts.len(),
        iscrowd.len(),
        "iscrowd must have one flag per ground truth"
    );
    let dbb: Vec<[f64; 4]> = dets.iter().map(Rle::to_bbox).collect();
    let gbb: Vec<[f64; 4]> = gts.iter().map(Rle::to_bbox).collect();
    let mut out = Vec::with_capacity(dets.len() * gts.len());
    for (d, db) in dets.iter().zip(&dbb) {
        let da = d.area();
        for ((g, gb), &c) in gts.iter().zip(&gbb).zip(iscrowd) {
            out.push(rle_iou_pair(d, g, db, gb, c, da));
        }
    }
    out
}

/// pycocotools `maskUtils.iou` for boxes `[x, y, w, h]`: row-major `dets.len() x gts.len()`.
pub fn iou_bbox(dets: &[[f64; 4]], gts: &[[f64; 4]], iscrowd: &[bool]) -> Vec<f64> {
    assert_eq!(
        gts.len(),
        iscrowd.len(),
        "iscrowd must have one flag per ground truth"
    );
    let mut out = Vec::with_capacity(dets.len() * gts.len());
    for d in dets {
        for (g, &c) in gts.iter().zip(iscrowd) {
            out.push(bbox_iou(d, g, c));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip() {
        let (h, w) = (3, 4);
        let m: Vec<u8> = vec![0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0];
        let r = Rle::encode(&m, h, w);
        assert_eq!(r.counts, vec![1, 2, 2, 4, 3]);
        assert_eq!(r.decode().unwrap(), m);
        assert_eq!(r.area(), 6);
        let s = r.to_compressed_string();
        assert_eq!(Rle::from_compressed_string(&s, h, w).unwrap(), r);
        let rm = r.decode_row_major().unwrap();
        assert_eq!(Rle::encode_row_major(&rm, h, w), r);
    }

    #[test]
    fn bad_strings() {
        assert!(Rle::from_compressed_string("ab\u{7f}", 2, 2).is_err());
        assert!(Rle::from_compressed_string("P", 2, 2).is_err()); // continuation bit, no more
    }
}
