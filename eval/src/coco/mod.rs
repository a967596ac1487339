//! COCOeval (`bbox` and `segm`) with pycocotools' exact semantics, evaluated in parallel.
//!
//! The flow mirrors `pycocotools.cocoeval.COCOeval`: `loadRes` rules for results, `evaluate`
//! (per image and category: IoUs, then greedy matching per area range and IoU threshold),
//! `accumulate` (stable score sort, cumulative TP/FP, interpolated precision at 101 recall
//! thresholds) and `summarize` (12 means over entries > -1, with numpy's pairwise summation).
//! Every floating-point operation is done in the same order as numpy does it, so the numbers
//! are identical, not just close. Deliberate differences, all for bad input: unknown
//! category ids and non-finite scores are errors (pycocotools ignores / mis-sorts them), and
//! an empty results list evaluates to zeros (pycocotools raises).

pub mod json;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::EvalError;
use crate::mask::{bbox_iou, rle_iou_pair, Rle};
use crate::numpy;
pub use json::{GtAnnotation, GtCategory, GtFile, GtImage, Segmentation};

/// Hasher for integer ids: one multiply (ids are not attacker-chosen here, and SipHash on
/// millions of lookups is measurable).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_i64(&mut self, i: i64) {
        self.0 = (i as u64 ^ 0x5bd1_e995)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

type IdMap<V> = HashMap<i64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// What the IoU is computed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IouType {
    Bbox,
    Segm,
}

impl IouType {
    pub fn name(self) -> &'static str {
        match self {
            IouType::Bbox => "bbox",
            IouType::Segm => "segm",
        }
    }
}

/// Number of IoU thresholds (0.50:0.05:0.95).
pub const T: usize = 10;
/// Number of recall thresholds (0:0.01:1).
pub const R: usize = 101;
/// Number of area ranges (all, small, medium, large).
pub const A: usize = 4;
/// Number of max-detection settings (1, 10, 100).
pub const M: usize = 3;
/// Max detections per image.
pub const MAX_DETS: [usize; M] = [1, 10, 100];
/// Area ranges `[lo, hi]` as pycocotools writes them (`1e5 ** 2` is the int 10^10).
pub const AREA_RNG: [[f64; 2]; A] = [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];
/// Labels of [`AREA_RNG`].
pub const AREA_LBL: [&str; A] = ["all", "small", "medium", "large"];

/// `np.linspace(.5, 0.95, 10)`, bit for bit.
pub fn iou_thrs() -> [f64; T] {
    let v = numpy::linspace(0.5, 0.95, T);
    v.try_into().unwrap()
}

/// `np.linspace(.0, 1.00, 101)`, bit for bit.
pub fn rec_thrs() -> [f64; R] {
    let v = numpy::linspace(0.0, 1.0, R);
    v.try_into().unwrap()
}

/// Ground truth ready for evaluation (parsed `instances_*.json` plus indexes).
#[derive(Clone, Debug)]
pub struct CocoGt {
    pub images: Vec<GtImage>,
    pub categories: Vec<GtCategory>,
    pub annotations: Vec<GtAnnotation>,
    img_index: IdMap<usize>,
    cat_index: IdMap<usize>,
}

impl CocoGt {
    /// Reads and parses a ground-truth JSON file.
    pub fn load(path: impl AsRef<Path>) -> Result<CocoGt, EvalError> {
        let path = path.as_ref();
        let bytes = read(path)?;
        CocoGt::from_slice(&bytes, &path.display().to_string())
    }

    /// Parses ground-truth JSON; `what` names the source in errors.
    pub fn from_slice(bytes: &[u8], what: &str) -> Result<CocoGt, EvalError> {
        let f: GtFile = parse_json(bytes, what)?;
        CocoGt::new(f)
    }

    /// Reads a ground-truth JSON file for `bbox` evaluation only: annotations keep no
    /// `segmentation` (skipped unparsed, about half the parse time of a COCO file), so `segm`
    /// evaluation of the result fails with "has no `segmentation`".
    pub fn load_boxes_only(path: impl AsRef<Path>) -> Result<CocoGt, EvalError> {
        let path = path.as_ref();
        let bytes = read(path)?;
        CocoGt::from_slice_boxes_only(&bytes, &path.display().to_string())
    }

    /// [`CocoGt::from_slice`] without segmentations, as [`CocoGt::load_boxes_only`].
    pub fn from_slice_boxes_only(bytes: &[u8], what: &str) -> Result<CocoGt, EvalError> {
        let f: json::GtFileBoxes = parse_json(bytes, what)?;
        CocoGt::new(f.into())
    }

    /// Builds the indexes; checks that ids are unique enough to evaluate.
    pub fn new(f: GtFile) -> Result<CocoGt, EvalError> {
        let mut img_index = IdMap::with_capacity_and_hasher(f.images.len(), Default::default());
        for (i, im) in f.images.iter().enumerate() {
            // pycocotools keeps the last entry of a duplicated id.
            img_index.insert(im.id, i);
        }
        let mut cat_index = IdMap::with_capacity_and_hasher(f.categories.len(), Default::default());
        for (i, c) in f.categories.iter().enumerate() {
            cat_index.insert(c.id, i);
        }
        Ok(CocoGt {
            images: f.images,
            categories: f.categories,
            annotations: f.annotations,
            img_index,
            cat_index,
        })
    }

    /// The image entry of an id.
    pub fn image(&self, id: i64) -> Option<&GtImage> {
        self.img_index.get(&id).map(|&i| &self.images[i])
    }

    /// The category entry of an id.
    pub fn category(&self, id: i64) -> Option<&GtCategory> {
        self.cat_index.get(&id).map(|&i| &self.categories[i])
    }

    /// Sorted unique image ids (`params.imgIds`).
    pub fn img_ids(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.img_index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Sorted unique category ids (`params.catIds`).
    pub fn cat_ids(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.cat_index.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// One detection, as the training engine produces it or as read from a results file
/// (`{"image_id", "category_id", "score", "bbox" and/or "segmentation"}`; other keys ignored).
/// Serializes to the same form, so `serde_json::to_writer(f, &dets)` writes a results file.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    pub score: f64,
    /// `[x, y, w, h]`.
    #[serde(
        default,
        deserialize_with = "json::opt_box",
        skip_serializing_if = "Option::is_none"
    )]
    pub bbox: Option<[f64; 4]>,
    /// Mask (for `segm`): typically [`Segmentation::Rle`] from [`Rle::encode`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
}

/// Reads a results JSON file (a list of detections).
pub fn load_results(path: impl AsRef<Path>) -> Result<Vec<Detection>, EvalError> {
    let path = path.as_ref();
    let bytes = read(path)?;
    parse_results(&bytes, &path.display().to_string())
}

/// Parses results JSON; `what` names the source in errors.
///
/// Large files are parsed on all cores: the top-level array is cut at object boundaries
/// (`}` `,` `{` outside strings) and the pieces are parsed element by element in parallel. A
/// cut that falls inside a string makes a piece fail to parse, in which case the whole file is
/// parsed again sequentially, so the result (and any error message) never depends on the cut.
pub fn parse_results(bytes: &[u8], what: &str) -> Result<Vec<Detection>, EvalError> {
    if let Some(v) = parse_results_parallel(bytes) {
        return Ok(v);
    }
    parse_json(bytes, what)
}

fn parse_results_parallel(bytes: &[u8]) -> Option<Vec<Detection>> {
    const MIN_PIECE: usize = 4 << 20;
    let pieces = (rayon::current_num_threads() * 4).min(bytes.len() / MIN_PIECE);
    if pieces < 2 {
        return None;
    }
    let is_ws = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    let start = bytes.iter().position(|&b| !is_ws(b))?;
    if bytes[start] != b'[' {
        return None;
    }
    let end = bytes.iter().rposition(|&b| !is_ws(b))?;
    if bytes[end] != b']' || end <= start + 1 {
        return None;
    }
    // A trailing comma before `]` is invalid JSON: leave it to the sequential parser's error.
    if bytes[start + 1..end]
        .iter()
        .rposition(|&b| !is_ws(b))
        .map(|i| bytes[start + 1 + i])
        == Some(b',')
    {
        return None;
    }
    // Element boundaries: the position of a `{` that follows `}` ws* `,` ws*.
    let mut cuts = vec![start + 1];
    for i in 1..pieces {
        let mut p = (start + (end - start) * i / pieces).max(*cuts.last().unwrap());
        let found = loop {
            let q = p + memchr(b'}', &bytes[p..end])?;
            let mut j = q + 1;
            while j < end && is_ws(bytes[j]) {
                j += 1;
            }
            if j < end && bytes[j] == b',' {
                j += 1;
                while j < end && is_ws(bytes[j]) {
                    j += 1;
                }
                if j < end && bytes[j] == b'{' {
                    break j;
                }
            }
            p = q + 1;
        };
        cuts.push(found);
    }
    cuts.push(end);
    let parts: Vec<Option<Vec<Detection>>> = cuts
        .par_windows(2)
        .map(|w| parse_elements(&bytes[w[0]..w[1]]))
        .collect();
    let mut out = Vec::with_capacity(
        parts
            .iter()
            .map(|p| p.as_ref().map_or(0, |v| v.len()))
            .sum(),
    );
    for p in parts {
        out.extend(p?);
    }
    Some(out)
}

/// Parses `{..}, {..}, ..` (a slice of a JSON array: elements, commas, whitespace, and an
/// optional trailing comma left by the cut). `None` on any error.
fn parse_elements(s: &[u8]) -> Option<Vec<Detection>> {
    let is_ws = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    let mut out: Vec<Detection> = Vec::new();
    let mut pos = 0;
    loop {
        if out.len() == 1 {
            // Size the output from the first element's length.
            out.reserve(s.len() / pos.max(1) + 16);
        }
        while pos < s.len() && is_ws(s[pos]) {
            pos += 1;
        }
        if pos == s.len() {
            return Some(out);
        }
        let mut it = serde_json::Deserializer::from_slice(&s[pos..]).into_iter::<Detection>();
        out.push(it.next()?.ok()?);
        pos += it.byte_offset();
        while pos < s.len() && is_ws(s[pos]) {
            pos += 1;
        }
        if pos < s.len() {
            if s[pos] != b',' {
                return None;
            }
            pos += 1;
        }
    }
}

fn memchr(c: u8, s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == c)
}

fn read(path: &Path) -> Result<Vec<u8>, EvalError> {
    std::fs::read(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// serde_json with a clear message for Python's `NaN`/`Infinity` literals, which are not JSON.
fn parse_json<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, EvalError> {
    serde_json::from_slice(bytes).map_err(|source| {
        let (line, column) = (source.line(), source.column());
        if line > 0 {
            let text = bytes.split(|&b| b == b'\n').nth(line - 1).unwrap_or(&[]);
            let lo = column.saturating_sub(12).min(text.len());
            let hi = (column + 12).min(text.len());
            let near = String::from_utf8_lossy(&text[lo..hi]);
            if near.contains("NaN") || near.contains("Infinity") {
                return EvalError::NonFiniteJson {
                    what: what.to_string(),
                    line,
                    column,
                };
            }
        }
        EvalError::Json {
            what: what.to_string(),
            source,
        }
    })
}

/// The 12 numbers of `COCOeval.summarize()` (fractions, -1 where undefined).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "AP50")]
    pub ap50: f64,
    #[serde(rename = "AP75")]
    pub ap75: f64,
    #[serde(rename = "APs")]
    pub ap_small: f64,
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    #[serde(rename = "APl")]
    pub ap_large: f64,
    #[serde(rename = "AR1")]
    pub ar1: f64,
    #[serde(rename = "AR10")]
    pub ar10: f64,
    #[serde(rename = "AR100")]
    pub ar100: f64,
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

impl Summary {
    /// The names mmdet logs for one IoU type (`prefix` `bbox` / `segm`): `{prefix}_mAP`,
    /// `_mAP_50`, `_mAP_75`, `_mAP_s`, `_mAP_m`, `_mAP_l` — the `metrics` schema of every cnx
    /// command's JSON (train log, test, eval, demo, compare).
    pub fn metrics(&self, prefix: &str) -> std::collections::BTreeMap<String, f64> {
        [
            ("mAP", self.ap),
            ("mAP_50", self.ap50),
            ("mAP_75", self.ap75),
            ("mAP_s", self.ap_small),
            ("mAP_m", self.ap_medium),
            ("mAP_l", self.ap_large),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}_{k}"), v))
        .collect()
    }

    /// In pycocotools' `stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    fn from_array(s: [f64; 12]) -> Summary {
        Summary {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }

    /// The 12 lines pycocotools prints, byte for byte (one `\n` after each).
    pub fn format_pycocotools(&self) -> String {
        let s = self.to_array();
        let mut out = String::new();
        for (i, (ap, iou, area, md)) in SUMMARY_ROWS.iter().enumerate() {
            let (title, ty) = if *ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            let iou_str = match iou {
                None => "0.50:0.95".to_string(),
                Some(t) => format!("{t:.2}"),
            };
            out.push_str(&format!(
                " {title:<18} {ty} @[ IoU={iou_str:<9} | area={area:>6} | maxDets={md:>3} ] = {:.3}\n",
                s[i]
            ));
        }
        out
    }
}

/// `(is_ap, iou_thr, area, max_dets)` of each summary line, as in `_summarizeDets`.
const SUMMARY_ROWS: [(bool, Option<f64>, &str, usize); 12] = [
    (true, None, "all", 100),
    (true, Some(0.5), "all", 100),
    (true, Some(0.75), "all", 100),
    (true, None, "small", 100),
    (true, None, "medium", 100),
    (true, None, "large", 100),
    (false, None, "all", 1),
    (false, None, "all", 10),
    (false, None, "all", 100),
    (false, None, "small", 100),
    (false, None, "medium", 100),
    (false, None, "large", 100),
];

/// Accumulated results (`COCOeval.eval`) and the summary.
#[derive(Clone, Debug)]
pub struct CocoEval {
    pub iou_type: IouType,
    /// Category ids, in the `K` order of the arrays (sorted).
    pub cat_ids: Vec<i64>,
    /// Category names, same order.
    pub cat_names: Vec<String>,
    /// `precision[T, R, K, A, M]`, C order: index with [`CocoEval::precision_at`].
    pub precision: Vec<f64>,
    /// `recall[T, K, A, M]`, C order.
    pub recall: Vec<f64>,
    pub summary: Summary,
    /// Number of images evaluated.
    pub num_images: usize,
    /// Number of detections evaluated.
    pub num_detections: usize,
}

impl CocoEval {
    /// Number of categories (`K`).
    pub fn k(&self) -> usize {
        self.cat_ids.len()
    }

    /// `precision[t, r, k, a, m]`.
    pub fn precision_at(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> f64 {
        self.precision[(((t * R + r) * self.k() + k) * A + a) * M + m]
    }

    /// `recall[t, k, a, m]`.
    pub fn recall_at(&self, t: usize, k: usize, a: usize, m: usize) -> f64 {
        self.recall[((t * self.k() + k) * A + a) * M + m]
    }

    /// Per-category AP@[.5:.95] (area all, 100 dets) as detectron/mmdet compute it: the mean
    /// of `precision[:, :, k, 0, -1]` over entries > -1; `None` for categories without GT.
    pub fn per_category_ap(&self) -> Vec<(i64, String, Option<f64>)> {
        (0..self.k())
            .map(|k| {
                let mut v = Vec::with_capacity(T * R);
                for t in 0..T {
                    for r in 0..R {
                        let p = self.precision_at(t, r, k, 0, M - 1);
                        if p > -1.0 {
                            v.push(p);
                        }
                    }
                }
                let ap = if v.is_empty() {
                    None
                } else {
                    Some(numpy::mean(&v))
                };
                (self.cat_ids[k], self.cat_names[k].clone(), ap)
            })
            .collect()
    }
}

/// Phase timings on stderr when `CNX_EVAL_TIMING` is set (for profiling the benchmark).
struct Timer {
    on: bool,
    t: std::time::Instant,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            on: std::env::var_os("CNX_EVAL_TIMING").is_some(),
            t: std::time::Instant::now(),
        }
    }
    fn lap(&mut self, what: &str) {
        if self.on {
            eprintln!("[cnx-eval] {what}: {:.3}s", self.t.elapsed().as_secs_f64());
            self.t = std::time::Instant::now();
        }
    }
}

/// A ground truth prepared for one evaluation.
struct PGt {
    id: i64,
    area: f64,
    crowd: bool,
    /// The annotation's box (bbox mode) or the mask's `toBbox` (segm mode, for `rleIou`'s
    /// box pre-check).
    bbox: [f64; 4],
    rle: Option<Rle>,
}

/// A detection prepared for one evaluation (pycocotools' `loadRes` applied).
struct PDt<'a> {
    score: f64,
    area: f64,
    bbox: [f64; 4],
    /// Borrowed from the detection when it already is an RLE (no copy of 500k masks).
    rle: Option<Cow<'a, Rle>>,
    /// `toBbox` and area of `rle` (segm mode).
    rle_bbox: [f64; 4],
    rle_area: u32,
}

/// Per (image, category) outcome of `evaluateImg`, for all area ranges at maxDet = 100.
struct ImgEval {
    /// Scores of the kept detections, sorted (stable) high to low.
    scores: Vec<f64>,
    /// `codes[d * A * T + a * T + t]`: 0 ignored, 1 true positive, 2 false positive.
    /// Detection-major: `accumulate` reorders detections, each taking its codes along.
    codes: Vec<u8>,
    /// Non-ignored ground truths per area range.
    npig: [u32; A],
}

/// Evaluates detections against the ground truth, like
/// `COCOeval(gt, gt.loadRes(dets), iou_type)` followed by `evaluate(); accumulate(); summarize()`.
pub fn evaluate(gt: &CocoGt, dets: &[Detection], iou_type: IouType) -> Result<CocoEval, EvalError> {
    let img_ids = gt.img_ids();
    let cat_ids = gt.cat_ids();
    let (ni, nk) = (img_ids.len(), cat_ids.len());
    let img_pos: IdMap<usize> = img_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let cat_pos: IdMap<usize> = cat_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();

    let mut timer = Timer::new();
    let pdts = prepare_dets(gt, dets, iou_type, &img_pos, &cat_pos)?;
    timer.lap("prepare detections");
    let (pgts, gt_keys) = prepare_gts(gt, iou_type, &img_pos, &cat_pos)?;
    timer.lap("prepare ground truth");

    // CSR grouping by key = i * K + k, keeping file order inside a group, as pycocotools'
    // per-image annotation lists do. Image-major because results files list an image's
    // detections together: evaluating the groups in this order reads the detections nearly
    // sequentially, where category-major order jumps through the whole array per category.
    let nkeys = ni * nk;
    let dt_keys: Vec<usize> = dets
        .par_iter()
        .map(|d| img_pos[&d.image_id] * nk + cat_pos[&d.category_id])
        .collect();
    let (gt_off, gt_idx) = group(&gt_keys, nkeys);
    let (dt_off, dt_idx) = group(&dt_keys, nkeys);

    let mut keys: Vec<usize> = Vec::new();
    for key in 0..nkeys {
        if gt_off[key + 1] > gt_off[key] || dt_off[key + 1] > dt_off[key] {
            keys.push(key);
        }
    }
    let iou_thrs = iou_thrs();
    let evals: Vec<ImgEval> = keys
        .par_iter()
        .map(|&key| {
            let g = &gt_idx[gt_off[key]..gt_off[key + 1]];
            let d = &dt_idx[dt_off[key]..dt_off[key + 1]];
            evaluate_img(&pgts, &pdts, g, d, iou_type, &iou_thrs)
        })
        .collect();
    timer.lap("evaluateImg");

    // Accumulate per category in parallel. `keys` is sorted, so grouping its positions by
    // category keeps each category's entries in image order.
    let cat_of: Vec<usize> = keys.iter().map(|&key| key % nk).collect();
    let (kstart, kevals) = group(&cat_of, nk);
    let rec_thrs = rec_thrs();
    let per_k: Vec<(Vec<f64>, Vec<f64>)> = (0..nk)
        .into_par_iter()
        .map(|k| accumulate_cat(&evals, &kevals[kstart[k]..kstart[k + 1]], &rec_thrs))
        .collect();
    let mut precision = vec![-1.0; T * R * nk * A * M];
    let mut recall = vec![-1.0; T * nk * A * M];
    for (k, (p, r)) in per_k.iter().enumerate() {
        // p is [T, R, A, M]; r is [T, A, M].
        for t in 0..T {
            for rr in 0..R {
                for a in 0..A {
                    for m in 0..M {
                        precision[(((t * R + rr) * nk + k) * A + a) * M + m] =
                            p[((t * R + rr) * A + a) * M + m];
                    }
                }
            }
            for a in 0..A {
                for m in 0..M {
                    recall[((t * nk + k) * A + a) * M + m] = r[(t * A + a) * M + m];
                }
            }
        }
    }
    let summary = summarize(&precision, &recall, nk, &iou_thrs);
    timer.lap("accumulate + summarize");
    Ok(CocoEval {
        iou_type,
        cat_names: cat_ids
            .iter()
            .map(|c| gt.category(*c).map(|c| c.name.clone()).unwrap_or_default())
            .collect(),
        cat_ids,
        precision,
        recall,
        summary,
        num_images: ni,
        num_detections: dets.len(),
    })
}

/// Stable counting sort of item indices by key: `(offsets, items)`.
fn group(keys: &[usize], nkeys: usize) -> (Vec<usize>, Vec<u32>) {
    let mut off = vec![0usize; nkeys + 1];
    for &k in keys {
        if k != usize::MAX {
            off[k + 1] += 1;
        }
    }
    for i in 0..nkeys {
        off[i + 1] += off[i];
    }
    let mut fill = off.clone();
    let mut items = vec![0u32; off[nkeys]];
    for (i, &k) in keys.iter().enumerate() {
        if k != usize::MAX {
            items[fill[k]] = i as u32;
            fill[k] += 1;
        }
    }
    (off, items)
}

/// pycocotools' `loadRes` rules plus validation; errors name the offending result.
fn prepare_dets<'a>(
    gt: &CocoGt,
    dets: &'a [Detection],
    iou_type: IouType,
    img_pos: &IdMap<usize>,
    cat_pos: &IdMap<usize>,
) -> Result<Vec<PDt<'a>>, EvalError> {
    // Bad ids and scores first, with counts, so one run reports the scale of the problem.
    let mut bad_img: Option<(usize, i64)> = None;
    let mut n_bad_img = 0;
    let mut bad_cat: Option<(usize, i64)> = None;
    let mut n_bad_cat = 0;
    for (i, d) in dets.iter().enumerate() {
        if !img_pos.contains_key(&d.image_id) {
            n_bad_img += 1;
            bad_img.get_or_insert((i, d.image_id));
        }
        if !cat_pos.contains_key(&d.category_id) {
            n_bad_cat += 1;
            bad_cat.get_or_insert((i, d.category_id));
        }
        if !d.score.is_finite() {
            return Err(EvalError::NonFiniteScore {
                index: i,
                image_id: d.image_id,
                score: d.score,
            });
        }
    }
    if let Some((index, first)) = bad_img {
        return Err(EvalError::UnknownImage {
            first,
            index,
            count: n_bad_img,
        });
    }
    if let Some((index, first)) = bad_cat {
        return Err(EvalError::UnknownCategory {
            first,
            index,
            count: n_bad_cat,
        });
    }
    // pycocotools decides from the first result: a non-empty bbox means "box results" (area =
    // w*h, even in segm mode), otherwise a segmentation means "mask results" (area and box
    // from the RLE).
    let box_results = match dets.first() {
        None => true,
        Some(d) if d.bbox.is_some() => true,
        Some(d) if d.segmentation.is_some() => false,
        Some(_) => {
            return Err(EvalError::BadResult {
                index: 0,
                image_id: dets[0].image_id,
                what: "has neither `bbox` nor `segmentation`".into(),
            })
        }
    };
    dets.par_iter()
        .enumerate()
        .map(|(i, d)| {
            let bad = |what: String| EvalError::BadResult {
                index: i,
                image_id: d.image_id,
                what,
            };
            let im = gt.image(d.image_id).expect("checked above");
            let rle = |s: &'a Segmentation| -> Result<Cow<'a, Rle>, EvalError> {
                seg_to_rle(s, im.height, im.width).map_err(&bad)
            };
            if box_results {
                let bb = d.bbox.ok_or_else(|| {
                    bad("has no `bbox` (the first result has one, so all need one)".into())
                })?;
                let area = bb[2] * bb[3];
                let r = if iou_type == IouType::Segm {
                    Some(match &d.segmentation {
                        Some(s) => rle(s)?,
                        // loadRes gives box results the box as a polygon.
                        None => Cow::Owned(Rle::from_bbox(bb, im.height, im.width)),
                    })
                } else {
                    None
                };
                let (rle_bbox, rle_area) = r
                    .as_ref()
                    .map_or(([0.0; 4], 0), |r| (r.to_bbox(), r.area()));
                Ok(PDt {
                    score: d.score,
                    area,
                    bbox: bb,
                    rle: r,
                    rle_bbox,
                    rle_area,
                })
            } else {
                let s = d.segmentation.as_ref().ok_or_else(|| {
                    bad("has no `segmentation` (the first result has one, so all need one)".into())
                })?;
                let r = rle(s)?;
                let rle_area = r.area();
                let rle_bbox = r.to_bbox();
                let bbox = d.bbox.unwrap_or(rle_bbox);
                Ok(PDt {
                    score: d.score,
                    area: rle_area as f64,
                    bbox,
                    rle: if iou_type == IouType::Segm {
                        Some(r)
                    } else {
                        None
                    },
                    rle_bbox,
                    rle_area,
                })
            }
        })
        .collect()
}

/// pycocotools `annToRLE`.
fn seg_to_rle(s: &Segmentation, h: usize, w: usize) -> Result<Cow<'_, Rle>, String> {
    match s {
        Segmentation::Polygons(p) => Rle::from_segm_list(p, h, w)
            .map(Cow::Owned)
            .map_err(|e| format!("malformed polygon: {e}")),
        Segmentation::Rle(r) => Ok(Cow::Borrowed(r)),
        Segmentation::Invalid(m) => Err(format!("malformed segmentation: {m}")),
    }
}

/// Ground truths of the evaluated images and categories (others are skipped, as pycocotools'
/// `getAnnIds(imgIds, catIds)` does), with their group keys (`usize::MAX` = skipped).
fn prepare_gts(
    gt: &CocoGt,
    iou_type: IouType,
    img_pos: &IdMap<usize>,
    cat_pos: &IdMap<usize>,
) -> Result<(Vec<PGt>, Vec<usize>), EvalError> {
    let nk = cat_pos.len();
    let out: Vec<(PGt, usize)> = gt
        .annotations
        .par_iter()
        .map(|a| {
            let bad = |what: String| EvalError::BadAnnotation {
                id: a.id,
                image_id: a.image_id,
                what,
            };
            let key = match (img_pos.get(&a.image_id), cat_pos.get(&a.category_id)) {
                (Some(&i), Some(&k)) => i * nk + k,
                _ => usize::MAX,
            };
            let mut p = PGt {
                id: a.id,
                area: a.area,
                crowd: a.iscrowd,
                bbox: [0.0; 4],
                rle: None,
            };
            if key == usize::MAX {
                return Ok((p, key));
            }
            match iou_type {
                IouType::Bbox => {
                    p.bbox = a
                        .bbox
                        .and_then(|b| b.0)
                        .ok_or_else(|| bad("has no `bbox`".into()))?;
                }
                IouType::Segm => {
                    let im = gt.image(a.image_id).expect("key exists");
                    let s = a
                        .segmentation
                        .as_ref()
                        .ok_or_else(|| bad("has no `segmentation`".into()))?;
                    let r = seg_to_rle(s, im.height, im.width)
                        .map_err(bad)?
                        .into_owned();
                    p.bbox = r.to_bbox();
                    p.rle = Some(r);
                }
            }
            Ok((p, key))
        })
        .collect::<Result<_, EvalError>>()?;
    Ok(out.into_iter().unzip())
}

/// `computeIoU` + `evaluateImg` for one (image, category), all area ranges.
fn evaluate_img(
    gts: &[PGt],
    dts: &[PDt<'_>],
    g: &[u32],
    d: &[u32],
    iou_type: IouType,
    iou_thrs: &[f64; T],
) -> ImgEval {
    let max_det = MAX_DETS[M - 1];
    // Stable sort by score, high first (np.argsort(-score, kind='mergesort')), cut to maxDet.
    // Sorted as (score, index) pairs: comparing through the index would chase pointers into
    // the detections on every comparison.
    let mut sd: Vec<(f64, u32)> = d.iter().map(|&j| (dts[j as usize].score, j)).collect();
    sd.sort_by(|a, b| (-a.0).partial_cmp(&-b.0).unwrap());
    sd.truncate(max_det);
    let (scores, dord): (Vec<f64>, Vec<u32>) = sd.into_iter().unzip();
    let nd = dord.len();
    let ng = g.len();
    // IoU matrix [D, G] with the ground truths in file order.
    let mut ious = vec![0.0f64; nd * ng];
    if nd > 0 && ng > 0 {
        match iou_type {
            IouType::Bbox => {
                for (di, &dj) in dord.iter().enumerate() {
                    let db = &dts[dj as usize].bbox;
                    for (gi, &gj) in g.iter().enumerate() {
                        let gg = &gts[gj as usize];
                        ious[di * ng + gi] = bbox_iou(db, &gg.bbox, gg.crowd);
                    }
                }
            }
            IouType::Segm => {
                for (di, &dj) in dord.iter().enumerate() {
                    let dd = &dts[dj as usize];
                    let dr = dd.rle.as_ref().unwrap();
                    for (gi, &gj) in g.iter().enumerate() {
                        let gg = &gts[gj as usize];
                        ious[di * ng + gi] = rle_iou_pair(
                            dr,
                            gg.rle.as_ref().unwrap(),
                            &dd.rle_bbox,
                            &gg.bbox,
                            gg.crowd,
                            dd.rle_area,
                        );
                    }
                }
            }
        }
    }
    // Each detection's best IoU, so that thresholds above it skip the ground-truth scan. A NaN
    // IoU (empty boxes) passes pycocotools' `iou < thr` test, so it counts as reaching all.
    let d_best: Vec<f64> = (0..nd)
        .map(|di| {
            ious[di * ng..(di + 1) * ng]
                .iter()
                .fold(f64::NEG_INFINITY, |b, &v| {
                    if v.is_nan() {
                        f64::INFINITY
                    } else {
                        b.max(v)
                    }
                })
        })
        .collect();
    // What the matching loops read, gathered once instead of per area range and threshold.
    let d_area: Vec<f64> = dord.iter().map(|&j| dts[j as usize].area).collect();
    let g_crowd: Vec<bool> = g.iter().map(|&j| gts[j as usize].crowd).collect();
    let mut codes = vec![0u8; A * T * nd];
    let mut npig = [0u32; A];
    let mut gt_ig = vec![false; ng];
    let mut gtind: Vec<usize> = Vec::with_capacity(ng);
    let mut gtm = vec![false; ng];
    let mut dtm = vec![false; nd];
    let mut dt_ig = vec![false; nd];
    let mut dt_out = vec![false; nd];
    for (a, rng) in AREA_RNG.iter().enumerate() {
        for (gi, &gj) in g.iter().enumerate() {
            let gg = &gts[gj as usize];
            gt_ig[gi] = gg.crowd || gg.area < rng[0] || gg.area > rng[1];
        }
        for (di, &area) in d_area.iter().enumerate() {
            dt_out[di] = area < rng[0] || area > rng[1];
        }
        npig[a] = gt_ig.iter().filter(|&&x| !x).count() as u32;
        // Non-ignored first, stable.
        gtind.clear();
        gtind.extend((0..ng).filter(|&i| !gt_ig[i]));
        gtind.extend((0..ng).filter(|&i| gt_ig[i]));
        for (t, &thr) in iou_thrs.iter().enumerate() {
            gtm.iter_mut().for_each(|x| *x = false);
            for di in 0..nd {
                let mut iou = thr.min(1.0 - 1e-10);
                let mut m: Option<usize> = None;
                // No IoU reaches the threshold: the scan below would match nothing.
                let gtind: &[usize] = if d_best[di] < iou { &[] } else { &gtind };
                for &gi in gtind {
                    // Already matched, and not a crowd: skip.
                    if gtm[gi] && !g_crowd[gi] {
                        continue;
                    }
                    // Matched to a regular GT and reached the ignored ones: stop.
                    if let Some(mm) = m {
                        if !gt_ig[mm] && gt_ig[gi] {
                            break;
                        }
                    }
                    let v = ious[di * ng + gi];
                    if v < iou {
                        continue;
                    }
                    iou = v;
                    m = Some(gi);
                }
                match m {
                    Some(mm) => {
                        dt_ig[di] = gt_ig[mm];
                        // pycocotools stores the GT id and later tests it against 0.
                        dtm[di] = gts[g[mm] as usize].id != 0;
                        gtm[mm] = true;
                    }
                    None => {
                        dt_ig[di] = false;
                        dtm[di] = false;
                    }
                }
            }
            let at = a * T + t;
            for di in 0..nd {
                let ig = dt_ig[di] || (!dtm[di] && dt_out[di]);
                codes[di * A * T + at] = if ig {
                    0
                } else if dtm[di] {
                    1
                } else {
                    2
                };
            }
        }
    }
    ImgEval {
        scores,
        codes,
        npig,
    }
}

/// `accumulate` for one category: precision `[T, R, A, M]` and recall `[T, A, M]`.
/// `idx`: the category's entries of `evals`, in image order.
fn accumulate_cat(evals: &[ImgEval], idx: &[u32], rec_thrs: &[f64; R]) -> (Vec<f64>, Vec<f64>) {
    let mut precision = vec![-1.0; T * R * A * M];
    let mut recall = vec![-1.0; T * A * M];
    if idx.is_empty() {
        return (precision, recall);
    }
    // Concatenate in image order and stable-sort by score, high first. The order for a
    // smaller maxDet is the same order filtered (stable sorts commute with filtering). The
    // category's entries are spread over all of `evals`: copying each one's scores, ranks and
    // codes once into local arrays costs one random access per entry, not one per detection.
    let n: usize = idx.iter().map(|&e| evals[e as usize].scores.len()).sum();
    let mut all: Vec<(f64, u32)> = Vec::with_capacity(n);
    let mut ranks: Vec<u32> = Vec::with_capacity(n);
    let mut dcodes: Vec<u8> = Vec::with_capacity(n * A * T);
    for &e in idx {
        let ev = &evals[e as usize];
        for (d, &s) in ev.scores.iter().enumerate() {
            all.push((s, all.len() as u32));
            ranks.push(d as u32);
        }
        dcodes.extend_from_slice(&ev.codes);
    }
    all.sort_by(|x, y| (-x.0).partial_cmp(&(-y.0)).unwrap());
    // Rank of each detection in its image, and its codes gathered into score order per
    // (area, threshold), so the loops below read contiguous memory.
    let rank: Vec<u32> = all.iter().map(|x| ranks[x.1 as usize]).collect();
    let mut codes = vec![0u8; A * T * n];
    for (j, &(_, i)) in all.iter().enumerate() {
        let c = &dcodes[i as usize * A * T..(i as usize + 1) * A * T];
        for (at, &c) in c.iter().enumerate() {
            codes[at * n + j] = c;
        }
    }
    drop(dcodes);
    drop(all);
    // Only true positives can raise precision: a false positive lowers it and an ignored
    // detection repeats the previous value. So the right-to-left maximum that pycocotools
    // takes over all entries is the maximum over the true positives from the sampled one on,
    // and the entry np.searchsorted(rc, thr, 'left') finds for thr > 0 is a true positive
    // (recall only grows there). Keeping (rc, pr) of the true positives alone, computed
    // with the same expressions, gives identical numbers with far fewer divisions.
    //
    // The three maxDet settings are one pass over the detections: a detection of rank r in its
    // image counts for every maxDet > r, with its own cumulative counts per setting.
    let mut rc: [Vec<f64>; M] = Default::default();
    let mut pr: [Vec<f64>; M] = Default::default();
    let eps = f64::EPSILON; // np.spacing(1)
    for a in 0..A {
        let npig: u64 = idx.iter().map(|&e| evals[e as usize].npig[a] as u64).sum();
        if npig == 0 {
            continue;
        }
        let npig = npig as f64;
        for t in 0..T {
            for m in 0..M {
                rc[m].clear();
                pr[m].clear();
            }
            let mut tp = [0.0f64; M];
            let mut fp = [0.0f64; M];
            let mut nd = [0usize; M];
            let cs = &codes[(a * T + t) * n..(a * T + t + 1) * n];
            for (&c, &r) in cs.iter().zip(&rank) {
                for m in 0..M {
                    if r >= MAX_DETS[m] as u32 {
                        continue;
                    }
                    nd[m] += 1;
                    match c {
                        1 => {
                            tp[m] += 1.0;
                            rc[m].push(tp[m] / npig);
                            pr[m].push(tp[m] / (fp[m] + tp[m] + eps));
                        }
                        2 => fp[m] += 1.0,
                        _ => {}
                    }
                }
            }
            for m in 0..M {
                let (rc, pr) = (&rc[m], &mut pr[m]);
                // rc[-1] of pycocotools (tp_total / npig; 0 without true positives).
                recall[(t * A + a) * M + m] = if nd[m] > 0 { tp[m] / npig } else { 0.0 };
                for i in (1..pr.len()).rev() {
                    if pr[i] > pr[i - 1] {
                        pr[i - 1] = pr[i];
                    }
                }
                // rc and the thresholds are both non-decreasing: one merged sweep.
                let mut pi = 0;
                for (ri, &thr) in rec_thrs.iter().enumerate() {
                    while pi < rc.len() && rc[pi] < thr {
                        pi += 1;
                    }
                    // thr = 0 samples the first entry: the overall maximum when there is a
                    // true positive, else a zero precision. Past the end, pycocotools'
                    // try/except leaves 0.
                    let q = if pi < pr.len() { pr[pi] } else { 0.0 };
                    precision[((t * R + ri) * A + a) * M + m] = q;
                }
            }
        }
    }
    (precision, recall)
}

/// `summarize()`: means over entries > -1 in numpy's element order and summation.
fn summarize(precision: &[f64], recall: &[f64], nk: usize, iou_thrs: &[f64; T]) -> Summary {
    let mut stats = [0.0f64; 12];
    for (i, (ap, iou, area, md)) in SUMMARY_ROWS.iter().enumerate() {
        let a = AREA_LBL.iter().position(|l| l == area).unwrap();
        let m = MAX_DETS.iter().position(|x| x == md).unwrap();
        let ts: Vec<usize> = match iou {
            None => (0..T).collect(),
            Some(v) => (0..T).filter(|&t| iou_thrs[t] == *v).collect(),
        };
        let mut vals = Vec::new();
        for &t in &ts {
            if *ap {
                for r in 0..R {
                    for k in 0..nk {
                        let p = precision[(((t * R + r) * nk + k) * A + a) * M + m];
                        if p > -1.0 {
                            vals.push(p);
                        }
                    }
                }
            } else {
                for k in 0..nk {
                    let p = recall[((t * nk + k) * A + a) * M + m];
                    if p > -1.0 {
                        vals.push(p);
                    }
                }
            }
        }
        stats[i] = if vals.is_empty() {
            -1.0
        } else {
            numpy::mean(&vals)
        };
    }
    Summary::from_array(stats)
}
