//! The paper's modernization roadmap (Fig. 2 / Sec. 2): ResNet-50 turned into ConvNeXt-T one
//! design decision at a time, each step a real, trainable ImageNet classifier built from one
//! [`RoadmapConfig`] whose switches are cumulative:
//!
//! | step | switch |
//! |---|---|
//! | `roadmap_resnet50`, `roadmap_resnet50_modern` | ResNet-50 (the second differs only in training recipe) |
//! | `roadmap_stage_ratio` | depths 3,4,6,3 → 3,3,9,3 |
//! | `roadmap_patchify_stem` | 7x7/2 conv + max-pool → 4x4/4 conv + norm |
//! | `roadmap_resnextify` | 3x3 conv depthwise, width 64 → 96 |
//! | `roadmap_inverted_bottleneck` | 1x1 expand (4x) → depthwise → 1x1 reduce; residual width C |
//! | `roadmap_dwconv_up` | depthwise conv first, before the 1x1 convs |
//! | `roadmap_kernel7` | depthwise kernel 3 → 7 |
//! | `roadmap_gelu` | ReLU → GELU |
//! | `roadmap_fewer_activations` | one GELU, between the two 1x1 convs |
//! | `roadmap_fewer_norms` | one norm, after the depthwise conv |
//! | `roadmap_bn_to_ln` | BatchNorm → LayerNorm |
//! | `roadmap_convnext_tiny` | separate downsampling layers (norm + 2x2/2 conv), stem norm, head norm, layer scale |
//!
//! Until separate downsampling exists, the first block of stages 2..4 downsamples ResNet-style:
//! stride 2 on its spatial conv (when the depthwise conv comes first it keeps the previous
//! stage's width and the 1x1 expansion widens) and a strided 1x1 conv + norm on the shortcut.
//! That placement is what reproduces the paper's FLOPs column (4.1G for `roadmap_dwconv_up`).
//! Parameter names are generic (`stem`, `stages.{s}.{b}.conv{1,2,3}`, `norm{1,2,3}`,
//! `shortcut.{conv,norm}`, `downsample_layers.{s}`, `norm`, `head`).

use crate::nn::{
    drop_path, trunc_normal_, BatchNorm2d, Conv2d, ConvOpts, LayerNorm, LayerNorm2d, Linear,
};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stem {
    /// 7x7 stride-2 conv, norm, activation, 3x3 stride-2 max-pool (ResNet).
    ResNet,
    /// 4x4 stride-4 conv and a norm (patchify).
    Patchify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// ResNet bottleneck: 1x1 reduce to the stage width, kxk, 1x1 expand 4x.
    Bottleneck,
    /// Inverted bottleneck: 1x1 expand 4x, kxk depthwise, 1x1 reduce.
    Inverted,
    /// Inverted bottleneck with the depthwise conv moved up: kxk depthwise, 1x1 expand, 1x1 reduce.
    DwFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Act {
    Relu,
    Gelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    Batch,
    Layer,
}

/// One network of the roadmap; every field is a switch of the table above.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoadmapConfig {
    pub depths: Vec<i64>,
    pub stem: Stem,
    /// Stage-1 width: the bottleneck width for [`BlockKind::Bottleneck`] (output 4x), the
    /// residual width otherwise; doubles every stage.
    pub width: i64,
    /// Grouped spatial conv with one group per channel (ResNeXt-ify).
    pub depthwise: bool,
    pub block: BlockKind,
    pub kernel: i64,
    pub act: Act,
    /// A single activation per block, between the 1x1 convs (and none after the addition).
    pub fewer_acts: bool,
    /// A single norm per block, after the first (depthwise) conv.
    pub fewer_norms: bool,
    pub norm: NormKind,
    /// ConvNeXt's stand-alone downsampling layers (norm + 2x2 stride-2 conv) between stages.
    pub separate_downsampling: bool,
    /// Layer scale on the residual branch (0: none).
    pub layer_scale_init: f64,
    pub drop_path_rate: f64,
    pub num_classes: i64,
}

/// The roadmap's rows in order: (name, config, the paper's GFLOPs at 224, the paper's top-1).
pub fn roadmap_steps() -> Vec<(&'static str, RoadmapConfig, f64, f64)> {
    let r50 = RoadmapConfig {
        depths: vec![3, 4, 6, 3],
        stem: Stem::ResNet,
        width: 64,
        depthwise: false,
        block: BlockKind::Bottleneck,
        kernel: 3,
        act: Act::Relu,
        fewer_acts: false,
        fewer_norms: false,
        norm: NormKind::Batch,
        separate_downsampling: false,
        layer_scale_init: 0.0,
        drop_path_rate: 0.0,
        num_classes: 1000,
    };
    let mut steps = vec![("roadmap_resnet50", r50.clone(), 4.1, 76.1)];
    let mut c = RoadmapConfig {
        drop_path_rate: 0.1,
        ..r50
    };
    steps.push(("roadmap_resnet50_modern", c.clone(), 4.1, 78.8));
    c.depths = vec![3, 3, 9, 3];
    steps.push(("roadmap_stage_ratio", c.clone(), 4.5, 79.4));
    c.stem = Stem::Patchify;
    steps.push(("roadmap_patchify_stem", c.clone(), 4.4, 79.5));
    c.depthwise = true;
    c.width = 96;
    steps.push(("roadmap_resnextify", c.clone(), 5.3, 80.5));
    c.block = BlockKind::Inverted;
    steps.push(("roadmap_inverted_bottleneck", c.clone(), 4.6, 80.6));
    c.block = BlockKind::DwFirst;
    steps.push(("roadmap_dwconv_up", c.clone(), 4.1, 79.9));
    c.kernel = 7;
    steps.push(("roadmap_kernel7", c.clone(), 4.2, 80.6));
    c.act = Act::Gelu;
    steps.push(("roadmap_gelu", c.clone(), 4.2, 80.6));
    c.fewer_acts = true;
    steps.push(("roadmap_fewer_activations", c.clone(), 4.2, 81.3));
    c.fewer_norms = true;
    steps.push(("roadmap_fewer_norms", c.clone(), 4.2, 81.4));
    c.norm = NormKind::Layer;
    steps.push(("roadmap_bn_to_ln", c.clone(), 4.2, 81.5));
    c.separate_downsampling = true;
    c.layer_scale_init = 1e-6;
    steps.push(("roadmap_convnext_tiny", c, 4.5, 82.0));
    steps
}

impl RoadmapConfig {
    /// A roadmap row by name (`roadmap_resnet50` ... `roadmap_convnext_tiny`).
    pub fn by_name(name: &str) -> Option<Self> {
        roadmap_steps()
            .into_iter()
            .find(|s| s.0 == name)
            .map(|s| s.1)
    }
}

/// BatchNorm or channels-first LayerNorm (eps 1e-6, as ConvNeXt).
#[derive(Debug)]
enum Norm {
    Batch(BatchNorm2d),
    Layer(LayerNorm2d),
}

impl Norm {
    fn new(p: nn::Path, kind: NormKind, c: i64) -> Self {
        match kind {
            NormKind::Batch => Norm::Batch(BatchNorm2d::new(p, c)),
            NormKind::Layer => Norm::Layer(LayerNorm2d::new(p, c, 1e-6)),
        }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Batch(b) => b.forward_t(x, train),
            Norm::Layer(l) => l.forward(x),
        }
    }
}

fn act(a: Act, x: Tensor) -> Tensor {
    match a {
        Act::Relu => x.relu(),
        Act::Gelu => x.gelu("none"),
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, groups: i64, bias: bool) -> Conv2d {
    let c = Conv2d::new(
        p,
        cin,
        cout,
        k,
        ConvOpts {
            stride,
            padding: k / 2,
            groups,
            bias,
            ..Default::default()
        },
    );
    trunc_normal_(&c.inner.ws, 0.02);
    if let Some(b) = &c.inner.bs {
        tch::no_grad(|| {
            let _ = b.shallow_clone().zero_();
        });
    }
    c
}

/// One residual block; `norms[i]` follows `convs[i]` when present, `acts[i]` says whether an
/// activation follows conv i.
#[derive(Debug)]
struct Block {
    convs: [Conv2d; 3],
    norms: [Option<Norm>; 3],
    acts: [bool; 3],
    post_act: bool,
    shortcut: Option<(Conv2d, Norm)>,
    gamma: Option<Tensor>,
    drop_path: f64,
    act: Act,
}

impl Block {
    fn new(
        p: nn::Path,
        cfg: &RoadmapConfig,
        cin: i64,
        stage_width: i64,
        stride: i64,
        dp: f64,
    ) -> Self {
        let k = cfg.kernel;
        let bias = cfg.fewer_norms; // convs without a norm after them keep a bias
        let (convs, out) = match cfg.block {
            BlockKind::Bottleneck => {
                let m = stage_width;
                let g = if cfg.depthwise { m } else { 1 };
                (
                    [
                        conv(&p / "conv1", cin, m, 1, 1, 1, bias),
                        conv(&p / "conv2", m, m, k, stride, g, bias),
                        conv(&p / "conv3", m, 4 * m, 1, 1, 1, bias),
                    ],
                    4 * m,
                )
            }
            BlockKind::Inverted => {
                let c = stage_width;
                (
                    [
                        conv(&p / "conv1", cin, 4 * c, 1, 1, 1, bias),
                        conv(&p / "conv2", 4 * c, 4 * c, k, stride, 4 * c, bias),
                        conv(&p / "conv3", 4 * c, c, 1, 1, 1, bias),
                    ],
                    c,
                )
            }
            BlockKind::DwFirst => {
                let c = stage_width;
                (
                    [
                        // Depthwise on the block's input width (strided in a stage's first
                        // block); the 1x1 expansion then widens cin → 4c.
                        conv(&p / "conv1", cin, cin, k, stride, cin, true),
                        conv(&p / "conv2", cin, 4 * c, 1, 1, 1, true),
                        conv(&p / "conv3", 4 * c, c, 1, 1, 1, true),
                    ],
                    c,
                )
            }
        };
        let norms = [0, 1, 2].map(|i| {
            let dim = convs[i].weight().size()[0];
            (!cfg.fewer_norms || i == 0)
                .then(|| Norm::new(&p / format!("norm{}", i + 1), cfg.norm, dim))
        });
        // Activations: after the first two convs (ResNet) or, with fewer_acts, only after the
        // conv that expands (conv1 in an inverted bottleneck, conv2 with the depthwise first).
        let expand = if cfg.block == BlockKind::DwFirst {
            1
        } else {
            0
        };
        let acts = [0, 1, 2].map(|i| {
            if cfg.fewer_acts {
                i == expand && cfg.block != BlockKind::Bottleneck
            } else {
                i < 2
            }
        });
        let shortcut = (stride != 1 || cin != out).then(|| {
            (
                conv(&p / "shortcut" / "conv", cin, out, 1, stride, 1, false),
                Norm::new(&p / "shortcut" / "norm", cfg.norm, out),
            )
        });
        let gamma = (cfg.layer_scale_init > 0.0)
            .then(|| p.var("gamma", &[out], nn::Init::Const(cfg.layer_scale_init)));
        Self {
            convs,
            norms,
            acts,
            post_act: !cfg.fewer_acts,
            shortcut,
            gamma,
            drop_path: dp,
            act: cfg.act,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for i in 0..3 {
            y = self.convs[i].forward(&y);
            if let Some(n) = &self.norms[i] {
                y = n.forward(&y, train);
            }
            if self.acts[i] {
                y = act(self.act, y);
            }
        }
        if let Some(g) = &self.gamma {
            y *= g.view([-1, 1, 1]);
        }
        let id = match &self.shortcut {
            Some((c, n)) => n.forward(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        let out = id + drop_path(&y, self.drop_path, train);
        if self.post_act {
            act(self.act, out)
        } else {
            out
        }
    }
}

/// A roadmap network (ImageNet classifier).
#[derive(Debug)]
pub struct RoadmapNet {
    pub cfg: RoadmapConfig,
    stem: Conv2d,
    stem_norm: Norm,
    downsample: Vec<(Norm, Conv2d)>,
    stages: Vec<Vec<Block>>,
    norm: Option<LayerNorm>,
    head: Linear,
}

impl RoadmapNet {
    pub fn new(p: &nn::Path, cfg: &RoadmapConfig) -> Self {
        let w = cfg.width;
        let (stem, stem_norm) = match cfg.stem {
            Stem::ResNet => (
                conv(p / "stem" / "conv", 3, w, 7, 2, 1, false),
                Norm::new(p / "stem" / "norm", cfg.norm, w),
            ),
            Stem::Patchify => {
                let c = Conv2d::new(
                    p / "stem" / "conv",
                    3,
                    w,
                    4,
                    ConvOpts {
                        stride: 4,
                        ..Default::default()
                    },
                );
                (c, Norm::new(p / "stem" / "norm", cfg.norm, w))
            }
        };
        let total: i64 = cfg.depths.iter().sum();
        let mut k = 0;
        let mut cin = w;
        let mut stages = Vec::new();
        let mut downsample = Vec::new();
        for (s, &d) in cfg.depths.iter().enumerate() {
            let sw = w << s;
            if cfg.separate_downsampling && s > 0 {
                let dp = p / "downsample_layers" / s;
                let n = Norm::new(&dp / "0", cfg.norm, cin);
                let c = Conv2d::new(
                    &dp / "1",
                    cin,
                    sw,
                    2,
                    ConvOpts {
                        stride: 2,
                        ..Default::default()
                    },
                );
                downsample.push((n, c));
                cin = sw;
            }
            let mut blocks = Vec::new();
            for b in 0..d {
                let stride = if s > 0 && b == 0 && !cfg.separate_downsampling {
                    2
                } else {
                    1
                };
                let dp = if total > 1 {
                    cfg.drop_path_rate * k as f64 / (total - 1) as f64
                } else {
                    0.0
                };
                let blk = Block::new(p / "stages" / s / b, cfg, cin, sw, stride, dp);
                cin = blk.convs[2].weight().size()[0];
                blocks.push(blk);
                k += 1;
            }
            stages.push(blocks);
        }
        let norm = cfg
            .separate_downsampling
            .then(|| LayerNorm::new(p / "norm", cin, 1e-6));
        let head = Linear::new(p / "head", cin, cfg.num_classes, true);
        Self {
            cfg: cfg.clone(),
            stem,
            stem_norm,
            downsample,
            stages,
            norm,
            head,
        }
    }

    /// Feature map of every stage (N, C, H, W).
    pub fn stage_outputs(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let mut x = self.stem_norm.forward(&self.stem.forward(xs), train);
        if self.cfg.stem == Stem::ResNet {
            x = act(self.cfg.act, x).max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        let mut outs = Vec::new();
        for (s, blocks) in self.stages.iter().enumerate() {
            if s > 0 && !self.downsample.is_empty() {
                let (n, c) = &self.downsample[s - 1];
                x = c.forward(&n.forward(&x, train));
            }
            for b in blocks {
                x = b.forward(&x, train);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }

    /// ImageNet logits: global average pool, (LayerNorm), linear classifier.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.stage_outputs(xs, train).pop().expect("a stage");
        let mut f = last.mean_dim([2i64, 3].as_slice(), false, last.kind());
        if let Some(n) = &self.norm {
            f = n.forward(&f);
        }
        self.head.forward(&f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flops;
    use tch::{Device, Kind};

    #[test]
    fn roadmap_flops_match_the_paper_within_0_1g() {
        let mut report = String::new();
        let mut worst: f64 = 0.0;
        for (name, cfg, paper, _) in roadmap_steps() {
            let vs = nn::VarStore::new(Device::Cpu);
            let m = RoadmapNet::new(&vs.root(), &cfg);
            let x = Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu));
            let (y, t) = flops::count(|| tch::no_grad(|| m.forward_t(&x, false)));
            assert_eq!(y.size(), vec![1, 1000]);
            let g = t.total / 1e9;
            let params = crate::nn::param_count(&vs) as f64 / 1e6;
            report += &format!("{name:30} {g:6.3}G (paper {paper}G) {params:6.2}M\n");
            worst = worst.max((g - paper).abs());
        }
        println!("{report}");
        assert!(worst <= 0.1, "worst FLOP gap {worst:.3}G\n{report}");
    }
}
