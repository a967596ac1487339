//! The paper's COCO pipelines (mmdet 2.x semantics; see shared/spec/recipes.md):
//! train = load → RandomFlip(0.5) → AutoAugment{multi-scale resize | resize → absolute_range
//! crop → resize} → Normalize → Pad(32); test = load → Resize(1333, 800) keep-ratio → Normalize
//! → Pad(32). Boxes, ignored boxes and masks follow every geometric step.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::coco::CocoDataset;
use crate::error::{DatasetError, Result};
use crate::image_io::{self, Image8};
use crate::mask::{MaskMode, Masks};

/// RGB mean of the paper's normalization (0..255 scale).
pub const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// RGB std of the paper's normalization.
pub const STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Per-image meta data (mmdet `img_metas`). Shapes are `(h, w)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageMeta {
    /// Index of the image in its dataset.
    pub index: usize,
    pub image_id: i64,
    pub file_name: String,
    /// Size of the decoded image.
    pub ori_shape: (usize, usize),
    /// Size after the pipeline's resize/crop, before padding.
    pub img_shape: (usize, usize),
    /// Size after padding to the size divisor (this image alone).
    pub pad_shape: (usize, usize),
    /// `(w_scale, h_scale)` of the last resize (mmdet semantics: with the crop policy it is the
    /// factor of the final resize only).
    pub scale_factor: (f32, f32),
    pub flip: bool,
}

/// One processed detection sample: the (unnormalized, unpadded) image and its targets.
#[derive(Clone, Debug)]
pub struct DetSample {
    pub img: Image8,
    /// `x1, y1, x2, y2` in `img` pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Contiguous labels 0..K-1.
    pub labels: Vec<i64>,
    /// Crowd boxes.
    pub ignore: Vec<[f32; 4]>,
    /// Instance masks, canvas = `meta.pad_shape`.
    pub masks: Masks,
    pub meta: ImageMeta,
}

/// Configuration of the COCO train pipeline (defaults = the paper's).
#[derive(Clone, Debug)]
pub struct TrainPipeline {
    pub flip_ratio: f64,
    /// Policy a (and the final resize of policy b): scales `(short, long)`, one picked uniformly.
    pub scales: Vec<(usize, usize)>,
    /// Policy b's first resize.
    pub crop_pre_scales: Vec<(usize, usize)>,
    /// Absolute crop range `[lo, hi]` for h and w.
    pub crop_range: (usize, usize),
    pub size_divisor: usize,
    pub with_masks: bool,
    pub mask_mode: MaskMode,
    /// Check the decoded size against the JSON size.
    pub check_size: bool,
}

impl Default for TrainPipeline {
    fn default() -> Self {
        TrainPipeline {
            flip_ratio: 0.5,
            scales: (480..=800).step_by(32).map(|s| (s, 1333)).collect(),
            crop_pre_scales: vec![(400, 1333), (500, 1333), (600, 1333)],
            crop_range: (384, 600),
            size_divisor: 32,
            with_masks: true,
            mask_mode: MaskMode::Bitmap,
            check_size: true,
        }
    }
}

impl TrainPipeline {
    /// Same policies scaled down by `f` (for small synthetic images / CPU demos).
    pub fn scaled(f: f64) -> Self {
        let s = |v: usize| ((v as f64 * f).round() as usize).max(1);
        let d = TrainPipeline::default();
        TrainPipeline {
            scales: d.scales.iter().map(|&(a, b)| (s(a), s(b))).collect(),
            crop_pre_scales: d
                .crop_pre_scales
                .iter()
                .map(|&(a, b)| (s(a), s(b)))
                .collect(),
            crop_range: (s(d.crop_range.0), s(d.crop_range.1)),
            ..d
        }
    }
}

/// Configuration of the test pipeline.
#[derive(Clone, Debug)]
pub struct TestPipeline {
    pub scale: (usize, usize),
    pub size_divisor: usize,
}

impl Default for TestPipeline {
    fn default() -> Self {
        TestPipeline {
            scale: (800, 1333),
            size_divisor: 32,
        }
    }
}

/// Working state of one sample while transforms run.
pub struct State {
    pub img: Image8,
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<i64>,
    pub ignore: Vec<[f32; 4]>,
    pub masks: Option<Masks>,
    pub flip: bool,
    pub scale_factor: (f32, f32),
}

impl State {
    /// RandomFlip horizontal: `x1' = W - x2`, `x2' = W - x1`.
    pub fn flip(&mut self) {
        let w = self.img.w as f32;
        self.img = image_io::flip_h(&self.img);
        for b in self.boxes.iter_mut().chain(self.ignore.iter_mut()) {
            *b = [w - b[2], b[1], w - b[0], b[3]];
        }
        if let Some(m) = &self.masks {
            self.masks = Some(m.flip());
        }
        self.flip = !self.flip;
    }

    /// mmdet Resize keep-ratio to `scale`; boxes scaled by the realized `(new/old)` factors and
    /// clipped to the new image (bbox_clip_border).
    pub fn resize_keep_ratio(&mut self, scale: (usize, usize)) {
        let ((nw, nh), _) = image_io::rescale_size(self.img.w, self.img.h, scale);
        self.resize_to(nw.max(1), nh.max(1));
    }

    /// Resize to an exact size (bilinear image, nearest masks).
    pub fn resize_to(&mut self, nw: usize, nh: usize) {
        let ws = nw as f32 / self.img.w as f32;
        let hs = nh as f32 / self.img.h as f32;
        self.img = image_io::resize_bilinear(&self.img, nw, nh);
        let (fw, fh) = (nw as f32, nh as f32);
        for b in self.boxes.iter_mut().chain(self.ignore.iter_mut()) {
            *b = [
                (b[0] * ws).clamp(0.0, fw),
                (b[1] * hs).clamp(0.0, fh),
                (b[2] * ws).clamp(0.0, fw),
                (b[3] * hs).clamp(0.0, fh),
            ];
        }
        if let Some(m) = &self.masks {
            self.masks = Some(m.resize(nw, nh));
        }
        self.scale_factor = (ws, hs);
    }

    /// mmdet RandomCrop `absolute_range` with allow_negative_crop=True.
    pub fn random_crop_abs(&mut self, rng: &mut ChaCha8Rng, lo: usize, hi: usize) {
        let (h, w) = (self.img.h, self.img.w);
        let ch = rng.gen_range(lo.min(h)..=hi.min(h));
        let cw = rng.gen_range(lo.min(w)..=hi.min(w));
        let oy = rng.gen_range(0..=h.saturating_sub(ch));
        let ox = rng.gen_range(0..=w.saturating_sub(cw));
        self.crop(ox, oy, cw, ch);
    }

    /// Crop at `(ox, oy)` of size `cw x ch`; boxes shifted, clipped, empty ones dropped (with
    /// their labels and masks), as mmdet RandomCrop `_crop_data`.
    pub fn crop(&mut self, ox: usize, oy: usize, cw: usize, ch: usize) {
        self.img = image_io::crop(&self.img, ox, oy, cw, ch);
        let shift = |b: &[f32; 4]| {
            [
                (b[0] - ox as f32).clamp(0.0, cw as f32),
                (b[1] - oy as f32).clamp(0.0, ch as f32),
                (b[2] - ox as f32).clamp(0.0, cw as f32),
                (b[3] - oy as f32).clamp(0.0, ch as f32),
            ]
        };
        let valid = |b: &[f32; 4]| b[2] > b[0] && b[3] > b[1];
        let mut keep = Vec::new();
        let mut boxes = Vec::new();
        for (i, b) in self.boxes.iter().enumerate() {
            let nb = shift(b);
            if valid(&nb) {
                keep.push(i);
                boxes.push(nb);
            }
        }
        self.labels = keep.iter().map(|&i| self.labels[i]).collect();
        self.boxes = boxes;
        self.ignore = self.ignore.iter().map(shift).filter(valid).collect();
        if let Some(m) = &self.masks {
            self.masks = Some(m.select(&keep).crop(ox, oy, cw, ch));
        }
    }
}

/// Round `v` up to a multiple of `d`.
pub fn pad_up(v: usize, d: usize) -> usize {
    v.div_ceil(d) * d
}

/// Load image `i` of `ds` with its targets (original coordinates).
pub fn load_state(
    ds: &CocoDataset,
    i: usize,
    with_masks: bool,
    mode: MaskMode,
    check_size: bool,
) -> Result<State> {
    let path = ds.image_path(i);
    let img = image_io::read_rgb(&path)?;
    let info = &ds.images[i];
    if check_size && (img.w != info.width as usize || img.h != info.height as usize) {
        return Err(DatasetError::SizeMismatch {
            path,
            json_w: info.width,
            json_h: info.height,
            w: img.w as u32,
            h: img.h as u32,
        });
    }
    let t = &ds.targets[i];
    Ok(State {
        img,
        boxes: t.boxes.clone(),
        labels: t.labels.clone(),
        ignore: t.ignore.clone(),
        masks: with_masks.then(|| ds.masks(i, mode)),
        flip: false,
        scale_factor: (1.0, 1.0),
    })
}

fn finish(ds: &CocoDataset, i: usize, st: State, ori: (usize, usize), div: usize) -> DetSample {
    let (h, w) = (st.img.h, st.img.w);
    let pad = (pad_up(h, div), pad_up(w, div));
    let masks = st.masks.map(|m| m.pad(pad.1, pad.0)).unwrap_or(Masks {
        width: pad.1,
        height: pad.0,
        masks: Vec::new(),
    });
    DetSample {
        img: st.img,
        boxes: st.boxes,
        labels: st.labels,
        ignore: st.ignore,
        masks,
        meta: ImageMeta {
            index: i,
            image_id: ds.images[i].id,
            file_name: ds.images[i].file_name.clone(),
            ori_shape: ori,
            img_shape: (h, w),
            pad_shape: pad,
            scale_factor: st.scale_factor,
            flip: st.flip,
        },
    }
}

/// Image `i` as loaded (no resize, no padding), with its targets; for inspection.
pub fn plain(ds: &CocoDataset, i: usize, with_masks: bool) -> Result<DetSample> {
    let st = load_state(ds, i, with_masks, MaskMode::Bitmap, false)?;
    let ori = (st.img.h, st.img.w);
    Ok(finish(ds, i, st, ori, 1))
}

impl TrainPipeline {
    /// Apply the random transforms to a loaded state (flip, then one of the two policies).
    pub fn augment(&self, st: &mut State, rng: &mut ChaCha8Rng) {
        if rng.gen::<f64>() < self.flip_ratio {
            st.flip();
        }
        if rng.gen_range(0..2) == 0 {
            let s = self.scales[rng.gen_range(0..self.scales.len())];
            st.resize_keep_ratio(s);
        } else {
            let s = self.crop_pre_scales[rng.gen_range(0..self.crop_pre_scales.len())];
            st.resize_keep_ratio(s);
            st.random_crop_abs(rng, self.crop_range.0, self.crop_range.1);
            let s = self.scales[rng.gen_range(0..self.scales.len())];
            st.resize_keep_ratio(s);
        }
    }

    /// Full train pipeline for image `i` (without normalization, which happens at collation).
    pub fn run(&self, ds: &CocoDataset, i: usize, rng: &mut ChaCha8Rng) -> Result<DetSample> {
        let mut st = load_state(ds, i, self.with_masks, self.mask_mode, self.check_size)?;
        let ori = (st.img.h, st.img.w);
        self.augment(&mut st, rng);
        Ok(finish(ds, i, st, ori, self.size_divisor))
    }
}

impl TestPipeline {
    /// Test pipeline for image `i` (targets are carried along, resized, for convenience).
    pub fn run(&self, ds: &CocoDataset, i: usize, with_masks: bool) -> Result<DetSample> {
        let mut st = load_state(ds, i, with_masks, MaskMode::Bitmap, false)?;
        let ori = (st.img.h, st.img.w);
        st.resize_keep_ratio(self.scale);
        Ok(finish(ds, i, st, ori, self.size_divisor))
    }

    /// Test pipeline on an image alone (e.g. `cnx predict` on a file).
    pub fn run_image(&self, img: Image8) -> (Image8, (f32, f32)) {
        let mut st = State {
            img,
            boxes: vec![],
            labels: vec![],
            ignore: vec![],
            masks: None,
            flip: false,
            scale_factor: (1.0, 1.0),
        };
        st.resize_keep_ratio(self.scale);
        (st.img, st.scale_factor)
    }
}

/// An 8-bit RGB image as CHW planes of `pw x ph`, zero padded bottom/right: how batches travel
/// to the device (a quarter of the bytes of floats), where the application normalises them with
/// [`normalize_into`]'s arithmetic and zeroes the padding.
pub fn chw_into(img: &Image8, dst: &mut [u8], pw: usize, ph: usize) {
    assert!(img.c == 3 && dst.len() == 3 * pw * ph && img.w <= pw && img.h <= ph);
    let plane = pw * ph;
    for (c, chan) in dst.chunks_exact_mut(plane).enumerate() {
        for y in 0..ph {
            let row = &mut chan[y * pw..(y + 1) * pw];
            if y < img.h {
                let src = &img.data[y * img.w * 3..(y + 1) * img.w * 3];
                for x in 0..img.w {
                    row[x] = src[x * 3 + c];
                }
                row[img.w..].fill(0);
            } else {
                row.fill(0);
            }
        }
    }
}

/// Normalize (RGB, mean/std) an 8-bit RGB image into a CHW float buffer of `pw x ph` (zero
/// padding bottom/right), as mmcv imnormalize then Pad.
pub fn normalize_into(img: &Image8, dst: &mut [f32], pw: usize, ph: usize) {
    assert!(img.c == 3 && dst.len() == 3 * pw * ph && img.w <= pw && img.h <= ph);
    let inv: [f32; 3] = STD.map(|s| (1.0 / s as f64) as f32);
    let plane = pw * ph;
    for (c, chan) in dst.chunks_exact_mut(plane).enumerate() {
        let (m, s) = (MEAN[c], inv[c]);
        for y in 0..ph {
            let row = &mut chan[y * pw..(y + 1) * pw];
            if y < img.h {
                let src = &img.data[y * img.w * 3..(y + 1) * img.w * 3];
                for x in 0..img.w {
                    row[x] = (src[x * 3 + c] as f32 - m) * s;
                }
                row[img.w..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
    }
}
