//! UperNet decode head and FCN auxiliary head, layer for layer as mmsegmentation 0.x builds them
//! (`UPerHead`, `FCNHead`, `ConvModule` = conv without bias → BatchNorm → ReLU), with the
//! checkpoint names of `decode_head.*` / `auxiliary_head.*`, plus the segmentation losses
//! (cross-entropy with ignore index, mmseg's pixel accuracy).

pub use crate::conv_module::ConvModule;
use cnx_backbone::nn::{Conv2d, ConvOpts};
use cnx_backbone::replica;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Bilinear resize to an exact size (mmseg `resize(..., mode='bilinear')`).
pub fn resize_bilinear(xs: &Tensor, hw: [i64; 2], align_corners: bool) -> Tensor {
    let s = xs.size();
    if s[2] == hw[0] && s[3] == hw[1] {
        // F.interpolate to the same size is the identity for bilinear (both corner modes).
        return xs.shallow_clone();
    }
    xs.upsample_bilinear2d(hw, align_corners, None, None)
}

fn hw(xs: &Tensor) -> [i64; 2] {
    let s = xs.size();
    [s[2], s[3]]
}

/// The 1x1 classifier of every mmseg decode head (`conv_seg`, with bias), preceded by
/// Dropout2d while training.
#[derive(Debug)]
pub struct ClsSeg {
    pub conv_seg: Conv2d,
    pub dropout: f64,
}

impl ClsSeg {
    fn new(p: &nn::Path, channels: i64, num_classes: i64, dropout: f64) -> Self {
        let conv_seg = Conv2d::new(
            p / "conv_seg",
            channels,
            num_classes,
            1,
            ConvOpts::default(),
        );
        // BaseDecodeHead init_cfg: Normal(std=0.01) on conv_seg, bias 0.
        tch::no_grad(|| {
            let _ = conv_seg.weight().shallow_clone().normal_(0.0, 0.01);
            if let Some(b) = conv_seg.bias() {
                let _ = b.shallow_clone().zero_();
            }
        });
        Self { conv_seg, dropout }
    }

    fn forward_t(&self, feat: &Tensor, train: bool) -> Tensor {
        let feat = if train && self.dropout > 0.0 {
            // Dropout2d: whole channels of each image, kept with 1-p and scaled by 1/(1-p);
            // under batch keys each image's N×C mask comes from its own keyed stream.
            let s = feat.size();
            let keep = 1.0 - self.dropout;
            match replica::keyed_keep_mask(&[s[0], s[1], 1, 1], keep, (feat.kind(), feat.device()))
            {
                Some(mask) => feat * (mask / keep),
                None => feat.feature_dropout(self.dropout, true),
            }
        } else {
            feat.shallow_clone()
        };
        self.conv_seg.forward(&feat)
    }
}

/// mmseg `UPerHead`: PPM on the coarsest level, FPN fusion of all levels, `fpn_bottleneck`,
/// dropout, `conv_seg`. Output logits at the finest input level's resolution (stride 4).
#[derive(Debug)]
pub struct UperHead {
    pub pool_scales: Vec<i64>,
    pub psp_modules: Vec<ConvModule>,
    pub bottleneck: ConvModule,
    pub lateral_convs: Vec<ConvModule>,
    pub fpn_convs: Vec<ConvModule>,
    pub fpn_bottleneck: ConvModule,
    pub cls: ClsSeg,
    pub align_corners: bool,
}

impl UperHead {
    /// `p` is the `decode_head` path; `in_channels` are the backbone's channels, finest first.
    pub fn new(
        p: &nn::Path,
        in_channels: &[i64],
        channels: i64,
        pool_scales: &[i64],
        num_classes: i64,
        dropout: f64,
        align_corners: bool,
    ) -> Self {
        let last = *in_channels
            .last()
            .expect("UperHead needs at least one input level");
        let psp = p / "psp_modules";
        let psp_modules = (0..pool_scales.len())
            .map(|i| ConvModule::new(&psp / i / "1", last, channels, 1, 0))
            .collect();
        let bottleneck = ConvModule::new(
            p / "bottleneck",
            last + pool_scales.len() as i64 * channels,
            channels,
            3,
            1,
        );
        let n = in_channels.len() - 1;
        let lateral_convs = (0..n)
            .map(|i| ConvModule::new(p / "lateral_convs" / i, in_channels[i], channels, 1, 0))
            .collect();
        let fpn_convs = (0..n)
            .map(|i| ConvModule::new(p / "fpn_convs" / i, channels, channels, 3, 1))
            .collect();
        let fpn_bottleneck = ConvModule::new(
            p / "fpn_bottleneck",
            in_channels.len() as i64 * channels,
            channels,
            3,
            1,
        );
        Self {
            pool_scales: pool_scales.to_vec(),
            psp_modules,
            bottleneck,
            lateral_convs,
            fpn_convs,
            fpn_bottleneck,
            cls: ClsSeg::new(p, channels, num_classes, dropout),
            align_corners,
        }
    }

    fn psp_forward(&self, x: &Tensor, train: bool) -> Tensor {
        let size = hw(x);
        let mut outs = vec![x.shallow_clone()];
        for (m, &s) in self.psp_modules.iter().zip(&self.pool_scales) {
            let y = m.forward_t(&x.adaptive_avg_pool2d([s, s]), train);
            outs.push(resize_bilinear(&y, size, self.align_corners));
        }
        self.bottleneck.forward_t(&Tensor::cat(&outs, 1), train)
    }

    /// Fused features before the classifier (`_forward_feature`).
    pub fn features(&self, inputs: &[Tensor], train: bool) -> Tensor {
        let mut laterals: Vec<Tensor> = self
            .lateral_convs
            .iter()
            .enumerate()
            .map(|(i, l)| l.forward_t(&inputs[i], train))
            .collect();
        laterals.push(self.psp_forward(inputs.last().expect("no input levels"), train));
        let n = laterals.len();
        for i in (1..n).rev() {
            let up = resize_bilinear(&laterals[i], hw(&laterals[i - 1]), self.align_corners);
            laterals[i - 1] = &laterals[i - 1] + up;
        }
        let mut outs: Vec<Tensor> = (0..n - 1)
            .map(|i| self.fpn_convs[i].forward_t(&laterals[i], train))
            .collect();
        outs.push(laterals[n - 1].shallow_clone());
        let size0 = hw(&outs[0]);
        for o in outs.iter_mut().skip(1) {
            *o = resize_bilinear(o, size0, self.align_corners);
        }
        self.fpn_bottleneck.forward_t(&Tensor::cat(&outs, 1), train)
    }

    /// Class logits at the finest level's resolution.
    pub fn forward_t(&self, inputs: &[Tensor], train: bool) -> Tensor {
        self.cls.forward_t(&self.features(inputs, train), train)
    }
}

/// mmseg `FCNHead` on one backbone level (`in_index`): `num_convs` 3x3 ConvModules, optional
/// `conv_cat` over [input, convs(input)], dropout, `conv_seg`.
#[derive(Debug)]
pub struct FcnHead {
    pub in_index: usize,
    pub convs: Vec<ConvModule>,
    pub conv_cat: Option<ConvModule>,
    pub cls: ClsSeg,
}

impl FcnHead {
    /// `p` is the `auxiliary_head` path.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &nn::Path,
        in_channels: i64,
        in_index: usize,
        channels: i64,
        num_convs: usize,
        concat_input: bool,
        num_classes: i64,
        dropout: f64,
    ) -> Self {
        let convs = (0..num_convs)
            .map(|i| {
                ConvModule::new(
                    p / "convs" / i,
                    if i == 0 { in_channels } else { channels },
                    channels,
                    3,
                    1,
                )
            })
            .collect();
        let conv_cat = concat_input
            .then(|| ConvModule::new(p / "conv_cat", in_channels + channels, channels, 3, 1));
        Self {
            in_index,
            convs,
            conv_cat,
            cls: ClsSeg::new(p, channels, num_classes, dropout),
        }
    }

    /// Class logits at the resolution of backbone level `in_index`.
    pub fn forward_t(&self, inputs: &[Tensor], train: bool) -> Tensor {
        let x = &inputs[self.in_index];
        let mut feat = x.shallow_clone();
        for c in &self.convs {
            feat = c.forward_t(&feat, train);
        }
        if let Some(cat) = &self.conv_cat {
            feat = cat.forward_t(&Tensor::cat(&[x.shallow_clone(), feat], 1), train);
        }
        self.cls.forward_t(&feat, train)
    }
}

/// mmseg `CrossEntropyLoss` (softmax, `avg_non_ignore=False`) on logits resized bilinearly to
/// the label size: the per-pixel loss is averaged over ALL pixels, ignored ones counting as 0.
/// `labels` is N,H,W int64.
pub fn seg_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
    align_corners: bool,
) -> Tensor {
    let s = labels.size();
    let logits = resize_bilinear(logits, [s[1], s[2]], align_corners).to_kind(Kind::Float);
    let loss =
        logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::None, ignore_index, 0.0);
    if !replica::has_count_reducer() {
        return loss.mean(Kind::Float);
    }
    // Data parallel: the same mean over every pixel of the whole (all-rank) batch.
    replica::batch_mean(&loss.sum(Kind::Float), loss.numel() as f64, 1.0)
}

/// mmseg `accuracy` (top-1, percent) of resized logits over non-ignored pixels.
pub fn seg_accuracy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
    align_corners: bool,
) -> Tensor {
    tch::no_grad(|| {
        let s = labels.size();
        let logits = resize_bilinear(logits, [s[1], s[2]], align_corners);
        let pred = logits.argmax(1, false);
        let valid = labels.ne(ignore_index);
        let correct = pred.eq_tensor(labels).logical_and(&valid).sum(Kind::Float);
        let total = valid.sum(Kind::Float);
        let eps = f32::EPSILON as f64;
        (correct + eps) * 100.0 / (total + eps)
    })
}
