//! UperNet + ConvNeXt semantic segmentor, as mmsegmentation 0.x's `EncoderDecoder` runs it:
//! configuration and the paper's presets, training losses, and the three inference modes
//! (whole image, sliding window, multi-scale + flip), all returning scores at the original
//! image size.

use crate::upernet::{resize_bilinear, seg_accuracy, seg_cross_entropy, FcnHead, UperHead};
use cnx_backbone::config::BackboneConfig;
use cnx_backbone::convnext::{ConvNeXt, ConvNeXtConfig};
use cnx_backbone::dense::DenseBackbone;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// Errors of configuration and inference.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("unknown ConvNeXt size '{0}' (tiny, small, base, large, xlarge)")]
    UnknownSize(String),
    #[error("invalid segmentor configuration: {0}")]
    Config(String),
}

/// The dense backbone of a segmentor: a ConvNeXt (serialisable mirror of [`ConvNeXtConfig`]),
/// or, when `name` is set, a comparison backbone (`swin_tiny`, `resnet50`, ... see
/// [`cnx_backbone::config::BACKBONES`]) returning all four stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    pub depths: Vec<i64>,
    pub dims: Vec<i64>,
    pub drop_path_rate: f64,
    pub layer_scale_init_value: f64,
    pub out_indices: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ImageNet checkpoint that initialises the backbone (mmseg's `init_cfg`), loaded by the
    /// trainer before the first step; empty = random initialisation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pretrained: String,
}

impl BackboneSpec {
    /// The named (non-ConvNeXt) backbone, if this spec is one.
    pub fn named(&self) -> Result<Option<BackboneConfig>, SegError> {
        match &self.name {
            Some(n) => BackboneConfig::named(n, self.drop_path_rate)
                .map_err(|e| SegError::Config(e.to_string())),
            None => Ok(None),
        }
    }

    /// A comparison backbone with all four outputs and stochastic depth `drop_path`.
    pub fn from_name(name: &str, drop_path: f64) -> Result<Self, SegError> {
        let cfg = BackboneConfig::by_name(name).map_err(|e| SegError::Config(e.to_string()))?;
        Ok(Self {
            depths: vec![],
            dims: cfg.out_channels(),
            drop_path_rate: drop_path,
            layer_scale_init_value: 0.0,
            out_indices: vec![0, 1, 2, 3],
            name: Some(name.to_string()),
            pretrained: String::new(),
        })
    }

    pub fn to_convnext(&self) -> ConvNeXtConfig {
        ConvNeXtConfig::dense_backbone(
            &self.depths,
            &self.dims,
            self.drop_path_rate,
            self.layer_scale_init_value,
            &self.out_indices,
        )
    }

    /// Output channels of the dense backbone, finest first.
    pub fn out_channels(&self) -> Vec<i64> {
        self.out_indices.iter().map(|&i| self.dims[i]).collect()
    }
}

/// `UPerHead` settings (`decode_head`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeHeadSpec {
    pub channels: i64,
    pub pool_scales: Vec<i64>,
    pub dropout_ratio: f64,
    pub loss_weight: f64,
}

/// `FCNHead` settings (`auxiliary_head`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuxHeadSpec {
    pub in_index: usize,
    pub channels: i64,
    pub num_convs: usize,
    pub concat_input: bool,
    pub dropout_ratio: f64,
    pub loss_weight: f64,
}

/// `test_cfg.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TestMode {
    Whole,
    Slide,
}

impl std::str::FromStr for TestMode {
    type Err = SegError;
    fn from_str(s: &str) -> Result<Self, SegError> {
        match s {
            "whole" => Ok(Self::Whole),
            "slide" => Ok(Self::Slide),
            _ => Err(SegError::Config(format!(
                "test mode must be 'whole' or 'slide', got '{s}'"
            ))),
        }
    }
}

/// Test-time settings: the test pipeline's scale and `test_cfg`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    /// Single-scale mode (the paper's single-scale numbers use `slide`).
    pub mode: TestMode,
    /// Sliding-window crop (h, w) and stride (h, w).
    pub crop_size: [i64; 2],
    pub stride: [i64; 2],
    /// Keep-ratio test scale (long edge, short edge), e.g. (2048, 512).
    pub img_scale: [i64; 2],
    /// Multi-scale ratios of `img_scale` for `--aug-test`.
    pub aug_ratios: Vec<f64>,
    /// Horizontal flip in `--aug-test`.
    pub aug_flip: bool,
    /// Single-scale mode used under `--aug-test` (the paper's ms+flip numbers use `whole`).
    pub aug_mode: TestMode,
}

/// Everything that defines a segmentor and how it is trained / tested per image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentorConfig {
    pub name: String,
    pub num_classes: i64,
    pub ignore_index: i64,
    pub align_corners: bool,
    pub backbone: BackboneSpec,
    pub decode_head: DecodeHeadSpec,
    pub auxiliary_head: Option<AuxHeadSpec>,
    /// RGB normalisation on the 0..255 scale.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub test: TestSpec,
}

impl SegmentorConfig {
    /// UperNet on ConvNeXt-{tiny, small, base, large, xlarge} with the 512 crop ADE20K recipe.
    pub fn upernet_convnext(size: &str) -> Result<Self, SegError> {
        let short = size.strip_prefix("convnext_").unwrap_or(size);
        let c =
            ConvNeXtConfig::by_name(short).map_err(|_| SegError::UnknownSize(size.to_string()))?;
        let drop_path_rate = match short {
            "small" => 0.3,
            _ => 0.4,
        };
        Ok(Self {
            name: format!("upernet_convnext_{short}_512_160k"),
            num_classes: 150,
            ignore_index: 255,
            align_corners: false,
            backbone: BackboneSpec {
                depths: c.depths,
                dims: c.dims,
                drop_path_rate,
                layer_scale_init_value: 1.0,
                out_indices: vec![0, 1, 2, 3],
                name: None,
                pretrained: String::new(),
            },
            decode_head: DecodeHeadSpec {
                channels: 512,
                pool_scales: vec![1, 2, 3, 6],
                dropout_ratio: 0.1,
                loss_weight: 1.0,
            },
            auxiliary_head: Some(AuxHeadSpec {
                in_index: 2,
                channels: 256,
                num_convs: 1,
                concat_input: false,
                dropout_ratio: 0.1,
                loss_weight: 0.4,
            }),
            mean: [123.675, 116.28, 103.53],
            std: [58.395, 57.12, 57.375],
            test: TestSpec {
                mode: TestMode::Slide,
                crop_size: [512, 512],
                stride: [341, 341],
                img_scale: [2048, 512],
                aug_ratios: vec![0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                aug_flip: true,
                aug_mode: TestMode::Whole,
            },
        })
    }

    /// The 640-crop variant (ImageNet-22K pre-trained backbones): 2560x640, crop 640, stride 426.
    pub fn crop_640(mut self) -> Self {
        self.test.crop_size = [640, 640];
        self.test.stride = [426, 426];
        self.test.img_scale = [2560, 640];
        self
    }

    pub fn validate(&self) -> Result<(), SegError> {
        let b = &self.backbone;
        if let Some(named) = b.named()? {
            if b.out_indices != [0, 1, 2, 3] || b.dims != named.out_channels() {
                return Err(SegError::Config(format!(
                    "backbone {}: out_indices must be [0, 1, 2, 3] and dims {:?}",
                    b.name.as_deref().unwrap_or(""),
                    named.out_channels()
                )));
            }
        } else if b.depths.len() != 4 || b.dims.len() != 4 {
            return Err(SegError::Config(
                "ConvNeXt needs four depths and four dims".into(),
            ));
        }
        if b.out_indices.is_empty() || b.out_indices.iter().any(|&i| i > 3) {
            return Err(SegError::Config(
                "out_indices must be a non-empty subset of 0..=3".into(),
            ));
        }
        if let Some(a) = &self.auxiliary_head {
            if a.in_index >= b.out_indices.len() {
                return Err(SegError::Config(format!(
                    "auxiliary in_index {} out of range",
                    a.in_index
                )));
            }
            if a.num_convs == 0 && !a.concat_input && a.channels != b.out_channels()[a.in_index] {
                return Err(SegError::Config(
                    "FCNHead with no convs needs channels == in_channels".into(),
                ));
            }
        }
        let t = &self.test;
        if t.crop_size.iter().chain(&t.stride).any(|&v| v <= 0) {
            return Err(SegError::Config(
                "test crop and stride must be positive".into(),
            ));
        }
        if self.num_classes < 1 {
            return Err(SegError::Config("num_classes must be positive".into()));
        }
        Ok(())
    }
}

/// Named training losses, as mmseg reports them (`decode.loss_seg`, `aux.loss_seg`,
/// `decode.acc_seg`, ...). Loss entries are already multiplied by their loss weights.
#[derive(Debug)]
pub struct SegLosses {
    pub items: BTreeMap<String, Tensor>,
}

impl SegLosses {
    /// Sum of every entry whose name contains `loss` (mmseg's `_parse_losses`).
    pub fn total(&self) -> Tensor {
        let mut it = self
            .items
            .iter()
            .filter(|(k, _)| k.contains("loss"))
            .map(|(_, v)| v.shallow_clone());
        let first = it.next().expect("no loss terms");
        it.fold(first, |a, b| a + b)
    }
}

/// UperNet on a dense ConvNeXt, with the FCN auxiliary head (`backbone.`, `decode_head.`,
/// `auxiliary_head.` variable names).
#[derive(Debug)]
pub struct Segmentor {
    pub cfg: SegmentorConfig,
    pub backbone: Box<dyn DenseBackbone>,
    pub decode_head: UperHead,
    pub auxiliary_head: Option<FcnHead>,
}

impl Segmentor {
    /// Builds the network under `root` (normally `vs.root()`), with the official backbone
    /// initialisation and mmseg's head initialisation.
    pub fn new(root: &nn::Path, cfg: &SegmentorConfig) -> Result<Self, SegError> {
        Self::build(root, cfg, true)
    }

    /// Like [`Segmentor::new`] without the backbone's initialisation pass (weights loaded next,
    /// or FLOP counting).
    pub fn new_uninit(root: &nn::Path, cfg: &SegmentorConfig) -> Result<Self, SegError> {
        Self::build(root, cfg, false)
    }

    fn build(root: &nn::Path, cfg: &SegmentorConfig, init: bool) -> Result<Self, SegError> {
        cfg.validate()?;
        let bp = root / "backbone";
        let backbone: Box<dyn DenseBackbone> = match cfg.backbone.named()? {
            Some(named) => cnx_backbone::config::build(&bp, &named),
            None if init => Box::new(ConvNeXt::new(&bp, &cfg.backbone.to_convnext())),
            None => Box::new(ConvNeXt::new_uninit(&bp, &cfg.backbone.to_convnext())),
        };
        let in_ch = cfg.backbone.out_channels();
        let d = &cfg.decode_head;
        let decode_head = UperHead::new(
            &(root / "decode_head"),
            &in_ch,
            d.channels,
            &d.pool_scales,
            cfg.num_classes,
            d.dropout_ratio,
            cfg.align_corners,
        );
        let auxiliary_head = cfg.auxiliary_head.as_ref().map(|a| {
            FcnHead::new(
                &(root / "auxiliary_head"),
                in_ch[a.in_index],
                a.in_index,
                a.channels,
                a.num_convs,
                a.concat_input,
                cfg.num_classes,
                a.dropout_ratio,
            )
        });
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            decode_head,
            auxiliary_head,
        })
    }

    /// An H,W,3 RGB image (uint8 or float, 0..255) as a normalised 1,3,H,W float batch on
    /// `device`: (x - mean) / std per channel, in f32 as mmcv's `imnormalize`.
    pub fn normalize(&self, rgb_hwc: &Tensor, device: tch::Device) -> Tensor {
        let mean = Tensor::from_slice(&self.cfg.mean.map(|v| v as f32)).to_device(device);
        let std = Tensor::from_slice(&self.cfg.std.map(|v| v as f32)).to_device(device);
        let x = rgb_hwc.to_device(device).to_kind(Kind::Float);
        ((x - mean) / std)
            .permute([2, 0, 1])
            .unsqueeze(0)
            .contiguous()
    }

    /// Backbone features, finest first.
    pub fn extract_feat(&self, images: &Tensor, train: bool) -> Vec<Tensor> {
        self.backbone.forward_features(images, train)
    }

    /// Training losses for a normalised N,3,H,W batch and N,H,W (or N,1,H,W) int labels with
    /// 255 = ignore. Runs in train mode (batch-stat BN, dropout, drop path).
    pub fn forward_train(&self, images: &Tensor, labels: &Tensor) -> SegLosses {
        let labels = if labels.dim() == 4 {
            labels.squeeze_dim(1)
        } else {
            labels.shallow_clone()
        };
        let labels = labels.to_kind(Kind::Int64);
        let feats = self.extract_feat(images, true);
        let (ig, ac) = (self.cfg.ignore_index, self.cfg.align_corners);
        let mut items = BTreeMap::new();
        let logits = self.decode_head.forward_t(&feats, true);
        let w = self.cfg.decode_head.loss_weight;
        items.insert(
            "decode.loss_seg".to_string(),
            seg_cross_entropy(&logits, &labels, ig, ac) * w,
        );
        items.insert(
            "decode.acc_seg".to_string(),
            seg_accuracy(&logits, &labels, ig, ac),
        );
        if let (Some(aux), Some(spec)) = (&self.auxiliary_head, &self.cfg.auxiliary_head) {
            let logits = aux.forward_t(&feats, true);
            items.insert(
                "aux.loss_seg".to_string(),
                seg_cross_entropy(&logits, &labels, ig, ac) * spec.loss_weight,
            );
            items.insert(
                "aux.acc_seg".to_string(),
                seg_accuracy(&logits, &labels, ig, ac),
            );
        }
        SegLosses { items }
    }

    /// Eval-mode logits of a normalised batch, resized to the batch's own size
    /// (`encode_decode`).
    pub fn encode_decode(&self, images: &Tensor) -> Tensor {
        let feats = self.extract_feat(images, false);
        let out = self.decode_head.forward_t(&feats, false);
        let s = images.size();
        resize_bilinear(&out, [s[2], s[3]], self.cfg.align_corners)
    }

    /// Sliding-window logits over the whole batch, at its own size (mmseg `slide_inference`
    /// before the final rescale): windows of `crop` every `stride`, the last window per axis
    /// clamped to the image, overlapping logits averaged with a count matrix. An image smaller
    /// than the crop runs as one smaller window, unpadded.
    pub fn slide_logits(&self, images: &Tensor) -> Tensor {
        let [hs, ws] = self.cfg.test.stride;
        let [hc, wc] = self.cfg.test.crop_size;
        let s = images.size();
        let (n, h, w) = (s[0], s[2], s[3]);
        let h_grids = (h - hc + hs - 1).max(0) / hs + 1;
        let w_grids = (w - wc + ws - 1).max(0) / ws + 1;
        let opts = (images.kind(), images.device());
        let preds = Tensor::zeros([n, self.cfg.num_classes, h, w], opts);
        let count = Tensor::zeros([n, 1, h, w], opts);
        for hi in 0..h_grids {
            for wi in 0..w_grids {
                let y2 = (hi * hs + hc).min(h);
                let x2 = (wi * ws + wc).min(w);
                let y1 = (y2 - hc).max(0);
                let x1 = (x2 - wc).max(0);
                let crop = images.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1);
                let logit = self.encode_decode(&crop);
                let mut dst = preds.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1);
                let _ = dst.g_add_(&logit);
                let mut c = count.narrow(2, y1, y2 - y1).narrow(3, x1, x2 - x1);
                let _ = c.g_add_scalar_(1.0);
            }
        }
        preds / count
    }

    /// Logits of a normalised N,3,h,w batch (already at the test scale) in the given mode,
    /// resized bilinearly to `ori_hw` (mmseg `whole_inference` / `slide_inference` with
    /// rescale; there is no test-time padding to strip). No softmax.
    pub fn inference_logits(&self, images: &Tensor, mode: TestMode, ori_hw: [i64; 2]) -> Tensor {
        tch::no_grad(|| {
            let logits = match mode {
                TestMode::Whole => self.encode_decode(images),
                TestMode::Slide => self.slide_logits(images),
            };
            resize_bilinear(&logits, ori_hw, self.cfg.align_corners)
        })
    }

    /// Multi-scale (+ flip) test (mmseg `aug_test`): `scaled` holds the normalised 1,3,h,w image
    /// at each scale, in order; each runs unflipped then (with `aug_flip`) flipped in `aug_mode`,
    /// its logits go to `ori_hw`, softmax, un-flip; the mean over all augmentations is returned
    /// (N, classes, H, W probabilities).
    pub fn aug_test_scores(&self, scaled: &[Tensor], ori_hw: [i64; 2]) -> Tensor {
        tch::no_grad(|| {
            let mode = self.cfg.test.aug_mode;
            let mut acc: Option<Tensor> = None;
            let mut n = 0i64;
            for img in scaled {
                let flips: &[bool] = if self.cfg.test.aug_flip {
                    &[false, true]
                } else {
                    &[false]
                };
                for &flip in flips {
                    let x = if flip {
                        img.flip([3])
                    } else {
                        img.shallow_clone()
                    };
                    let mut p = self
                        .inference_logits(&x, mode, ori_hw)
                        .softmax(1, Kind::Float);
                    if flip {
                        p = p.flip([3]);
                    }
                    acc = Some(match acc {
                        None => p,
                        Some(a) => a + p,
                    });
                    n += 1;
                }
            }
            acc.expect("aug_test needs at least one scale") / n as f64
        })
    }

    /// The keep-ratio scales (long, short) of `--aug-test`: `int(scale * ratio)` per ratio.
    pub fn aug_scales(&self) -> Vec<[i64; 2]> {
        let [l, s] = self.cfg.test.img_scale;
        self.cfg
            .test
            .aug_ratios
            .iter()
            .map(|&r| [(l as f64 * r) as i64, (s as f64 * r) as i64])
            .collect()
    }
}

impl Segmentor {
    /// The whole test pipeline on one image of original size `ori` (h, w), as mmseg's test
    /// pipeline and `simple_test` / `aug_test` run it: `resize(scale)` gives the image
    /// keep-ratio resized to a (long, short) `scale` as an H,W,3 uint8 tensor (the data side's
    /// cv2-exact bilinear), called for `test.img_scale` (or, with `aug`, for every `aug_ratios`
    /// scale, each also flipped when `aug_flip`); then normalise, infer, rescale to `ori`.
    /// Returns 1,C,H,W scores at the original size: logits in `mode` for single-scale, mean
    /// softmax probabilities for `aug` (both give the prediction by argmax over C).
    pub fn predict_resized(
        &self,
        ori: [i64; 2],
        resize: &dyn Fn([i64; 2]) -> Tensor,
        mode: TestMode,
        aug: bool,
        device: tch::Device,
    ) -> Tensor {
        let scaled = |scale: [i64; 2]| self.normalize(&resize(scale), device);
        if aug {
            let xs: Vec<Tensor> = self.aug_scales().into_iter().map(scaled).collect();
            self.aug_test_scores(&xs, ori)
        } else {
            self.inference_logits(&scaled(self.cfg.test.img_scale), mode, ori)
        }
    }
}

/// Per-pixel class indices (H,W uint8, row-major) from 1,C,H,W scores.
pub fn argmax_u8(scores: &Tensor) -> Vec<u8> {
    let a = scores
        .get(0)
        .argmax(0, false)
        .to_kind(Kind::Uint8)
        .to_device(tch::Device::Cpu)
        .contiguous();
    Vec::<u8>::try_from(a.view([-1])).expect("argmax to u8")
}

/// mmcv `rescale_size`: the (h, w) an image of size (h, w) gets when resized keep-ratio to
/// `scale` = (long, short): factor = min(long / max(h, w), short / min(h, w)),
/// new size = int(x * factor + 0.5).
pub fn rescale_size(hw: [i64; 2], scale: [i64; 2]) -> [i64; 2] {
    let (h, w) = (hw[0] as f64, hw[1] as f64);
    let (long, short) = (scale[0].max(scale[1]) as f64, scale[0].min(scale[1]) as f64);
    let f = (long / h.max(w)).min(short / h.min(w));
    [(h * f + 0.5) as i64, (w * f + 0.5) as i64]
}

/// Parameter count (auxiliary head included) and multiply-adds of the test-time network
/// (backbone + decode head, no auxiliary head) on one `hw` input, as mmseg's `get_flops`
/// reports them: counted by running the real model once, on CPU, without gradients.
pub fn complexity(
    cfg: &SegmentorConfig,
    hw: [i64; 2],
) -> Result<(i64, cnx_backbone::flops::FlopTally), SegError> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let seg = Segmentor::new_uninit(&vs.root(), cfg)?;
    let params = cnx_backbone::nn::param_count(&vs);
    let x = Tensor::zeros([1, 3, hw[0], hw[1]], (Kind::Float, tch::Device::Cpu));
    let (_, tally) = tch::no_grad(|| cnx_backbone::flops::count(|| seg.encode_decode(&x)));
    Ok((params, tally))
}
