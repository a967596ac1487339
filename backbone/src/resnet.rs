//! ResNet-50 and ResNeXt-101 (32x4d, 64x4d), the convolutional rows of the paper's
//! backbone-transfer tables, in torchvision's layout (`conv1`, `bn1`, `layer{1..4}.{j}.conv1..3`,
//! `bn1..3`, `downsample.0/1`, `fc`) so torchvision / mmdet / open-mmlab checkpoints load by name.
//!
//! The dense variant follows mmdet's detection setting: `style='pytorch'` (stride on the 3x3
//! conv, as torchvision), `frozen_stages=1` (stem and layer1 get no gradients and stay in eval
//! mode), `norm_eval=True` (every BatchNorm uses and keeps its running statistics while
//! training).

use crate::dense::DenseBackbone;
use crate::nn::{BatchNorm2d, Conv2d, ConvOpts, Linear};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// Depths, grouping and the dense-setting switches of a bottleneck ResNet / ResNeXt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Blocks per stage (ResNet-50: 3,4,6,3; 101: 3,4,23,3).
    pub layers: Vec<i64>,
    /// Cardinality of the 3x3 conv (1 for ResNet).
    pub groups: i64,
    /// Channels per group at the first stage's width 64 (64 for ResNet, 4 for 32x4d / 64x4d).
    pub width_per_group: i64,
    /// `Some(n)`: keep the classifier `fc`; `None`: dense variant without it.
    pub num_classes: Option<i64>,
    pub out_indices: Vec<usize>,
    /// mmdet `frozen_stages`: -1 none, 0 stem, k stem and layer1..k.
    pub frozen_stages: i64,
    /// mmdet `norm_eval`: BatchNorm always uses running statistics.
    pub norm_eval: bool,
    /// mmdet `norm_cfg.requires_grad` for the BatchNorm affine parameters of unfrozen stages
    /// (True in mmdet's ResNet configs).
    pub norm_requires_grad: bool,
}

impl ResNetConfig {
    fn with(layers: &[i64], groups: i64, wpg: i64) -> Self {
        Self {
            layers: layers.to_vec(),
            groups,
            width_per_group: wpg,
            num_classes: None,
            out_indices: vec![0, 1, 2, 3],
            frozen_stages: 1,
            norm_eval: true,
            norm_requires_grad: true,
        }
    }
    pub fn resnet50() -> Self {
        Self::with(&[3, 4, 6, 3], 1, 64)
    }
    pub fn resnet101() -> Self {
        Self::with(&[3, 4, 23, 3], 1, 64)
    }
    pub fn resnext101_32x4d() -> Self {
        Self::with(&[3, 4, 23, 3], 32, 4)
    }
    pub fn resnext101_64x4d() -> Self {
        Self::with(&[3, 4, 23, 3], 64, 4)
    }
    /// ImageNet classifier with the same body (torchvision's model), nothing frozen.
    pub fn classifier(mut self, n: i64) -> Self {
        self.num_classes = Some(n);
        self.frozen_stages = -1;
        self.norm_eval = false;
        self
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, groups: i64) -> Conv2d {
    let c = Conv2d::new(
        p,
        cin,
        cout,
        k,
        ConvOpts {
            stride,
            padding: k / 2,
            groups,
            bias: false,
            ..Default::default()
        },
    );
    // torchvision: kaiming normal, fan_out, ReLU gain.
    let fan_out = (cout * k * k) as f64;
    tch::no_grad(|| {
        let _ = c
            .inner
            .ws
            .shallow_clone()
            .normal_(0.0, (2.0 / fan_out).sqrt());
    });
    c
}

/// torchvision `Bottleneck` (expansion 4; stride on conv2).
#[derive(Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Bottleneck {
    fn new(p: nn::Path, cin: i64, planes: i64, stride: i64, cfg: &ResNetConfig) -> Self {
        let width = planes * cfg.width_per_group / 64 * cfg.groups;
        let cout = planes * 4;
        let downsample = (stride != 1 || cin != cout).then(|| {
            (
                conv(&p / "downsample" / 0, cin, cout, 1, stride, 1),
                BatchNorm2d::new(&p / "downsample" / 1, cout),
            )
        });
        Self {
            conv1: conv(&p / "conv1", cin, width, 1, 1, 1),
            bn1: BatchNorm2d::new(&p / "bn1", width),
            conv2: conv(&p / "conv2", width, width, 3, stride, cfg.groups),
            bn2: BatchNorm2d::new(&p / "bn2", width),
            conv3: conv(&p / "conv3", width, cout, 1, 1, 1),
            bn3: BatchNorm2d::new(&p / "bn3", cout),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.bn1.forward_t(&self.conv1.forward(x), train).relu();
        let y = self.bn2.forward_t(&self.conv2.forward(&y), train).relu();
        let y = self.bn3.forward_t(&self.conv3.forward(&y), train);
        let id = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        (y + id).relu()
    }

    fn bns_mut(&mut self) -> Vec<&mut BatchNorm2d> {
        let mut v = vec![&mut self.bn1, &mut self.bn2, &mut self.bn3];
        if let Some((_, b)) = &mut self.downsample {
            v.push(b);
        }
        v
    }

    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![
            self.conv1.weight(),
            self.conv2.weight(),
            self.conv3.weight(),
        ];
        let mut bns = vec![&self.bn1, &self.bn2, &self.bn3];
        if let Some((c, b)) = &self.downsample {
            v.push(c.weight());
            bns.push(b);
        }
        for b in bns {
            v.extend(bn_affine(b));
        }
        v
    }
}

fn bn_affine(b: &BatchNorm2d) -> Vec<&Tensor> {
    b.inner.ws.iter().chain(b.inner.bs.iter()).collect()
}

/// Bottleneck ResNet / ResNeXt (torchvision layout), classifier or dense variant.
#[derive(Debug)]
pub struct ResNet {
    pub cfg: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<Bottleneck>>,
    fc: Option<Linear>,
}

impl ResNet {
    pub fn new(p: &nn::Path, cfg: &ResNetConfig) -> Self {
        let conv1 = conv(p / "conv1", 3, 64, 7, 2, 1);
        let mut bn1 = BatchNorm2d::new(p / "bn1", 64);
        let mut cin = 64;
        let mut stages = Vec::new();
        for (i, &n) in cfg.layers.iter().enumerate() {
            let planes = 64 << i;
            let lp = p / format!("layer{}", i + 1);
            let blocks: Vec<Bottleneck> = (0..n)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let b = Bottleneck::new(&lp / j, cin, planes, stride, cfg);
                    cin = planes * 4;
                    b
                })
                .collect();
            stages.push(blocks);
        }
        let fc = cfg
            .num_classes
            .map(|nc| Linear::new(p / "fc", cin, nc, true));
        // Frozen stages and norm_eval: BN in frozen stages never trains; with norm_eval none do.
        let frozen = cfg.frozen_stages;
        if cfg.norm_eval || frozen >= 0 {
            bn1.frozen = true;
        }
        for (i, s) in stages.iter_mut().enumerate() {
            for b in s.iter_mut() {
                for bn in b.bns_mut() {
                    bn.frozen = cfg.norm_eval || (i as i64) < frozen;
                }
            }
        }
        let m = Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            stages,
            fc,
        };
        let mut no_grad: Vec<&Tensor> = Vec::new();
        if frozen >= 0 {
            no_grad.push(m.conv1.weight());
            no_grad.extend(bn_affine(&m.bn1));
        }
        for (i, s) in m.stages.iter().enumerate() {
            for b in s {
                if (i as i64) < frozen {
                    no_grad.extend(b.tensors());
                } else if !cfg.norm_requires_grad {
                    no_grad.extend(b.bns_affine());
                }
            }
        }
        for t in no_grad {
            let _ = t.set_requires_grad(false);
        }
        m
    }

    fn run(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let mut x = self
            .bn1
            .forward_t(&self.conv1.forward(xs), train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outs = Vec::with_capacity(self.stages.len());
        for s in &self.stages {
            for b in s {
                x = b.forward(&x, train);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }

    /// Classification logits (config with `num_classes`).
    pub fn forward_cls(&self, xs: &Tensor, train: bool) -> Tensor {
        let fc = self
            .fc
            .as_ref()
            .expect("forward_cls on a ResNet without fc");
        let last = self.run(xs, train).pop().expect("at least one stage");
        fc.forward(&last.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
    }
}

impl Bottleneck {
    fn bns_affine(&self) -> Vec<&Tensor> {
        let mut v = bn_affine(&self.bn1);
        v.extend(bn_affine(&self.bn2));
        v.extend(bn_affine(&self.bn3));
        if let Some((_, b)) = &self.downsample {
            v.extend(bn_affine(b));
        }
        v
    }
}

impl DenseBackbone for ResNet {
    fn forward_features(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let outs = self.run(xs, train);
        self.cfg
            .out_indices
            .iter()
            .map(|&i| outs[i].shallow_clone())
            .collect()
    }

    fn out_channels(&self) -> Vec<i64> {
        self.cfg.out_indices.iter().map(|&i| 256 << i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::param_count;
    use tch::{Device, Kind};

    #[test]
    fn resnet50_params_and_frozen_stem() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &ResNetConfig::resnet50().classifier(1000));
        assert_eq!(param_count(&vs), 25_557_032); // torchvision resnet50
        assert!(m.conv1.weight().requires_grad());
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &ResNetConfig::resnet50());
        assert!(!m.conv1.weight().requires_grad());
        assert!(!m.stages[0][0].conv2.weight().requires_grad());
        assert!(m.stages[1][0].conv2.weight().requires_grad());
        assert!(m.stages[3][2].bn3.frozen);
        let f = m.forward_features(
            &Tensor::zeros([1, 3, 64, 96], (Kind::Float, Device::Cpu)),
            true,
        );
        let shapes: Vec<Vec<i64>> = f.iter().map(|t| t.size()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![1, 256, 16, 24],
                vec![1, 512, 8, 12],
                vec![1, 1024, 4, 6],
                vec![1, 2048, 2, 3]
            ]
        );
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;
    use crate::flops;
    use crate::nn::param_count;
    use tch::{Device, Kind};

    fn gflops(cfg: ResNetConfig) -> (f64, i64) {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &cfg.classifier(1000));
        let x = Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu));
        let (_, t) = flops::count(|| tch::no_grad(|| m.forward_cls(&x, false)));
        (t.total / 1e9, param_count(&vs))
    }

    /// torchvision / fvcore figures at 224: R50 4.1G 25.6M; X101-32x4d 8.0G 44.2M;
    /// X101-64x4d 15.5G 83.5M.
    #[test]
    fn resnet_flops_at_224() {
        let (g, p) = gflops(ResNetConfig::resnet50());
        println!("r50 {g:.4}G {p}");
        assert!((g - 4.1).abs() < 0.05);
        let (g, p) = gflops(ResNetConfig::resnext101_32x4d());
        println!("x101_32x4d {g:.4}G {p}");
        assert!((g - 8.0).abs() < 0.1 && (p as f64 / 1e6 - 44.2).abs() < 0.1);
        let (g, p) = gflops(ResNetConfig::resnext101_64x4d());
        println!("x101_64x4d {g:.4}G {p}");
        assert!((g - 15.5).abs() < 0.1 && (p as f64 / 1e6 - 83.5).abs() < 0.1);
    }
}
