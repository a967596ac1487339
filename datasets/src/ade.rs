//! ADE20K (`ADEChallengeData2016` layout) semantic segmentation with mmseg 0.x semantics:
//! reduce_zero_label, ratio resize (image bilinear, labels nearest), random crop with
//! cat_max_ratio retries, flip, PhotoMetricDistortion (cv2 uint8 HSV conversions), normalize,
//! pad to the crop size (image 0, label 255); test-time keep-ratio resize.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{DatasetError, Result};
use crate::image_io::{self, Image8};
use crate::loader::Source;
use crate::pipeline::{self, ImageMeta};

/// Ignore index of labels.
pub const IGNORE: u8 = 255;

/// One split of an ADE-style dataset: image/label path pairs, sorted by file name.
#[derive(Clone, Debug)]
pub struct AdeDataset {
    pub root: PathBuf,
    pub split: String,
    pub items: Vec<(PathBuf, PathBuf)>,
    /// Class names from `objectInfo150.txt` / `objectInfo.txt` when present (label order).
    pub class_names: Vec<String>,
}

impl AdeDataset {
    /// `root/images/{split}/*.jpg` with `root/annotations/{split}/*.png` (split: `training` or
    /// `validation`).
    pub fn load(root: impl AsRef<Path>, split: &str) -> Result<Self> {
        let root = root.as_ref();
        let idir = root.join("images").join(split);
        let adir = root.join("annotations").join(split);
        let rd = std::fs::read_dir(&idir).map_err(|e| DatasetError::io(&idir, e))?;
        let mut items = Vec::new();
        for e in rd {
            let p = e.map_err(|e| DatasetError::io(&idir, e))?.path();
            let ext = p
                .extension()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            if ext == "jpg" || ext == "jpeg" || ext == "png" {
                let stem = p.file_stem().unwrap().to_string_lossy().to_string();
                items.push((p, adir.join(format!("{stem}.png"))));
            }
        }
        items.sort();
        let mut class_names = Vec::new();
        for f in ["objectInfo150.txt", "objectInfo.txt"] {
            if let Ok(s) = std::fs::read_to_string(root.join(f)) {
                // Last tab-separated column is the name list ("wall" or "tree;trees"); first
                // line is a header.
                class_names = s
                    .lines()
                    .skip(1)
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| {
                        l.split('\t')
                            .next_back()
                            .unwrap_or("")
                            .split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_string()
                    })
                    .collect();
                break;
            }
        }
        Ok(AdeDataset {
            root: root.to_path_buf(),
            split: split.to_string(),
            items,
            class_names,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Image (RGB) and label of item `i`; labels with reduce_zero_label applied when asked.
    pub fn load_item(&self, i: usize, reduce_zero_label: bool) -> Result<(Image8, Image8)> {
        let (ip, lp) = &self.items[i];
        let img = image_io::read_rgb(ip)?;
        let mut lab = image_io::read_label(lp)?;
        if (lab.w, lab.h) != (img.w, img.h) {
            return Err(DatasetError::LabelSize {
                path: lp.clone(),
                lw: lab.w as u32,
                lh: lab.h as u32,
                w: img.w as u32,
                h: img.h as u32,
            });
        }
        if reduce_zero_label {
            reduce_zero(&mut lab.data);
        }
        Ok((img, lab))
    }
}

/// mmseg reduce_zero_label: 0 -> 255, k -> k-1 (255 stays 255).
pub fn reduce_zero(labels: &mut [u8]) {
    for v in labels {
        *v = if *v == 0 || *v == 255 { 255 } else { *v - 1 };
    }
}

/// Parameters of one PhotoMetricDistortion draw (`None` = step skipped).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct PhotoParams {
    pub brightness: Option<f32>,
    /// true: contrast before the HSV steps (mmseg `mode == 1`), false: after.
    pub contrast_first: bool,
    pub contrast: Option<f32>,
    pub saturation: Option<f32>,
    pub hue: Option<i32>,
}

impl PhotoParams {
    /// Draw as mmseg 0.x does, in its order (brightness ±32, mode coin, contrast [0.5, 1.5],
    /// saturation [0.5, 1.5], hue randint(-18, 18) i.e. -18..=17).
    pub fn sample(rng: &mut ChaCha8Rng) -> Self {
        let mut p = PhotoParams::default();
        if rng.gen_range(0..2) == 1 {
            p.brightness = Some(rng.gen_range(-32.0f64..32.0) as f32);
        }
        p.contrast_first = rng.gen_range(0..2) == 1;
        let contrast = |rng: &mut ChaCha8Rng| {
            (rng.gen_range(0..2) == 1).then(|| rng.gen_range(0.5f64..1.5) as f32)
        };
        if p.contrast_first {
            p.contrast = contrast(rng);
        }
        if rng.gen_range(0..2) == 1 {
            p.saturation = Some(rng.gen_range(0.5f64..1.5) as f32);
        }
        if rng.gen_range(0..2) == 1 {
            p.hue = Some(rng.gen_range(-18..18));
        }
        if !p.contrast_first {
            p.contrast = contrast(rng);
        }
        p
    }

    /// Apply to an RGB image in place (mmseg operates on BGR; every step is channel-symmetric
    /// except the HSV conversion, which is done with the channels named correctly).
    pub fn apply(&self, img: &mut Image8) {
        if let Some(b) = self.brightness {
            convert(&mut img.data, 1.0, b);
        }
        if self.contrast_first {
            if let Some(c) = self.contrast {
                convert(&mut img.data, c, 0.0);
            }
        }
        if let Some(s) = self.saturation {
            let mut hsv = rgb_to_hsv(img);
            for px in hsv.data.chunks_exact_mut(3) {
                px[1] = convert1(px[1], s, 0.0);
            }
            *img = hsv_to_rgb(&hsv);
        }
        if let Some(d) = self.hue {
            let mut hsv = rgb_to_hsv(img);
            for px in hsv.data.chunks_exact_mut(3) {
                px[0] = (px[0] as i32 + d).rem_euclid(180) as u8;
            }
            *img = hsv_to_rgb(&hsv);
        }
        if !self.contrast_first {
            if let Some(c) = self.contrast {
                convert(&mut img.data, c, 0.0);
            }
        }
    }
}

/// mmseg `convert`: `uint8(clip(float32(x) * alpha + beta, 0, 255))` (truncation).
#[inline]
fn convert1(v: u8, alpha: f32, beta: f32) -> u8 {
    (v as f32 * alpha + beta).clamp(0.0, 255.0) as u8
}

fn convert(data: &mut [u8], alpha: f32, beta: f32) {
    for v in data {
        *v = convert1(*v, alpha, beta);
    }
}

fn hsv_tables() -> &'static ([i32; 256], [i32; 256]) {
    static T: std::sync::OnceLock<([i32; 256], [i32; 256])> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut sdiv = [0i32; 256];
        let mut hdiv = [0i32; 256];
        for i in 1..256 {
            sdiv[i] = ((255u32 << 12) as f64 / i as f64).round_ties_even() as i32;
            hdiv[i] = ((180u32 << 12) as f64 / (6.0 * i as f64)).round_ties_even() as i32;
        }
        (sdiv, hdiv)
    })
}

/// cv2.cvtColor(BGR2HSV) on 8-bit data (H in 0..180), given RGB input. Output channels H, S, V.
pub fn rgb_to_hsv(img: &Image8) -> Image8 {
    let (sdiv, hdiv) = hsv_tables();
    let mut out = Image8::new(img.w, img.h, 3);
    for (s, d) in img.data.chunks_exact(3).zip(out.data.chunks_exact_mut(3)) {
        let (r, g, b) = (s[0] as i32, s[1] as i32, s[2] as i32);
        let v = b.max(g).max(r);
        let vmin = b.min(g).min(r);
        let diff = v - vmin;
        let vr = if v == r { -1 } else { 0 };
        let vg = if v == g { -1 } else { 0 };
        let sat = (diff * sdiv[v as usize] + (1 << 11)) >> 12;
        let mut h =
            (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
        h = (h * hdiv[diff as usize] + (1 << 11)) >> 12;
        if h < 0 {
            h += 180;
        }
        d[0] = h as u8;
        d[1] = sat as u8;
        d[2] = v as u8;
    }
    out
}

/// cv2.cvtColor(HSV2BGR) on 8-bit data (float computation, truncated), returning RGB.
pub fn hsv_to_rgb(hsv: &Image8) -> Image8 {
    const SECTOR: [[usize; 3]; 6] = [
        [1, 3, 0],
        [1, 0, 2],
        [3, 0, 1],
        [0, 2, 1],
        [0, 1, 3],
        [2, 1, 0],
    ];
    let mut out = Image8::new(hsv.w, hsv.h, 3);
    let hscale = 6.0f32 / 180.0;
    for (s, d) in hsv.data.chunks_exact(3).zip(out.data.chunks_exact_mut(3)) {
        let mut h = s[0] as f32;
        let sat = s[1] as f32 * (1.0 / 255.0);
        let v = s[2] as f32 * (1.0 / 255.0);
        let (b, g, r);
        if sat == 0.0 {
            b = v;
            g = v;
            r = v;
        } else {
            h *= hscale;
            h %= 6.0;
            let mut sector = h.floor() as i32;
            h -= sector as f32;
            if !(0..6).contains(&sector) {
                sector = 0;
                h = 0.0;
            }
            let tab = [
                v,
                v * (1.0 - sat),
                v * (1.0 - sat * h),
                v * (1.0 - sat * (1.0 - h)),
            ];
            let sd = SECTOR[sector as usize];
            b = tab[sd[0]];
            g = tab[sd[1]];
            r = tab[sd[2]];
        }
        // cv2 5.x converts the float result back to 8 bits by truncation (probed on the full
        // H x S x V grid: truncation matches all but 0.03% of values, which differ by 1).
        let q = |x: f32| (x * 255.0).clamp(0.0, 255.0) as u8;
        d[0] = q(r);
        d[1] = q(g);
        d[2] = q(b);
    }
    out
}

/// ADE train pipeline settings (defaults: the 512 presets).
#[derive(Clone, Debug)]
pub struct SegTrainPipeline {
    pub scale: (usize, usize),
    pub ratio_range: (f64, f64),
    /// `(h, w)`.
    pub crop: (usize, usize),
    pub cat_max_ratio: f64,
    pub flip_ratio: f64,
    pub photometric: bool,
    pub reduce_zero_label: bool,
}

impl Default for SegTrainPipeline {
    fn default() -> Self {
        SegTrainPipeline {
            scale: (2048, 512),
            ratio_range: (0.5, 2.0),
            crop: (512, 512),
            cat_max_ratio: 0.75,
            flip_ratio: 0.5,
            photometric: true,
            reduce_zero_label: true,
        }
    }
}

impl SegTrainPipeline {
    /// The 640 presets: scale (2560, 640), crop 640.
    pub fn crop640() -> Self {
        SegTrainPipeline {
            scale: (2560, 640),
            crop: (640, 640),
            ..Default::default()
        }
    }
}

/// A processed segmentation sample (image unnormalized and unpadded; label padded with 255 in
/// collation).
#[derive(Clone, Debug)]
pub struct SegSample {
    pub img: Image8,
    pub label: Image8,
    pub meta: ImageMeta,
}

/// mmseg RandomCrop bbox: `(y1, x1)` offsets for a crop of `(ch, cw)`.
fn crop_bbox(rng: &mut ChaCha8Rng, h: usize, w: usize, ch: usize, cw: usize) -> (usize, usize) {
    let oy = rng.gen_range(0..=h.saturating_sub(ch));
    let ox = rng.gen_range(0..=w.saturating_sub(cw));
    (oy, ox)
}

/// Whether a label crop passes cat_max_ratio (mmseg: more than one class and the largest below
/// the ratio, 255 ignored).
pub fn crop_ok(label: &Image8, oy: usize, ox: usize, ch: usize, cw: usize, ratio: f64) -> bool {
    let mut cnt = [0usize; 256];
    for y in oy..(oy + ch).min(label.h) {
        for &v in &label.data[y * label.w + ox..y * label.w + (ox + cw).min(label.w)] {
            cnt[v as usize] += 1;
        }
    }
    cnt[IGNORE as usize] = 0;
    let n = cnt.iter().filter(|&&c| c > 0).count();
    let total: usize = cnt.iter().sum();
    let max = *cnt.iter().max().unwrap();
    n > 1 && (max as f64) / (total as f64) < ratio
}

impl SegTrainPipeline {
    pub fn run(&self, ds: &AdeDataset, i: usize, rng: &mut ChaCha8Rng) -> Result<SegSample> {
        let (img, lab) = ds.load_item(i, self.reduce_zero_label)?;
        let ori = (img.h, img.w);
        // Resize: ratio uniform in range, scale = (int(2048 r), int(512 r)), keep ratio.
        let r = rng.gen::<f64>() * (self.ratio_range.1 - self.ratio_range.0) + self.ratio_range.0;
        let scale = (
            (self.scale.0 as f64 * r) as usize,
            (self.scale.1 as f64 * r) as usize,
        );
        let ((nw, nh), _) = image_io::rescale_size(img.w, img.h, scale);
        let (nw, nh) = (nw.max(1), nh.max(1));
        let sf = (nw as f32 / img.w as f32, nh as f32 / img.h as f32);
        let mut img = image_io::resize_bilinear(&img, nw, nh);
        let mut lab = image_io::resize_nearest(&lab, nw, nh);
        // RandomCrop with cat_max_ratio (up to 10 re-draws; the last draw is used as is).
        let (ch, cw) = self.crop;
        let (ech, ecw) = (ch.min(img.h), cw.min(img.w));
        let mut bb = crop_bbox(rng, img.h, img.w, ch, cw);
        if self.cat_max_ratio < 1.0 {
            for _ in 0..10 {
                if crop_ok(&lab, bb.0, bb.1, ech, ecw, self.cat_max_ratio) {
                    break;
                }
                bb = crop_bbox(rng, img.h, img.w, ch, cw);
            }
        }
        img = image_io::crop(&img, bb.1, bb.0, ecw, ech);
        lab = image_io::crop(&lab, bb.1, bb.0, ecw, ech);
        let flip = rng.gen::<f64>() < self.flip_ratio;
        if flip {
            img = image_io::flip_h(&img);
            lab = image_io::flip_h(&lab);
        }
        if self.photometric {
            PhotoParams::sample(rng).apply(&mut img);
        }
        let (h, w) = (img.h, img.w);
        Ok(SegSample {
            img,
            label: lab,
            meta: ImageMeta {
                index: i,
                image_id: i as i64,
                file_name: ds.items[i]
                    .0
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .to_string(),
                ori_shape: ori,
                img_shape: (h, w),
                pad_shape: (ch.max(h), cw.max(w)),
                scale_factor: sf,
                flip,
            },
        })
    }
}

/// A segmentation batch.
#[derive(Clone, Debug)]
pub struct SegBatch {
    /// `(N, 3, H, W)` RGB bytes, zero padded: normalised on the device
    /// ([`crate::pipeline::chw_into`]).
    pub images: Vec<u8>,
    pub shape: [usize; 4],
    /// `(h, w)` of each image before padding.
    pub sizes: Vec<(usize, usize)>,
    /// `(N, H, W)` labels 0..K-1, 255 = ignore (also in the padding).
    pub labels: Vec<u8>,
    pub metas: Vec<ImageMeta>,
    pub epoch: usize,
    pub iter: usize,
}

/// Collate segmentation samples padded to `(ph, pw)` at least (and to the largest sample).
pub fn collate_seg(
    samples: Vec<SegSample>,
    ph: usize,
    pw: usize,
    epoch: usize,
    iter: usize,
) -> SegBatch {
    let ph = samples.iter().map(|s| s.img.h).max().unwrap_or(1).max(ph);
    let pw = samples.iter().map(|s| s.img.w).max().unwrap_or(1).max(pw);
    let n = samples.len();
    let mut images = vec![0u8; n * 3 * ph * pw];
    images
        .par_chunks_mut(3 * ph * pw)
        .zip(samples.par_iter())
        .for_each(|(dst, s)| pipeline::chw_into(&s.img, dst, pw, ph));
    let sizes = samples.iter().map(|s| (s.img.h, s.img.w)).collect();
    let mut labels = vec![IGNORE; n * ph * pw];
    for (k, s) in samples.iter().enumerate() {
        for y in 0..s.label.h {
            let d = k * ph * pw + y * pw;
            labels[d..d + s.label.w]
                .copy_from_slice(&s.label.data[y * s.label.w..(y + 1) * s.label.w]);
        }
    }
    SegBatch {
        images,
        shape: [n, 3, ph, pw],
        sizes,
        labels,
        metas: samples.into_iter().map(|s| s.meta).collect(),
        epoch,
        iter,
    }
}

/// ADE training source for the [`crate::Loader`] (plain shuffling: mmseg does not group).
pub struct AdeTrain {
    pub ds: Arc<AdeDataset>,
    pub pipeline: SegTrainPipeline,
}

impl Source for AdeTrain {
    type Sample = SegSample;
    type Batch = SegBatch;
    fn len(&self) -> usize {
        self.ds.len()
    }
    fn group(&self, _i: usize) -> u8 {
        0
    }
    fn load(&self, i: usize, rng: &mut ChaCha8Rng) -> Result<SegSample> {
        self.pipeline.run(&self.ds, i, rng)
    }
    fn collate(&self, samples: Vec<SegSample>, epoch: usize, iter: usize) -> SegBatch {
        collate_seg(
            samples,
            self.pipeline.crop.0,
            self.pipeline.crop.1,
            epoch,
            iter,
        )
    }
}

/// One test-time item: the resized normalized image and the original-size label.
#[derive(Clone, Debug)]
pub struct SegTestItem {
    /// `(1, 3, h, w)` normalized, no padding.
    pub image: Vec<f32>,
    pub shape: [usize; 4],
    /// Ground truth at the original size (reduce_zero_label applied), `c = 1`.
    pub label: Image8,
    pub meta: ImageMeta,
}

/// Sequential test-time iterator: keep-ratio resize to `scale` (default (2048, 512)).
pub struct AdeTestIter {
    ds: Arc<AdeDataset>,
    pub scale: (usize, usize),
    pub reduce_zero_label: bool,
    /// Only items `i % world == rank` (`(rank, world)`): one rank's share of a sharded
    /// evaluation.
    pub shard: Option<(usize, usize)>,
    pos: usize,
}

impl AdeTestIter {
    pub fn new(ds: Arc<AdeDataset>, scale: (usize, usize)) -> Self {
        AdeTestIter {
            ds,
            scale,
            reduce_zero_label: true,
            shard: None,
            pos: 0,
        }
    }
}

/// Test-time transform of one item.
pub fn test_item(
    ds: &AdeDataset,
    i: usize,
    scale: (usize, usize),
    reduce_zero_label: bool,
) -> Result<SegTestItem> {
    let (img, label) = ds.load_item(i, reduce_zero_label)?;
    let ((nw, nh), _) = image_io::rescale_size(img.w, img.h, scale);
    let r = image_io::resize_bilinear(&img, nw, nh);
    let mut image = vec![0f32; 3 * nh * nw];
    pipeline::normalize_into(&r, &mut image, nw, nh);
    Ok(SegTestItem {
        image,
        shape: [1, 3, nh, nw],
        meta: ImageMeta {
            index: i,
            image_id: i as i64,
            file_name: ds.items[i]
                .0
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string(),
            ori_shape: (img.h, img.w),
            img_shape: (nh, nw),
            pad_shape: (nh, nw),
            scale_factor: (nw as f32 / img.w as f32, nh as f32 / img.h as f32),
            flip: false,
        },
        label,
    })
}

impl Iterator for AdeTestIter {
    type Item = Result<SegTestItem>;
    fn next(&mut self) -> Option<Self::Item> {
        let (rank, world) = self.shard.unwrap_or((0, 1));
        // `pos` counts this shard's items: item `rank + pos * world`.
        let i = rank + self.pos * world.max(1);
        if i >= self.ds.len() {
            return None;
        }
        self.pos += 1;
        Some(test_item(&self.ds, i, self.scale, self.reduce_zero_label))
    }
}
