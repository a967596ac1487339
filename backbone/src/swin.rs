//! Swin Transformer (Liu et al. 2021), the transformer rows of the paper's backbone-transfer
//! tables: patch embedding, shifted-window attention with relative position bias and the
//! shifted-window mask, patch merging, stochastic depth; a classification variant (timm /
//! official repo behaviour at 224) and the dense variant of mmdet / the official detection repo
//! (a LayerNorm `norm{i}` on every output, bottom/right zero padding to window multiples).
//!
//! Parameter names follow the official Swin repo (`patch_embed.proj`, `layers.{i}.blocks.{j}.
//! attn.relative_position_bias_table`, `layers.{i}.downsample` at the END of stage i, `norm`,
//! `head`), which is also what the official Swin detection / segmentation checkpoints use under
//! `backbone.`. timm and mmdet 2.x names are mapped at load time by [`convert_state_dict`].
//!
//! Tokens are kept channels-last (N, H, W, C) between blocks as in the reference code, so every
//! reshape matches theirs and results agree to float rounding.

use crate::dense::DenseBackbone;
use crate::nn::{drop_path, matmul, trunc_normal_, Conv2d, ConvOpts, LayerNorm, Linear};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Architecture and dense-setting switches of a Swin Transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    pub embed_dim: i64,
    pub depths: Vec<i64>,
    pub num_heads: Vec<i64>,
    pub window_size: i64,
    pub patch_size: i64,
    pub mlp_ratio: i64,
    pub drop_path_rate: f64,
    /// `Some(n)`: classification model (final `norm` + `head`); `None`: dense variant.
    pub num_classes: Option<i64>,
    /// Stages whose (normalized) output the dense variant returns.
    pub out_indices: Vec<usize>,
    /// mmdet's `frozen_stages`: -1 nothing, 0 patch embedding, k also stages 1..k.
    pub frozen_stages: i64,
}

impl SwinConfig {
    fn base_cfg(embed_dim: i64, depths: &[i64], num_heads: &[i64], dpr: f64) -> Self {
        Self {
            embed_dim,
            depths: depths.to_vec(),
            num_heads: num_heads.to_vec(),
            window_size: 7,
            patch_size: 4,
            mlp_ratio: 4,
            drop_path_rate: dpr,
            num_classes: None,
            out_indices: vec![0, 1, 2, 3],
            frozen_stages: -1,
        }
    }
    /// Swin-T: C=96, depths 2,2,6,2 (dense variant, drop path 0.2 as the detection configs).
    pub fn tiny() -> Self {
        Self::base_cfg(96, &[2, 2, 6, 2], &[3, 6, 12, 24], 0.2)
    }
    /// Swin-S: C=96, depths 2,2,18,2.
    pub fn small() -> Self {
        Self::base_cfg(96, &[2, 2, 18, 2], &[3, 6, 12, 24], 0.3)
    }
    /// Swin-B: C=128, depths 2,2,18,2.
    pub fn base() -> Self {
        Self::base_cfg(128, &[2, 2, 18, 2], &[4, 8, 16, 32], 0.3)
    }
    /// Swin-L: C=192, depths 2,2,18,2.
    pub fn large() -> Self {
        Self::base_cfg(192, &[2, 2, 18, 2], &[6, 12, 24, 48], 0.3)
    }
    /// The same architecture as an ImageNet classifier (timm's `swin_*_patch4_window7_224`).
    pub fn classifier(mut self, num_classes: i64) -> Self {
        self.num_classes = Some(num_classes);
        self
    }
    /// Channels of stage i.
    pub fn dim(&self, i: usize) -> i64 {
        self.embed_dim << i
    }
}

/// Window multi-head self-attention with a learned relative position bias.
#[derive(Debug)]
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    /// `relative_position_bias_table` [(2w-1)^2, heads].
    table: Tensor,
    /// Flattened pairwise index into `table` (a buffer, rebuilt rather than loaded).
    index: Tensor,
    heads: i64,
    scale: f64,
}

/// Pairwise relative position index of a w x w window, as every Swin implementation builds it.
fn relative_position_index(w: i64) -> Vec<i64> {
    let n = (w * w) as usize;
    let mut idx = Vec::with_capacity(n * n);
    for i in 0..n as i64 {
        for j in 0..n as i64 {
            let dh = i / w - j / w + w - 1;
            let dw = i % w - j % w + w - 1;
            idx.push(dh * (2 * w - 1) + dw);
        }
    }
    idx
}

impl WindowAttention {
    fn new(p: nn::Path, dim: i64, heads: i64, window: i64) -> Self {
        let qkv = Linear::new(&p / "qkv", dim, 3 * dim, true);
        let proj = Linear::new(&p / "proj", dim, dim, true);
        let table = p.zeros(
            "relative_position_bias_table",
            &[(2 * window - 1) * (2 * window - 1), heads],
        );
        trunc_normal_(&table, 0.02);
        let index = Tensor::from_slice(&relative_position_index(window)).to_device(p.device());
        Self {
            qkv,
            proj,
            table,
            index,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
        }
    }

    /// `x`: (windows*N, tokens, C); `mask`: (windows, tokens, tokens) of 0 / -100.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b_, n, c) = x.size3().expect("window tokens are 3-d");
        let h = self.heads;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b_, n, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        let q = qkv.get(0) * self.scale;
        let k = qkv.get(1);
        let v = qkv.get(2);
        let attn = matmul(&q, &k.transpose(-2, -1));
        let bias = self
            .table
            .index_select(0, &self.index)
            .view([n, n, h])
            .permute([2, 0, 1])
            .unsqueeze(0);
        // Out of place, as mmdet's WindowMSA: under autocast the fp16/bf16 logits plus the fp32
        // bias table promote to fp32, and the mask and softmax then run in fp32 (softmax is on
        // autocast's fp32 list; an explicit reduced dtype would override that, so ask for fp32).
        let mut attn = attn + bias;
        if let Some(m) = mask {
            let nw = m.size()[0];
            attn = (attn.view([-1, nw, h, n, n]) + m.unsqueeze(1).unsqueeze(0)).view([-1, h, n, n]);
        }
        let attn = attn.softmax(-1, softmax_kind(&attn));
        // Back to the values' precision for the product (what autocast's matmul casts to anyway;
        // a no-op in fp32).
        let attn = attn.to_kind(v.kind());
        let y = matmul(&attn, &v).transpose(1, 2).reshape([b_, n, c]);
        self.proj.forward(&y)
    }
}

/// Softmax dtype of window attention: fp32 for reduced-precision logits (PyTorch autocast's
/// policy for softmax), the logits' own for fp32 / fp64.
fn softmax_kind(logits: &Tensor) -> Kind {
    match logits.kind() {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// (N, Hp, Wp, C) → (N*windows, w*w, C), windows in raster order.
fn window_partition(x: &Tensor, w: i64) -> Tensor {
    let (b, h, wd, c) = x.size4().expect("N,H,W,C");
    x.view([b, h / w, w, wd / w, w, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([-1, w * w, c])
}

/// Inverse of [`window_partition`].
fn window_reverse(win: &Tensor, w: i64, h: i64, wd: i64) -> Tensor {
    let c = *win.size().last().expect("C");
    win.view([-1, h / w, wd / w, w, w, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([-1, h, wd, c])
}

/// The shifted-window attention mask for a padded map of `hp` x `wp`: tokens that the cyclic
/// shift brought together from different image regions get -100 (as in every Swin codebase).
fn shifted_window_mask(hp: i64, wp: i64, w: i64, s: i64, opts: (Kind, tch::Device)) -> Tensor {
    let region = |i: i64, n: i64| -> i64 {
        if i < n - w {
            0
        } else if i < n - s {
            1
        } else {
            2
        }
    };
    let mut ids = Vec::with_capacity((hp * wp) as usize);
    for y in 0..hp {
        for x in 0..wp {
            ids.push((region(y, hp) * 3 + region(x, wp)) as f32);
        }
    }
    let img = Tensor::from_slice(&ids).view([1, hp, wp, 1]);
    let mw = window_partition(&img, w).view([-1, w * w]);
    let diff = mw.unsqueeze(1) - mw.unsqueeze(2);
    let zeros = diff.zeros_like();
    zeros
        .masked_fill(&diff.ne(0.0), -100.0)
        .to_kind(opts.0)
        .to_device(opts.1)
}

/// One Swin block: (shifted) window attention and an MLP, both pre-norm residual branches.
#[derive(Debug)]
struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    drop_path: f64,
}

impl SwinBlock {
    fn new(p: nn::Path, dim: i64, heads: i64, window: i64, mlp_ratio: i64, dp: f64) -> Self {
        let fc1 = Linear::new(&p / "mlp" / "fc1", dim, dim * mlp_ratio, true);
        let fc2 = Linear::new(&p / "mlp" / "fc2", dim * mlp_ratio, dim, true);
        Self {
            norm1: LayerNorm::new(&p / "norm1", dim, 1e-5),
            attn: WindowAttention::new(&p / "attn", dim, heads, window),
            norm2: LayerNorm::new(&p / "norm2", dim, 1e-5),
            fc1,
            fc2,
            drop_path: dp,
        }
    }

    /// `x`: (N, H, W, C). Padding happens before the cyclic shift, as in mmdet and the official
    /// detection code; padded positions are zeros (after norm1) and are not masked.
    fn forward(
        &self,
        x: &Tensor,
        w: i64,
        shift: i64,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, h, wd, c) = x.size4().expect("N,H,W,C");
        let mut y = self.norm1.forward(x);
        let pad_r = (w - wd % w) % w;
        let pad_b = (w - h % w) % w;
        if pad_r > 0 || pad_b > 0 {
            y = y.constant_pad_nd([0, 0, 0, pad_r, 0, pad_b]);
        }
        let (hp, wp) = (h + pad_b, wd + pad_r);
        if shift > 0 {
            y = y.roll([-shift, -shift], [1, 2]);
        }
        let win = self.attn.forward(&window_partition(&y, w), mask);
        y = window_reverse(&win, w, hp, wp);
        if shift > 0 {
            y = y.roll([shift, shift], [1, 2]);
        }
        if pad_r > 0 || pad_b > 0 {
            y = y.narrow(1, 0, h).narrow(2, 0, wd);
        }
        let x = x + drop_path(&y, self.drop_path, train);
        let t = x.view([b, h * wd, c]);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&t)).gelu("none"));
        (t + drop_path(&m, self.drop_path, train)).view([b, h, wd, c])
    }
}

/// 2x2 patch merging: concatenate neighbours in the official order (0,0),(1,0),(0,1),(1,1)
/// (row offset fastest), LayerNorm(4C), Linear(4C→2C) without bias.
#[derive(Debug)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            norm: LayerNorm::new(&p / "norm", 4 * dim, 1e-5),
            reduction: Linear::new(&p / "reduction", 4 * dim, 2 * dim, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, h, w, c) = x.size4().expect("N,H,W,C");
        let x = if h % 2 == 1 || w % 2 == 1 {
            x.constant_pad_nd([0, 0, 0, w % 2, 0, h % 2])
        } else {
            x.shallow_clone()
        };
        let (h, w) = (h + h % 2, w + w % 2);
        let x = x
            .reshape([b, h / 2, 2, w / 2, 2, c])
            .permute([0, 1, 3, 4, 2, 5])
            .flatten(3, -1);
        self.reduction.forward(&self.norm.forward(&x))
    }
}

#[derive(Debug)]
struct SwinStage {
    blocks: Vec<SwinBlock>,
    downsample: Option<PatchMerging>,
}

/// Swin Transformer, classification or dense variant (see [`SwinConfig::num_classes`]).
#[derive(Debug)]
pub struct SwinTransformer {
    pub cfg: SwinConfig,
    proj: Conv2d,
    patch_norm: LayerNorm,
    stages: Vec<SwinStage>,
    /// Classification: final `norm` and `head`.
    norm: Option<LayerNorm>,
    head: Option<Linear>,
    /// Dense: `norm{i}` per output index.
    out_norms: Vec<(usize, LayerNorm)>,
}

impl SwinTransformer {
    /// Build under `p` (parameter names relative to it, e.g. `patch_embed.proj.weight`).
    pub fn new(p: &nn::Path, cfg: &SwinConfig) -> Self {
        let c0 = cfg.embed_dim;
        let proj = Conv2d::new(
            p / "patch_embed" / "proj",
            3,
            c0,
            cfg.patch_size,
            ConvOpts {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        let patch_norm = LayerNorm::new(p / "patch_embed" / "norm", c0, 1e-5);
        let total: i64 = cfg.depths.iter().sum();
        let rate = |k: i64| {
            if total > 1 {
                cfg.drop_path_rate * k as f64 / (total - 1) as f64
            } else {
                0.0
            }
        };
        let n_stages = cfg.depths.len();
        let mut k = 0;
        let mut stages = Vec::new();
        for (i, (&d, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let lp = p / "layers" / i;
            let dim = cfg.dim(i);
            let blocks = (0..d)
                .map(|j| {
                    let b = SwinBlock::new(
                        &lp / "blocks" / j,
                        dim,
                        heads,
                        cfg.window_size,
                        cfg.mlp_ratio,
                        rate(k),
                    );
                    k += 1;
                    b
                })
                .collect();
            let downsample = (i + 1 < n_stages).then(|| PatchMerging::new(&lp / "downsample", dim));
            stages.push(SwinStage { blocks, downsample });
        }
        let last = cfg.dim(n_stages - 1);
        let (norm, head, out_norms) = match cfg.num_classes {
            Some(nc) => (
                Some(LayerNorm::new(p / "norm", last, 1e-5)),
                Some(Linear::new(p / "head", last, nc, true)),
                vec![],
            ),
            None => {
                let norms = cfg
                    .out_indices
                    .iter()
                    .map(|&i| (i, LayerNorm::new(p / format!("norm{i}"), cfg.dim(i), 1e-5)))
                    .collect();
                (None, None, norms)
            }
        };
        let m = Self {
            cfg: cfg.clone(),
            proj,
            patch_norm,
            stages,
            norm,
            head,
            out_norms,
        };
        m.init_linears();
        m.freeze_stages();
        m
    }

    /// timm / official init: linear weights truncated normal std 0.02, biases 0.
    fn init_linears(&self) {
        let mut lins: Vec<&Linear> = Vec::new();
        for s in &self.stages {
            for b in &s.blocks {
                lins.extend([&b.attn.qkv, &b.attn.proj, &b.fc1, &b.fc2]);
            }
            if let Some(d) = &s.downsample {
                lins.push(&d.reduction);
            }
        }
        lins.extend(self.head.iter());
        tch::no_grad(|| {
            for l in lins {
                trunc_normal_(&l.inner.ws, 0.02);
                if let Some(b) = &l.inner.bs {
                    let _ = b.shallow_clone().zero_();
                }
            }
        });
    }

    /// mmdet's `frozen_stages`: stop gradients of the patch embedding and the first stages.
    fn freeze_stages(&self) {
        let f = self.cfg.frozen_stages;
        if f < 0 {
            return;
        }
        let mut ts: Vec<&Tensor> = vec![
            &self.proj.inner.ws,
            &self.patch_norm.weight,
            &self.patch_norm.bias,
        ];
        ts.extend(self.proj.inner.bs.iter());
        for s in self.stages.iter().take(f as usize) {
            for b in &s.blocks {
                for l in [&b.attn.qkv, &b.attn.proj, &b.fc1, &b.fc2] {
                    ts.push(&l.inner.ws);
                    ts.extend(l.inner.bs.iter());
                }
                ts.extend([
                    &b.norm1.weight,
                    &b.norm1.bias,
                    &b.norm2.weight,
                    &b.norm2.bias,
                    &b.attn.table,
                ]);
            }
            if let Some(d) = &s.downsample {
                ts.extend([&d.norm.weight, &d.norm.bias, &d.reduction.inner.ws]);
            }
        }
        for (i, n) in &self.out_norms {
            if (*i as i64) < f {
                ts.extend([&n.weight, &n.bias]);
            }
        }
        for t in ts {
            let _ = t.set_requires_grad(false);
        }
    }

    /// Runs every stage; returns each stage's output before its patch merging, (N, H, W, C).
    fn stage_outputs(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let ps = self.cfg.patch_size;
        let (_, _, h, w) = xs.size4().expect("N,3,H,W");
        let (pr, pb) = ((ps - w % ps) % ps, (ps - h % ps) % ps);
        let xs = if pr > 0 || pb > 0 {
            xs.constant_pad_nd([0, pr, 0, pb])
        } else {
            xs.shallow_clone()
        };
        let mut x = self
            .patch_norm
            .forward(&self.proj.forward(&xs).permute([0, 2, 3, 1]));
        let win = self.cfg.window_size;
        let mut outs = Vec::with_capacity(self.stages.len());
        for (si, s) in self.stages.iter().enumerate() {
            // Frozen stages run in eval mode (no stochastic depth), as mmdet's train() does.
            let train = train && si as i64 >= self.cfg.frozen_stages;
            let (_, h, w, _) = x.size4().expect("N,H,W,C");
            // Classification models (timm, official) drop the shift when the whole map fits in
            // one window (stage 4 at 224); the dense variant always shifts, as mmdet does.
            let shift = if self.cfg.num_classes.is_some() && h <= win && w <= win {
                0
            } else {
                win / 2
            };
            let (hp, wp) = ((h + win - 1) / win * win, (w + win - 1) / win * win);
            let mask = (shift > 0)
                .then(|| shifted_window_mask(hp, wp, win, shift, (x.kind(), x.device())));
            for (j, b) in s.blocks.iter().enumerate() {
                let sh = if j % 2 == 1 { shift } else { 0 };
                x = b.forward(
                    &x,
                    win,
                    sh,
                    if sh > 0 { mask.as_ref() } else { None },
                    train,
                );
            }
            outs.push(x.shallow_clone());
            if let Some(d) = &s.downsample {
                x = d.forward(&x);
            }
        }
        outs
    }

    /// Classification logits (needs a config with `num_classes`).
    pub fn forward_cls(&self, xs: &Tensor, train: bool) -> Tensor {
        let (norm, head) = match (&self.norm, &self.head) {
            (Some(n), Some(h)) => (n, h),
            _ => panic!("forward_cls on a dense Swin (num_classes is None)"),
        };
        let last = self
            .stage_outputs(xs, train)
            .pop()
            .expect("at least one stage");
        head.forward(
            &norm
                .forward(&last)
                .mean_dim([1i64, 2].as_slice(), false, last.kind()),
        )
    }
}

impl DenseBackbone for SwinTransformer {
    fn forward_features(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let outs = self.stage_outputs(xs, train);
        self.out_norms
            .iter()
            .map(|(i, n)| n.forward(&outs[*i]).permute([0, 3, 1, 2]).contiguous())
            .collect()
    }

    fn out_channels(&self) -> Vec<i64> {
        self.cfg
            .out_indices
            .iter()
            .map(|&i| self.cfg.dim(i))
            .collect()
    }
}

/// Which codebase a Swin state dict comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinKeyStyle {
    /// Official Swin repo (and the official detection / segmentation repos): our names.
    Official,
    /// timm ≥ 0.9: downsample at the start of stage i+1, classifier `head.fc`.
    Timm,
    /// mmdet 2.x / mmseg 0.x `SwinTransformer`: `stages`, `w_msa`, `ffn`, unfold-ordered merging.
    MmDet,
}

/// Guess the layout of a Swin state dict (keys without any `backbone.` prefix).
pub fn detect_style<'a>(keys: impl IntoIterator<Item = &'a str>) -> SwinKeyStyle {
    let keys: Vec<&str> = keys.into_iter().collect();
    if keys
        .iter()
        .any(|k| k.starts_with("stages.") || k.starts_with("patch_embed.projection"))
    {
        SwinKeyStyle::MmDet
    } else if keys.iter().any(|k| k.starts_with("layers.0.downsample.")) {
        SwinKeyStyle::Official
    } else if keys.iter().any(|k| {
        k.starts_with("head.fc.") || (k.starts_with("layers.") && k.contains(".downsample."))
    }) {
        SwinKeyStyle::Timm
    } else {
        SwinKeyStyle::Official
    }
}

/// Map one key of the given style to our (official) name; `None` for buffers we rebuild
/// (`relative_position_index`, `attn_mask`).
pub fn map_key(key: &str, style: SwinKeyStyle) -> Option<String> {
    if key.ends_with("relative_position_index") || key.ends_with("attn_mask") {
        return None;
    }
    let out = match style {
        SwinKeyStyle::Official => key.to_string(),
        SwinKeyStyle::Timm => {
            if let Some(rest) = key.strip_prefix("head.fc.") {
                format!("head.{rest}")
            } else if let Some((i, rest)) = split_layer(key, "layers.") {
                match rest.strip_prefix("downsample.") {
                    Some(r) if i > 0 => format!("layers.{}.downsample.{r}", i - 1),
                    _ => key.to_string(),
                }
            } else {
                key.to_string()
            }
        }
        SwinKeyStyle::MmDet => key
            .replacen("stages.", "layers.", 1)
            .replace("attn.w_msa.", "attn.")
            .replace("ffn.layers.0.0.", "mlp.fc1.")
            .replace("ffn.layers.1.", "mlp.fc2.")
            .replace("patch_embed.projection.", "patch_embed.proj."),
    };
    Some(out)
}

fn split_layer<'a>(key: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let (num, tail) = rest.split_once('.')?;
    Some((num.parse().ok()?, tail))
}

/// Undo mmdet's unfold channel order of a patch-merging weight (reduction [out, 4C] or norm
/// [4C]): mmdet indexes the merged vector as c*4 + (dy*2 + dx), the official code as
/// (dx*2 + dy)*C + c.
fn unfold_to_official(key: &str, v: &Tensor) -> Tensor {
    let perm = Tensor::from_slice(&[0i64, 2, 1, 3]).to_device(v.device());
    if key.ends_with("reduction.weight") {
        let (o, i) = v.size2().expect("reduction weight is 2-d");
        v.reshape([o, i / 4, 4])
            .transpose(1, 2)
            .index_select(1, &perm)
            .reshape([o, i])
    } else {
        let i = v.size()[0];
        v.reshape([i / 4, 4])
            .transpose(0, 1)
            .index_select(0, &perm)
            .reshape([i])
    }
}

/// Convert a Swin state dict of any supported layout to our names (drops rebuilt buffers,
/// strips `backbone.` / `module.` prefixes, reorders mmdet's patch-merging channels).
pub fn convert_state_dict(dict: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let strip = |k: &str| -> String {
        let k = k.strip_prefix("module.").unwrap_or(k);
        k.strip_prefix("backbone.").unwrap_or(k).to_string()
    };
    let dict: Vec<(String, Tensor)> = dict.into_iter().map(|(k, v)| (strip(&k), v)).collect();
    let style = detect_style(dict.iter().map(|(k, _)| k.as_str()));
    dict.into_iter()
        .filter_map(|(k, v)| {
            let nk = map_key(&k, style)?;
            let v = if style == SwinKeyStyle::MmDet && k.contains(".downsample.") {
                unfold_to_official(&k, &v)
            } else {
                v
            };
            Some((nk, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_index_matches_reference_corners() {
        let idx = relative_position_index(7);
        assert_eq!(idx.len(), 49 * 49);
        assert_eq!(idx[0], 6 * 13 + 6); // same token: centre of the table
        assert_eq!(idx[48], 0); // token 0 vs token 48: dh=-6, dw=-6
        assert_eq!(idx[48 * 49], 168); // dh=+6, dw=+6
    }

    #[test]
    fn timm_and_mmdet_names_map_to_official() {
        let t = SwinKeyStyle::Timm;
        assert_eq!(
            map_key("layers.1.downsample.reduction.weight", t).unwrap(),
            "layers.0.downsample.reduction.weight"
        );
        assert_eq!(map_key("head.fc.weight", t).unwrap(), "head.weight");
        assert_eq!(
            map_key("layers.0.blocks.1.attn.relative_position_index", t),
            None
        );
        let m = SwinKeyStyle::MmDet;
        assert_eq!(
            map_key(
                "stages.2.blocks.3.attn.w_msa.relative_position_bias_table",
                m
            )
            .unwrap(),
            "layers.2.blocks.3.attn.relative_position_bias_table"
        );
        assert_eq!(
            map_key("stages.0.blocks.0.ffn.layers.0.0.weight", m).unwrap(),
            "layers.0.blocks.0.mlp.fc1.weight"
        );
        assert_eq!(
            map_key("stages.0.blocks.0.ffn.layers.1.bias", m).unwrap(),
            "layers.0.blocks.0.mlp.fc2.bias"
        );
        assert_eq!(
            map_key("patch_embed.projection.weight", m).unwrap(),
            "patch_embed.proj.weight"
        );
        assert_eq!(map_key("norm3.weight", m).unwrap(), "norm3.weight");
    }

    #[test]
    fn unfold_reorder_inverts_mmdet_converter() {
        // mmdet's converter: x.reshape(4, C)[[0,2,1,3]].T.reshape(4C); ours must undo it.
        let c = 3;
        let off = Tensor::arange(4 * c, (Kind::Float, tch::Device::Cpu));
        let perm = Tensor::from_slice(&[0i64, 2, 1, 3]);
        let mm = off
            .reshape([4, c])
            .index_select(0, &perm)
            .transpose(0, 1)
            .reshape([4 * c]);
        let back = unfold_to_official("downsample.norm.weight", &mm);
        assert_eq!(
            back.max_other(&off).sum(Kind::Float).double_value(&[]),
            off.sum(Kind::Float).double_value(&[])
        );
        assert!(back.equal(&off));
    }

    #[test]
    fn dense_shapes_at_odd_size() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = SwinConfig {
            embed_dim: 16,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![1, 2, 4, 8],
            ..SwinConfig::tiny()
        };
        let m = SwinTransformer::new(&vs.root(), &cfg);
        let x = Tensor::randn([1, 3, 70, 101], (Kind::Float, tch::Device::Cpu));
        let f = m.forward_features(&x, false);
        let shapes: Vec<Vec<i64>> = f.iter().map(|t| t.size()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![1, 16, 18, 26],
                vec![1, 32, 9, 13],
                vec![1, 64, 5, 7],
                vec![1, 128, 3, 4]
            ]
        );
    }
}

#[cfg(test)]
mod flop_tests {
    use super::*;
    use crate::flops;
    use crate::nn::param_count;

    /// Swin-T at 224: 28.3M parameters (timm), 4.5G FLOPs (the Swin paper / the ConvNeXt table).
    #[test]
    fn swin_tiny_params_and_flops_at_224() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = SwinTransformer::new(&vs.root(), &SwinConfig::tiny().classifier(1000));
        assert_eq!(param_count(&vs), 28_288_354);
        let x = Tensor::zeros([1, 3, 224, 224], (Kind::Float, tch::Device::Cpu));
        let (_, t) = flops::count(|| tch::no_grad(|| m.forward_cls(&x, false)));
        println!("swin_tiny {:.4}G {:?}", t.total / 1e9, t.by_kind);
        assert!((t.total / 1e9 - 4.5).abs() < 0.05, "{}", t.total);
    }
}

#[cfg(test)]
mod train_tests {
    use super::*;

    /// Training mode with stochastic depth and frozen stages: gradients reach the unfrozen
    /// layers only.
    #[test]
    fn frozen_stages_get_no_gradient() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = SwinConfig {
            embed_dim: 16,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![1, 2, 4, 8],
            frozen_stages: 1,
            drop_path_rate: 0.5,
            ..SwinConfig::tiny()
        };
        let m = SwinTransformer::new(&vs.root(), &cfg);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, tch::Device::Cpu));
        let loss = m
            .forward_features(&x, true)
            .iter()
            .map(|f| f.square().mean(Kind::Float))
            .sum::<Tensor>();
        loss.backward();
        let vars = vs.variables();
        assert!(!vars["patch_embed.proj.weight"].requires_grad());
        assert!(!vars["layers.0.blocks.1.attn.relative_position_bias_table"].requires_grad());
        assert!(!vars["norm0.weight"].requires_grad());
        let g = vars["layers.1.blocks.0.attn.relative_position_bias_table"].grad();
        assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
