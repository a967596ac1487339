//! Polygon and RLE rasterization with pycocotools' exact semantics (`rleFrPoly`, RLE decoding,
//! union of the polygons of one instance).
//!
//! This is the single place where masks are rasterized; `cnx_eval::mask` implements the same
//! pycocotools algorithms for evaluation, and every caller here goes through [`poly_rle`] and
//! [`decode_string`], so switching to the shared implementation is a one-file change.

/// Uncompressed COCO RLE counts (column-major, alternating runs of 0 and 1, starting with 0).
pub type Counts = Vec<u32>;

/// pycocotools `rleFrPoly`: RLE of one polygon `xy = [x0, y0, x1, y1, ...]` on an `h x w` grid.
pub fn poly_rle(xy: &[f64], h: usize, w: usize) -> Counts {
    let k = xy.len() / 2;
    if k == 0 {
        return vec![(h * w) as u32];
    }
    let scale = 5.0f64;
    // `(int)` in C truncates toward zero, as `as i64` does.
    let mut x: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i64).collect();
    let mut y: Vec<i64> = (0..k).map(|j| (scale * xy[2 * j + 1] + 0.5) as i64).collect();
    x.push(x[0]);
    y.push(y[0]);
    let mut m = 0usize;
    for j in 0..k {
        m += ((x[j] - x[j + 1]).abs().max((y[j] - y[j + 1]).abs()) + 1) as usize;
    }
    let mut u = Vec::with_capacity(m);
    let mut v = Vec::with_capacity(m);
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
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
                v.push((ys as f64 + s * t as f64 + 0.5) as i64);
            }
        } else {
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push((xs as f64 + s * t as f64 + 0.5) as i64);
            }
        }
    }
    // Points along the y-boundary, downsampled.
    let mut a: Vec<u64> = Vec::new();
    for j in 1..u.len() {
        if u[j] != u[j - 1] {
            let mut xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
            xd = (xd + 0.5) / scale - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w as f64 - 1.0) {
                continue;
            }
            let mut yd = if v[j] < v[j - 1] { v[j] } else { v[j - 1] } as f64;
            yd = (yd + 0.5) / scale - 0.5;
            yd = yd.clamp(0.0, h as f64).ceil();
            a.push(xd as u64 * h as u64 + yd as u64);
        }
    }
    a.push((h * w) as u64);
    a.sort_unstable();
    let mut p = 0u64;
    for e in a.iter_mut() {
        let t = *e;
        *e -= p;
        p = t;
    }
    let mut b: Vec<u32> = Vec::with_capacity(a.len());
    let mut j = 0;
    b.push(a[j] as u32);
    j += 1;
    while j < a.len() {
        if a[j] > 0 {
            b.push(a[j] as u32);
            j += 1;
        } else {
            j += 1;
            if j < a.len() {
                *b.last_mut().unwrap() += a[j] as u32;
                j += 1;
            }
        }
    }
    b
}

/// pycocotools `rleFrString`: decode the compressed (LEB128-like) string form of RLE counts.
pub fn decode_string(s: &str) -> Counts {
    let bytes = s.as_bytes();
    let mut counts = Vec::new();
    let mut p = 0usize;
    while p < bytes.len() {
        let mut x: i64 = 0;
        let mut k = 0;
        let mut more = true;
        while more && p < bytes.len() {
            let c = bytes[p] as i64 - 48;
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && (c & 0x10) != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        counts.push(x as u32);
    }
    counts
}

/// pycocotools `rleToString`: compressed string form of RLE counts.
pub fn encode_string(counts: &[u32]) -> String {
    let mut out = Vec::new();
    for i in 0..counts.len() {
        let mut x = counts[i] as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        let mut more = true;
        while more {
            let mut c = x & 0x1f;
            x >>= 5;
            more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            out.push((c + 48) as u8);
        }
    }
    String::from_utf8(out).expect("ascii")
}

/// RLE counts of a row-major binary mask (pycocotools `encode`, column-major runs).
pub fn encode_mask(mask: &[u8], h: usize, w: usize) -> Counts {
    let mut counts = Vec::new();
    let mut cur = 0u8;
    let mut run = 0u32;
    for x in 0..w {
        for y in 0..h {
            let v = (mask[y * w + x] != 0) as u8;
            if v != cur {
                counts.push(run);
                run = 0;
                cur = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// Decode the union of several RLEs (pycocotools `merge` then `decode`) into a row-major
/// `h x w` mask of 0/1.
pub fn decode_union(rles: &[Counts], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; h * w];
    for counts in rles {
        for_each_run(counts, h * w, |start, len| {
            for idx in start..start + len {
                let (x, y) = (idx / h, idx % h);
                out[y * w + x] = 1;
            }
        });
    }
    out
}

/// Call `f(start, len)` for each foreground run of column-major RLE counts, clamped to `n`.
pub fn for_each_run(counts: &[u32], n: usize, mut f: impl FnMut(usize, usize)) {
    let mut pos = 0usize;
    for (i, &c) in counts.iter().enumerate() {
        let c = c as usize;
        if i % 2 == 1 && c > 0 && pos < n {
            f(pos, c.min(n - pos));
        }
        pos += c;
    }
}

/// Area (number of foreground pixels) of RLE counts.
pub fn rle_area(counts: &[u32]) -> u64 {
    counts.iter().skip(1).step_by(2).map(|&c| c as u64).sum()
}

/// Rasterize an instance given as polygons on an `h x w` grid (pycocotools `frPyObjects` +
/// `merge` + `decode`).
pub fn polygons_to_mask(polys: &[Vec<f64>], h: usize, w: usize) -> Vec<u8> {
    let rles: Vec<Counts> = polys.iter().map(|p| poly_rle(p, h, w)).collect();
    decode_union(&rles, h, w)
}
