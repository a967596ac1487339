//! Layers shared by every network in the project: thin wrappers over tch's modules that keep
//! PyTorch's parameter names (so checkpoints map one-to-one) and report their multiply-adds to
//! [`crate::flops`].

use crate::flops;
use std::sync::RwLock;
use tch::nn::{self, Module};
use tch::Tensor;

/// A replacement kernel for the 3x3 convolutions with stride 1, padding 1, no dilation and no
/// groups (the FPN, RPN, UperNet and box/mask head layers): `(input, weight)` to the output
/// without bias, or `None` to leave the layer to libtorch's convolution. It must compute
/// `conv2d(input, weight, padding=1)` up to rounding, differentiably in both arguments.
pub type Conv3x3Kernel = fn(&Tensor, &Tensor) -> Option<Tensor>;

static CONV3X3_KERNEL: RwLock<Option<Conv3x3Kernel>> = RwLock::new(None);

/// Install (or with `None` remove) the process-wide [`Conv3x3Kernel`] — what
/// `torch.backends.cudnn.benchmark` is to PyTorch: a choice of algorithm for every such layer,
/// made once by the program (the engine installs a CPU Winograd kernel), not by the model.
pub fn set_conv3x3_kernel(kernel: Option<Conv3x3Kernel>) {
    *CONV3X3_KERNEL.write().unwrap_or_else(|e| e.into_inner()) = kernel;
}

fn conv3x3_kernel() -> Option<Conv3x3Kernel> {
    *CONV3X3_KERNEL.read().unwrap_or_else(|e| e.into_inner())
}

/// Conv2d with PyTorch's parameter names `weight` and optional `bias`.
#[derive(Debug)]
pub struct Conv2d {
    pub inner: nn::Conv2D,
    in_channels: i64,
    groups: i64,
    kernel: [i64; 2],
    /// 3x3, stride 1, padding 1, no dilation or groups: a layer a [`Conv3x3Kernel`] may run.
    plain_3x3: bool,
}

/// Hyper-parameters of [`Conv2d`] besides channel counts and kernel size.
#[derive(Debug, Clone, Copy)]
pub struct ConvOpts {
    pub stride: i64,
    pub padding: i64,
    pub dilation: i64,
    pub groups: i64,
    pub bias: bool,
}

impl Default for ConvOpts {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
        }
    }
}

impl Conv2d {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, o: ConvOpts) -> Self {
        let cfg = nn::ConvConfig {
            stride: o.stride,
            padding: o.padding,
            dilation: o.dilation,
            groups: o.groups,
            bias: o.bias,
            ..Default::default()
        };
        Self {
            inner: nn::conv2d(p, cin, cout, k, cfg),
            in_channels: cin,
            groups: o.groups,
            kernel: [k, k],
            plain_3x3: k == 3
                && o.stride == 1
                && o.padding == 1
                && o.dilation == 1
                && o.groups == 1,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.inner.ws
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bs.as_ref()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let replaced = match conv3x3_kernel() {
            Some(kernel) if self.plain_3x3 => kernel(xs, &self.inner.ws),
            _ => None,
        };
        let y = match replaced {
            Some(y) => match &self.inner.bs {
                Some(b) => y + b.view([1, -1, 1, 1]),
                None => y,
            },
            None => self.inner.forward(xs),
        };
        if flops::is_counting() {
            let per_out = (self.in_channels / self.groups) * self.kernel[0] * self.kernel[1];
            flops::record("conv", y.numel() as f64 * per_out as f64);
        }
        y
    }
}

/// ConvTranspose2d (`weight` [cin, cout/groups, k, k], `bias`). Counted as mmcv does for
/// deconvolutions: every input position multiplies the whole kernel.
#[derive(Debug)]
pub struct ConvTranspose2d {
    pub inner: nn::ConvTranspose2D,
    out_channels: i64,
    kernel: i64,
}

impl ConvTranspose2d {
    pub fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Self {
        let cfg = nn::ConvTransposeConfig {
            stride,
            ..Default::default()
        };
        Self {
            inner: nn::conv_transpose2d(p, cin, cout, k, cfg),
            out_channels: cout,
            kernel: k,
        }
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if flops::is_counting() {
            let macs = xs.numel() as f64 * (self.out_channels * self.kernel * self.kernel) as f64;
            flops::record("deconv", macs);
        }
        self.inner.forward(xs)
    }
}

/// Linear over the last dimension (`weight` [out, in], `bias` [out]).
#[derive(Debug)]
pub struct Linear {
    pub inner: nn::Linear,
    in_features: i64,
}

impl Linear {
    pub fn new(p: nn::Path, din: i64, dout: i64, bias: bool) -> Self {
        let cfg = nn::LinearConfig {
            bias,
            ..Default::default()
        };
        Self {
            inner: nn::linear(p, din, dout, cfg),
            in_features: din,
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let y = self.inner.forward(xs);
        if flops::is_counting() {
            flops::record("linear", y.numel() as f64 * self.in_features as f64);
        }
        y
    }
}

/// LayerNorm over the last dimension (`weight`, `bias`).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: p.ones("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
            dim,
            eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// LayerNorm over the channel axis of an N,C,H,W tensor ("channels_first" in the official code).
/// Computed by moving channels last, which is numerically what F.layer_norm does there.
#[derive(Debug)]
pub struct LayerNorm2d(pub LayerNorm);

impl LayerNorm2d {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self(LayerNorm::new(p, dim, eps))
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.0
            .forward(&xs.permute([0, 2, 3, 1]))
            .permute([0, 3, 1, 2])
    }
}

/// BatchNorm2d with PyTorch's state names (`weight`, `bias`, `running_mean`, `running_var`).
/// `num_batches_tracked` in checkpoints carries no information for momentum-based BN and is
/// accepted and ignored by the checkpoint loader.
#[derive(Debug)]
pub struct BatchNorm2d {
    pub inner: nn::BatchNorm,
    /// When true the layer always uses running statistics and never updates them (mmdet's
    /// `norm_eval` / frozen BN for ResNet backbones).
    pub frozen: bool,
}

impl BatchNorm2d {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        let cfg = nn::BatchNormConfig {
            eps: 1e-5,
            momentum: 0.1,
            ..Default::default()
        };
        Self {
            inner: nn::batch_norm2d(p, dim, cfg),
            frozen: false,
        }
    }
}

impl nn::ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.inner.forward_t(xs, train && !self.frozen)
    }
}

/// `a @ b`, counted as a matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Tensor {
    if flops::is_counting() {
        flops::record("matmul", flops::matmul_macs(&a.size(), &b.size()));
    }
    a.matmul(b)
}

/// Stochastic depth: drop whole samples of a residual branch with probability `p` while
/// training, scaling kept samples by 1/(1-p); identity in eval mode. Under
/// [`crate::replica::with_batch_keys`] each sample's keep/drop comes from its own keyed stream
/// (one call site per call), otherwise from libtorch's global generator.
pub fn drop_path(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![xs.size()[0]];
    shape.extend(std::iter::repeat_n(1, xs.dim() - 1));
    let opts = (xs.kind(), xs.device());
    let mask = crate::replica::keyed_keep_mask(&shape, keep, opts)
        .unwrap_or_else(|| Tensor::empty(shape.as_slice(), opts).bernoulli_float_(keep));
    // Scale the (N,1,..) mask, not the activation: one full-size multiply (timm's DropPath).
    xs * (mask / keep)
}

/// Truncated normal init in place (mean 0, std `std`, cut at ±2 absolute, as timm's
/// `trunc_normal_(std=.02)` whose default bounds are a=-2, b=2).
pub fn trunc_normal_(t: &Tensor, std: f64) {
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        let _ = t.normal_(0.0, std);
        let _ = t.clamp_(-2.0, 2.0);
    });
}

/// Parameters of a model as PyTorch's `sum(p.numel() for p in model.parameters())` counts them:
/// every variable except BatchNorm running statistics (buffers, not parameters).
pub fn param_count(vs: &nn::VarStore) -> i64 {
    vs.variables()
        .iter()
        .filter(|(name, _)| !is_buffer_name(name))
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

/// Names PyTorch keeps as buffers rather than parameters.
pub fn is_buffer_name(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}
