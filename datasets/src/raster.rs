//! Polygon and RLE rasterization with pycocotools' exact semantics (`rleFrPoly`, RLE decoding,
//! union of the polygons of one instance).
//!
//! This is the single place where this crate rasterizes masks; the pycocotools algorithms
//! themselves (`rleFrPoly`, `rleFrString`) come from `cnx_eval::mask`, so datasets and
//! evaluation share one rasterizer.

/// Uncompressed COCO RLE counts (column-major, alternating runs of 0 and 1, starting with 0).
pub type Counts = Vec<u32>;

/// pycocotools `rleFrPoly`: RLE of one polygon `xy = [x0, y0, x1, y1, ...]` on an `h x w` grid
/// (delegates to `cnx_eval::mask`, the project's single pycocotools port).
pub fn poly_rle(xy: &[f64], h: usize, w: usize) -> Counts {
    Rle::from_polygon(xy, h, w).counts
}

/// pycocotools `rleFrString`: decode the compressed (LEB128-like) string form of RLE counts.
/// A malformed string (which pycocotools would read out of bounds on) decodes to no runs.
pub fn decode_string(s: &str) -> Counts {
    cnx_eval::mask::decode_counts(s.as_bytes()).unwrap_or_default()
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

use cnx_eval::mask::Rle;
