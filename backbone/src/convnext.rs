//! ConvNeXt (Liu et al., "A ConvNet for the 2020s"), exactly as the official code builds it, in
//! two variants: the ImageNet classifier (`norm` + `head`) and the dense-prediction backbone used
//! by every detector and segmentor (per-output channels-first LayerNorm `norm{i}`, no head).
//!
//! Variable names in the [`tch::nn::VarStore`] are the official PyTorch ones
//! (`downsample_layers.0.0.weight`, `stages.0.0.dwconv.weight`, `stages.0.0.gamma`, ...), so a
//! dense ConvNeXt created under `vs.root() / "backbone"` carries exactly the mmdet / mmseg names
//! (`backbone.stages...`) and checkpoints map one-to-one.
//!
//! The block follows the official (and timm's default) formulation: depthwise conv on N,C,H,W, then
//! a permute to N,H,W,C so LayerNorm and both pointwise layers are plain `linear`s over the last
//! dimension. On a channels-last input the permute is free (the memory is already NHWC), which is
//! what makes the layout the fast one on CPU and GPU alike.

use crate::dense::DenseBackbone;
use crate::nn::{drop_path, trunc_normal_, Conv2d, ConvOpts, LayerNorm, LayerNorm2d, Linear};
use std::fmt;
use tch::nn::{self as tnn, Module, ModuleT};
use tch::Tensor;

/// Names accepted by [`ConvNeXtConfig::by_name`], smallest first.
pub const VARIANTS: [&str; 5] = [
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
];

/// Unknown variant name; the message lists the valid ones.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown ConvNeXt model '{name}'; valid names: {}", VARIANTS.join(", "))]
pub struct UnknownVariant {
    pub name: String,
}

/// Hyper-parameters of a ConvNeXt. The variant constructors give the paper's widths and depths
/// with the official defaults (1000 classes, no stochastic depth, layer scale 1e-6, classifier).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvNeXtConfig {
    /// Blocks per stage.
    pub depths: Vec<i64>,
    /// Channels per stage.
    pub dims: Vec<i64>,
    pub in_chans: i64,
    /// Classifier outputs (ignored by the dense variant).
    pub num_classes: i64,
    /// Maximum stochastic-depth rate; block i of n gets `drop_path_rate * i / (n - 1)`.
    pub drop_path_rate: f64,
    /// Initial value of the per-channel layer scale `gamma`; ≤ 0 means no `gamma` at all.
    pub layer_scale_init_value: f64,
    /// Multiplies the classifier's initial weight and bias (official fine-tuning recipes use < 1).
    pub head_init_scale: f64,
    /// `Some(stages)` builds the dense variant: no `norm`/`head`, and after each listed stage a
    /// channels-first LayerNorm `norm{i}` whose output is returned by `forward_features`.
    pub out_indices: Option<Vec<usize>>,
    /// -1: nothing frozen. 0: the stem (`downsample_layers.0`) frozen. k ≥ 1: the stem, stages
    /// 0..k and their downsampling layers (`downsample_layers.0..k`, `stages.0..k`) frozen, as
    /// mmcls' ConvNeXt `_freeze_stages` does. Frozen parts take no gradients and always run in
    /// eval mode (no drop path).
    pub frozen_stages: i64,
}

impl ConvNeXtConfig {
    fn variant(depths: [i64; 4], dims: [i64; 4]) -> Self {
        Self {
            depths: depths.to_vec(),
            dims: dims.to_vec(),
            in_chans: 3,
            num_classes: 1000,
            drop_path_rate: 0.0,
            layer_scale_init_value: 1e-6,
            head_init_scale: 1.0,
            out_indices: None,
            frozen_stages: -1,
        }
    }

    pub fn tiny() -> Self {
        Self::variant([3, 3, 9, 3], [96, 192, 384, 768])
    }
    pub fn small() -> Self {
        Self::variant([3, 3, 27, 3], [96, 192, 384, 768])
    }
    pub fn base() -> Self {
        Self::variant([3, 3, 27, 3], [128, 256, 512, 1024])
    }
    pub fn large() -> Self {
        Self::variant([3, 3, 27, 3], [192, 384, 768, 1536])
    }
    pub fn xlarge() -> Self {
        Self::variant([3, 3, 27, 3], [256, 512, 1024, 2048])
    }

    /// `convnext_tiny` ... `convnext_xlarge` (also accepts the bare `tiny` ... `xlarge`).
    pub fn by_name(name: &str) -> Result<Self, UnknownVariant> {
        let short = name.strip_prefix("convnext_").unwrap_or(name);
        match short {
            "tiny" | "t" => Ok(Self::tiny()),
            "small" | "s" => Ok(Self::small()),
            "base" | "b" => Ok(Self::base()),
            "large" | "l" => Ok(Self::large()),
            "xlarge" | "xl" => Ok(Self::xlarge()),
            _ => Err(UnknownVariant {
                name: name.to_string(),
            }),
        }
    }

    /// The dense backbone of a detector or segmentor config: this shape (any depths / dims, the
    /// rest as `tiny`), stochastic depth, layer-scale init, the given output stages.
    pub fn dense_backbone(
        depths: &[i64],
        dims: &[i64],
        drop_path_rate: f64,
        layer_scale_init_value: f64,
        out_indices: &[usize],
    ) -> Self {
        Self {
            depths: depths.to_vec(),
            dims: dims.to_vec(),
            ..Self::tiny()
        }
        .with_drop_path(drop_path_rate)
        .with_layer_scale(layer_scale_init_value)
        .dense(out_indices)
    }

    /// Builder: classifier with `n` classes (1000 for ImageNet-1k, 21841 for ImageNet-22k).
    pub fn with_classes(mut self, n: i64) -> Self {
        self.num_classes = n;
        self
    }

    /// Builder: dense variant returning the given stages (0..=3), finest first.
    pub fn dense(mut self, out_indices: &[usize]) -> Self {
        self.out_indices = Some(out_indices.to_vec());
        self
    }

    pub fn with_drop_path(mut self, rate: f64) -> Self {
        self.drop_path_rate = rate;
        self
    }

    pub fn with_layer_scale(mut self, init: f64) -> Self {
        self.layer_scale_init_value = init;
        self
    }

    pub fn with_frozen_stages(mut self, k: i64) -> Self {
        self.frozen_stages = k;
        self
    }

    pub fn is_dense(&self) -> bool {
        self.out_indices.is_some()
    }
}

/// One ConvNeXt block: dwconv 7x7 → LN → Linear 4C → GELU → Linear C → gamma → drop path + x.
#[derive(Debug)]
pub struct Block {
    pub dwconv: Conv2d,
    pub norm: LayerNorm,
    pub pwconv1: Linear,
    pub pwconv2: Linear,
    pub gamma: Option<Tensor>,
    pub drop_path: f64,
}

impl Block {
    fn new(p: tnn::Path, dim: i64, drop_path: f64, ls_init: f64) -> Self {
        let dwconv = Conv2d::new(
            &p / "dwconv",
            dim,
            dim,
            7,
            ConvOpts {
                padding: 3,
                groups: dim,
                ..Default::default()
            },
        );
        let norm = LayerNorm::new(&p / "norm", dim, 1e-6);
        let pwconv1 = Linear::new(&p / "pwconv1", dim, 4 * dim, true);
        let pwconv2 = Linear::new(&p / "pwconv2", 4 * dim, dim, true);
        let gamma = (ls_init > 0.0).then(|| p.var("gamma", &[dim], tnn::Init::Const(ls_init)));
        Self {
            dwconv,
            norm,
            pwconv1,
            pwconv2,
            gamma,
            drop_path,
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.dwconv.forward(xs).permute([0, 2, 3, 1]);
        let x = self.norm.forward(&x);
        let x = self.pwconv1.forward(&x).gelu("none");
        let mut x = self.pwconv2.forward(&x);
        if let Some(g) = &self.gamma {
            x *= g;
        }
        let x = x.permute([0, 3, 1, 2]);
        xs + drop_path(&x, self.drop_path, train)
    }
}

/// The stem (index 0: conv 4x4/4 then LN) or a downsampling layer (LN then conv 2x2/2).
#[derive(Debug)]
pub enum Downsample {
    Stem(Conv2d, LayerNorm2d),
    Down(LayerNorm2d, Conv2d),
}

impl Module for Downsample {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Downsample::Stem(c, n) => n.forward(&c.forward(xs)),
            Downsample::Down(n, c) => c.forward(&n.forward(xs)),
        }
    }
}

/// A ConvNeXt, classifier or dense variant (see [`ConvNeXtConfig::out_indices`]).
pub struct ConvNeXt {
    pub config: ConvNeXtConfig,
    pub downsample_layers: Vec<Downsample>,
    pub stages: Vec<Vec<Block>>,
    /// Classifier: final LayerNorm and linear head.
    pub norm: Option<LayerNorm>,
    pub head: Option<Linear>,
    /// Dense: (stage index, `norm{i}`) for each output stage.
    pub out_norms: Vec<(usize, LayerNorm2d)>,
    /// Every variable of the frozen part (handles share storage and autograd state with the
    /// VarStore's), so freezing can be re-applied after anything that might undo it.
    frozen_vars: Vec<Tensor>,
}

impl fmt::Debug for ConvNeXt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvNeXt")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConvNeXt {
    /// Builds the network under `p` with the official initialisation (conv / linear weights
    /// truncated normal std 0.02, biases 0, LayerNorm 1/0, gamma = layer_scale_init_value, head
    /// scaled by head_init_scale), then applies `frozen_stages`.
    pub fn new<'a>(p: impl std::borrow::Borrow<tnn::Path<'a>>, config: &ConvNeXtConfig) -> Self {
        let m = Self::new_uninit(p, config);
        m.init_weights();
        m
    }

    /// Builds the network without the official initialisation (tch's default init stays in the
    /// weights): for FLOP counting and for models whose weights are loaded right after.
    pub fn new_uninit<'a>(
        p: impl std::borrow::Borrow<tnn::Path<'a>>,
        config: &ConvNeXtConfig,
    ) -> Self {
        let p = p.borrow();
        let c = config;
        assert_eq!(c.depths.len(), 4, "ConvNeXt has four stages");
        assert_eq!(c.dims.len(), 4, "ConvNeXt has four stages");
        let ds = p / "downsample_layers";
        let mut downsample_layers = Vec::with_capacity(4);
        downsample_layers.push(Downsample::Stem(
            Conv2d::new(
                &ds / 0 / 0,
                c.in_chans,
                c.dims[0],
                4,
                ConvOpts {
                    stride: 4,
                    ..Default::default()
                },
            ),
            LayerNorm2d::new(&ds / 0 / 1, c.dims[0], 1e-6),
        ));
        for i in 1..4 {
            downsample_layers.push(Downsample::Down(
                LayerNorm2d::new(&ds / i / 0, c.dims[i - 1], 1e-6),
                Conv2d::new(
                    &ds / i / 1,
                    c.dims[i - 1],
                    c.dims[i],
                    2,
                    ConvOpts {
                        stride: 2,
                        ..Default::default()
                    },
                ),
            ));
        }
        let total: i64 = c.depths.iter().sum();
        let rate = |i: i64| {
            if total > 1 {
                c.drop_path_rate * i as f64 / (total - 1) as f64
            } else {
                0.0
            }
        };
        let st = p / "stages";
        let mut stages = Vec::with_capacity(4);
        let mut cur = 0;
        for (i, (&depth, &dim)) in c.depths.iter().zip(&c.dims).enumerate() {
            let blocks = (0..depth)
                .map(|j| Block::new(&st / i / j, dim, rate(cur + j), c.layer_scale_init_value))
                .collect();
            cur += depth;
            stages.push(blocks);
        }
        let (norm, head, out_norms) = match &c.out_indices {
            None => (
                Some(LayerNorm::new(p / "norm", c.dims[3], 1e-6)),
                Some(Linear::new(p / "head", c.dims[3], c.num_classes, true)),
                Vec::new(),
            ),
            Some(idx) => {
                let norms = idx
                    .iter()
                    .map(|&i| {
                        assert!(i < 4, "out_indices must be in 0..4, got {i}");
                        (i, LayerNorm2d::new(p / format!("norm{i}"), c.dims[i], 1e-6))
                    })
                    .collect();
                (None, None, norms)
            }
        };
        let mut m = Self {
            config: c.clone(),
            downsample_layers,
            stages,
            norm,
            head,
            out_norms,
            frozen_vars: Vec::new(),
        };
        m.frozen_vars = m.collect_frozen_vars();
        m.freeze_stages();
        m
    }

    /// The official `_init_weights` plus layer-scale / head scaling.
    pub fn init_weights(&self) {
        tch::no_grad(|| {
            let conv = |c: &Conv2d| {
                trunc_normal_(c.weight(), 0.02);
                if let Some(b) = c.bias() {
                    let _ = b.shallow_clone().zero_();
                }
            };
            let lin = |l: &Linear| {
                trunc_normal_(&l.inner.ws, 0.02);
                if let Some(b) = &l.inner.bs {
                    let _ = b.shallow_clone().zero_();
                }
            };
            for d in &self.downsample_layers {
                match d {
                    Downsample::Stem(c, _) | Downsample::Down(_, c) => conv(c),
                }
            }
            for b in self.stages.iter().flatten() {
                conv(&b.dwconv);
                lin(&b.pwconv1);
                lin(&b.pwconv2);
                if let Some(g) = &b.gamma {
                    let _ = g.shallow_clone().fill_(self.config.layer_scale_init_value);
                }
            }
            if let Some(h) = &self.head {
                lin(h);
                let s = self.config.head_init_scale;
                let _ = h.inner.ws.shallow_clone().g_mul_scalar_(s);
                if let Some(b) = &h.inner.bs {
                    let _ = b.shallow_clone().g_mul_scalar_(s);
                }
            }
        });
    }

    fn collect_frozen_vars(&self) -> Vec<Tensor> {
        let k = self.config.frozen_stages;
        if k < 0 {
            return Vec::new();
        }
        let n = (k.max(1) as usize).min(4);
        let mut out = Vec::new();
        let ln = |l: &LayerNorm, out: &mut Vec<Tensor>| {
            out.push(l.weight.shallow_clone());
            out.push(l.bias.shallow_clone());
        };
        let conv = |c: &Conv2d, out: &mut Vec<Tensor>| {
            out.push(c.weight().shallow_clone());
            out.extend(c.bias().map(|b| b.shallow_clone()));
        };
        let lin = |l: &Linear, out: &mut Vec<Tensor>| {
            out.push(l.inner.ws.shallow_clone());
            out.extend(l.inner.bs.as_ref().map(|b| b.shallow_clone()));
        };
        for d in &self.downsample_layers[..n] {
            match d {
                Downsample::Stem(c, l) | Downsample::Down(l, c) => {
                    conv(c, &mut out);
                    ln(&l.0, &mut out);
                }
            }
        }
        if k >= 1 {
            for b in self.stages[..n].iter().flatten() {
                conv(&b.dwconv, &mut out);
                ln(&b.norm, &mut out);
                lin(&b.pwconv1, &mut out);
                lin(&b.pwconv2, &mut out);
                out.extend(b.gamma.as_ref().map(|g| g.shallow_clone()));
            }
        }
        out
    }

    /// (Re-)applies `frozen_stages`: the frozen variables stop requiring gradients. Loading
    /// weights with [`crate::checkpoint::load_into`] keeps them frozen; call this again after
    /// `VarStore::unfreeze` or anything else that resets `requires_grad`.
    pub fn freeze_stages(&self) {
        for t in &self.frozen_vars {
            let _ = t.set_requires_grad(false);
        }
    }

    /// Number of leading stages that run in eval mode whatever `train` says.
    fn frozen_stage_count(&self) -> usize {
        self.config.frozen_stages.clamp(0, 4) as usize
    }

    /// Raw outputs of the four stages (no `norm{i}`), finest first.
    pub fn forward_stages(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let frozen = self.frozen_stage_count();
        let mut x = xs.shallow_clone();
        let mut outs = Vec::with_capacity(4);
        for (i, (down, blocks)) in self.downsample_layers.iter().zip(&self.stages).enumerate() {
            let t = train && i >= frozen;
            x = down.forward(&x);
            for b in blocks {
                x = b.forward_t(&x, t);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }

    /// Final stage's feature map without the per-stage outputs (saves memory in the classifier).
    fn forward_last(&self, xs: &Tensor, train: bool) -> Tensor {
        let frozen = self.frozen_stage_count();
        let mut x = xs.shallow_clone();
        for (i, (down, blocks)) in self.downsample_layers.iter().zip(&self.stages).enumerate() {
            let t = train && i >= frozen;
            x = down.forward(&x);
            for b in blocks {
                x = b.forward_t(&x, t);
            }
        }
        x
    }

    /// Pooled, normalised features before the classifier (N, C3).
    pub fn forward_pre_logits(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self
            .forward_last(xs, train)
            .mean_dim([-2i64, -1].as_slice(), false, None);
        match &self.norm {
            Some(n) => n.forward(&x),
            None => x,
        }
    }

    /// Class logits (N, num_classes). Panics on the dense variant, which has no head.
    pub fn forward_logits(&self, xs: &Tensor, train: bool) -> Tensor {
        let head = self
            .head
            .as_ref()
            .expect("forward_logits on a dense ConvNeXt (no classifier head)");
        head.forward(&self.forward_pre_logits(xs, train))
    }
}

impl ModuleT for ConvNeXt {
    /// Classifier: logits. Dense variant: the last requested feature map.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.head.is_some() {
            self.forward_logits(xs, train)
        } else {
            self.forward_features(xs, train)
                .pop()
                .expect("out_indices is empty")
        }
    }
}

impl DenseBackbone for ConvNeXt {
    /// Dense variant: `norm{i}` of each stage in out_indices. Classifier variant: the four raw
    /// stage outputs.
    fn forward_features(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let stages = self.forward_stages(xs, train);
        if self.config.out_indices.is_none() {
            return stages;
        }
        self.out_norms
            .iter()
            .map(|(i, n)| n.forward(&stages[*i]))
            .collect()
    }

    fn out_channels(&self) -> Vec<i64> {
        match &self.config.out_indices {
            Some(idx) => idx.iter().map(|&i| self.config.dims[i]).collect(),
            None => self.config.dims.clone(),
        }
    }
}
