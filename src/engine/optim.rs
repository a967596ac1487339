//! AdamW over tch tensors with mmcv's `LearningRateDecayOptimizerConstructor` parameter groups.
//!
//! Written here rather than taken from `tch::nn::Optimizer` so that the moments are ours to
//! checkpoint (bit-exact resume) and the groups are ours to define. The update is PyTorch's
//! `torch.optim.AdamW` (single-tensor path): decoupled decay `p *= 1 - lr*wd`, `m = lerp(m, g,
//! 1-b1)`, `v = b2*v + (1-b2)*g*g`, `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.

use super::config::{DecayType, OptimizerConfig};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Layer id of a parameter under the official layer-wise rule for ConvNeXt (`num_layers` = 6 for
/// T, 12 for the 27-block S/B/L/XL): stem 0, stage 0 → 1, downsample/stage 1 → 2, downsample 2 → 3, stage 2
/// block b → 3 + b/3, downsample/stage 3 → num_layers, everything else num_layers + 1.
pub fn layer_id_layer_wise(name: &str, num_layers: i64) -> i64 {
    if matches!(
        name,
        "backbone.cls_token" | "backbone.mask_token" | "backbone.pos_embed"
    ) {
        return 0;
    }
    let parts: Vec<&str> = name.split('.').collect();
    if name.starts_with("backbone.downsample_layers") {
        let stage: i64 = parts.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        return match stage {
            0 => 0,
            1 => 2,
            2 => 3,
            _ => num_layers,
        };
    }
    if name.starts_with("backbone.stages") {
        let stage: i64 = parts.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        let block: i64 = parts.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
        return match stage {
            0 => 1,
            1 => 2,
            2 => 3 + block / 3,
            _ => num_layers,
        };
    }
    num_layers + 1
}

/// Layer id under mmcv's stage-wise rule (`num_max_layer` = num_layers + 2): downsample layers 0,
/// `stages.{s}` → s + 1, everything else num_max_layer - 1.
pub fn layer_id_stage_wise(name: &str, num_max_layer: i64) -> i64 {
    if matches!(
        name,
        "backbone.cls_token" | "backbone.mask_token" | "backbone.pos_embed"
    ) {
        return 0;
    }
    if name.starts_with("backbone.downsample_layers") {
        return 0;
    }
    if name.starts_with("backbone.stages") {
        let stage: i64 = name
            .split('.')
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return stage + 1;
    }
    num_max_layer - 1
}

/// One parameter group: mmcv's `layer_{id}_{decay|no_decay}`.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub name: String,
    pub layer_id: i64,
    pub lr_scale: f64,
    pub weight_decay: f64,
    /// Initial lr of the group (scaled base lr x lr_scale); the schedule multiplies from here.
    pub initial_lr: f64,
    /// Current lr (set by the schedule every iteration).
    pub lr: f64,
    pub params: Vec<String>,
}

/// Group assignment of one named parameter: (group name, layer id, lr scale, weight decay).
pub fn assign(name: &str, shape: &[i64], cfg: &OptimizerConfig) -> (String, i64, f64, f64) {
    let one_d_or_bias =
        shape.len() == 1 || name.ends_with(".bias") || matches!(name, "pos_embed" | "cls_token");
    let no_decay = (cfg.no_decay_1d_and_bias && one_d_or_bias)
        || cfg.no_decay_keys.iter().any(|k| name.contains(k.as_str()));
    let (kind, wd) = if no_decay {
        ("no_decay", 0.0)
    } else {
        ("decay", cfg.weight_decay)
    };
    let num_layers = cfg.num_layers + 2;
    let layer_id = match cfg.decay_type {
        DecayType::LayerWise => layer_id_layer_wise(name, cfg.num_layers),
        DecayType::StageWise => layer_id_stage_wise(name, num_layers),
        DecayType::None => num_layers - 1,
    };
    let scale = cfg.decay_rate.powi((num_layers - layer_id - 1) as i32);
    (format!("layer_{layer_id}_{kind}"), layer_id, scale, wd)
}

/// Build the groups for the trainable parameters `(name, shape)` (frozen ones must be left out
/// by the caller). `base_lr` is the recipe lr after batch scaling.
pub fn build_groups(
    params: &[(String, Vec<i64>)],
    cfg: &OptimizerConfig,
    base_lr: f64,
) -> Vec<ParamGroup> {
    let mut groups: BTreeMap<String, ParamGroup> = BTreeMap::new();
    for (name, shape) in params {
        let (g, layer_id, scale, wd) = assign(name, shape, cfg);
        groups
            .entry(g.clone())
            .or_insert_with(|| ParamGroup {
                name: g,
                layer_id,
                lr_scale: scale,
                weight_decay: wd,
                initial_lr: base_lr * scale,
                lr: base_lr * scale,
                params: vec![],
            })
            .params
            .push(name.clone());
    }
    let mut v: Vec<ParamGroup> = groups.into_values().collect();
    v.sort_by(|a, b| a.layer_id.cmp(&b.layer_id).then(a.name.cmp(&b.name)));
    v
}

/// Printable table of the groups (lr scale, weight decay, tensors, elements).
pub fn group_table(groups: &[ParamGroup], numel: &dyn Fn(&str) -> i64) -> String {
    let mut s = format!(
        "{:<22} {:>9} {:>12} {:>6} {:>8} {:>12}\n",
        "group", "lr scale", "lr", "wd", "tensors", "params"
    );
    let mut total = 0;
    for g in groups {
        let n: i64 = g.params.iter().map(|p| numel(p)).sum();
        total += n;
        s += &format!(
            "{:<22} {:>9.5} {:>12.4e} {:>6} {:>8} {:>12}\n",
            g.name,
            g.lr_scale,
            g.initial_lr,
            g.weight_decay,
            g.params.len(),
            n
        );
    }
    s += &format!(
        "{:<22} {:>9} {:>12} {:>6} {:>8} {:>12}\n",
        "total",
        "",
        "",
        "",
        groups.iter().map(|g| g.params.len()).sum::<usize>(),
        total
    );
    s
}

/// Per-parameter AdamW state.
#[derive(Debug)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over named parameters, one (lr, wd) per group.
#[derive(Debug)]
pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Completed optimizer steps (PyTorch's `state['step']`, shared by all parameters since all
    /// are stepped together).
    pub step: i64,
    pub params: BTreeMap<String, Tensor>,
    pub state: BTreeMap<String, Moments>,
    /// Step with libtorch's fused kernel (CUDA parameters; see [`AdamW::step`]).
    pub fused: bool,
}

impl AdamW {
    pub fn new(
        groups: Vec<ParamGroup>,
        params: BTreeMap<String, Tensor>,
        cfg: &OptimizerConfig,
    ) -> Result<Self> {
        for g in &groups {
            for p in &g.params {
                if !params.contains_key(p) {
                    bail!("optimizer group {} names unknown parameter {p}", g.name);
                }
            }
        }
        let state = params
            .iter()
            .map(|(n, p)| {
                let z = || p.zeros_like().set_requires_grad(false);
                (
                    n.clone(),
                    Moments {
                        exp_avg: z(),
                        exp_avg_sq: z(),
                    },
                )
            })
            .collect();
        let fused = params.values().next().is_some_and(|p| p.device().is_cuda());
        Ok(Self {
            groups,
            betas: (cfg.betas[0], cfg.betas[1]),
            eps: cfg.eps,
            step: 0,
            params,
            state,
            fused,
        })
    }

    /// Zero every parameter's gradient (set to None-equivalent zeros like PyTorch's
    /// `zero_grad(set_to_none=False)`; values are identical either way for AdamW).
    pub fn zero_grad(&self) {
        for p in self.params.values() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One AdamW step with the groups' current lr. Parameters without a gradient are skipped
    /// (as PyTorch does), but the shared step count still advances. On CUDA, libtorch's fused
    /// kernel (`torch.optim.AdamW(fused=True)`: one pass per tensor instead of ~10 kernel
    /// launches, which add up to a tenth of a GPU training step); elsewhere PyTorch's per-tensor
    /// update (`foreach=False`, its CPU default), whose rounding does not depend on how the work
    /// is vectorised: on the CPU the optimizer is well under 1 % of a step, and data-parallel
    /// runs stay within 1e-7 of single-process ones (the fused kernel's rounding moved them 50x
    /// further apart, which Adam then amplifies).
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        if self.fused {
            self.step_fused()
        } else {
            self.step_per_tensor();
            Ok(())
        }
    }

    fn step_per_tensor(&mut self) {
        let (b1, b2) = self.betas;
        let t = self.step as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        tch::no_grad(|| {
            for g in &self.groups {
                let step_size = g.lr / bc1;
                for name in &g.params {
                    let p = &self.params[name];
                    let grad = p.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let st = self.state.get_mut(name).expect("state for every param");
                    let mut p = p.shallow_clone();
                    if g.weight_decay != 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - g.lr * g.weight_decay);
                    }
                    let grad = if grad.kind() != p.kind() {
                        grad.to_kind(p.kind())
                    } else {
                        grad
                    };
                    let _ = st.exp_avg.lerp_(&grad, 1.0 - b1);
                    let _ = st.exp_avg_sq.g_mul_scalar_(b2);
                    let _ = st.exp_avg_sq.addcmul_(&(&grad * (1.0 - b2)), &grad);
                    let denom = (st.exp_avg_sq.sqrt() / bc2_sqrt) + self.eps;
                    let _ = p.addcdiv_(&(&st.exp_avg * (-step_size)), &denom);
                }
            }
        });
    }

    fn step_fused(&mut self) -> Result<()> {
        for g in &self.groups {
            // The group's tensors by dtype (the kernel takes one dtype per call).
            let mut by_kind: BTreeMap<String, [Vec<Tensor>; 4]> = BTreeMap::new();
            for name in &g.params {
                let p = &self.params[name];
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let st = &self.state[name];
                let grad = if grad.kind() != p.kind() {
                    grad.to_kind(p.kind())
                } else {
                    grad
                };
                let e = by_kind.entry(format!("{:?}", p.kind())).or_default();
                e[0].push(p.shallow_clone());
                e[1].push(grad);
                e[2].push(st.exp_avg.shallow_clone());
                e[3].push(st.exp_avg_sq.shallow_clone());
            }
            for [p, grad, m, v] in by_kind.values() {
                cnx_dist::ops::fused_adamw(
                    p,
                    grad,
                    m,
                    v,
                    cnx_dist::ops::AdamWStep {
                        step: self.step as u64,
                        lr: g.lr,
                        betas: self.betas,
                        weight_decay: g.weight_decay,
                        eps: self.eps,
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Global L2 norm of all gradients (clipping, logging), which is also the finite check of
    /// fp16 loss scaling: it is inf/nan exactly when some gradient element is, because the
    /// per-tensor norms accumulate in fp64, where squares of finite fp32 values cannot
    /// overflow. The per-tensor norms stay on the device, are stacked and reduced there, and
    /// one value is read back: one host synchronisation per iteration, not one per parameter.
    /// 0 when no parameter has a gradient.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .params
                .values()
                .map(|p| p.grad())
                .filter(|g| g.defined())
                .map(|g| g.norm_scalaropt_dtype(2.0, Kind::Double))
                .collect();
            if norms.is_empty() {
                return 0.0;
            }
            Tensor::stack(&norms, 0)
                .norm_scalaropt_dtype(2.0, Kind::Double)
                .double_value(&[])
        })
    }

    /// Multiply every gradient by `f` (clipping, unscaling), in place on the device: no host
    /// read.
    pub fn scale_grads(&self, f: f64) {
        if f == 1.0 {
            return;
        }
        tch::no_grad(|| {
            for p in self.params.values() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(f);
                }
            }
        });
    }

    /// True when every gradient is finite (fp16 loss scaling skips the step otherwise); one
    /// host read, through [`AdamW::grad_norm`] (the trainer uses the norm directly).
    #[cfg(test)]
    pub fn grads_finite(&self) -> bool {
        self.grad_norm().is_finite()
    }

    /// Moments as named tensors for a checkpoint (`exp_avg.<param>`, `exp_avg_sq.<param>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::with_capacity(self.state.len() * 2);
        for (n, m) in &self.state {
            v.push((
                format!("exp_avg.{n}"),
                m.exp_avg.to_device(tch::Device::Cpu),
            ));
            v.push((
                format!("exp_avg_sq.{n}"),
                m.exp_avg_sq.to_device(tch::Device::Cpu),
            ));
        }
        v
    }

    /// Restore moments saved by [`AdamW::state_tensors`].
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)], step: i64) -> Result<()> {
        let map: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        tch::no_grad(|| -> Result<()> {
            for (n, m) in self.state.iter_mut() {
                for (prefix, dst) in [
                    ("exp_avg", &mut m.exp_avg),
                    ("exp_avg_sq", &mut m.exp_avg_sq),
                ] {
                    let key = format!("{prefix}.{n}");
                    let src = map
                        .get(key.as_str())
                        .ok_or_else(|| anyhow::anyhow!("optimizer state lacks {key}"))?;
                    if src.size() != dst.size() {
                        bail!(
                            "optimizer state {key}: shape {:?} vs parameter {:?}",
                            src.size(),
                            dst.size()
                        );
                    }
                    dst.copy_(src);
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::presets;

    /// Expected (layer id, decay?) of a parameter, written from recipes.md's text independently
    /// of the implementation above; `n` is the config's `num_layers`.
    fn expected_det(name: &str, ndim: usize, n: i64) -> (i64, bool) {
        let decay = !(ndim == 1 || name.ends_with(".bias"));
        let f: Vec<&str> = name.split('.').collect();
        let id = if f[0] == "backbone" && f[1] == "downsample_layers" {
            [0, 2, 3, n][f[2].parse::<usize>().unwrap()]
        } else if f[0] == "backbone" && f[1] == "stages" {
            let (s, b): (usize, i64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
            [1, 2, 3 + b / 3, n][s]
        } else {
            n + 1
        };
        (id, decay)
    }

    fn expected_seg(name: &str, ndim: usize, n: i64) -> (i64, bool) {
        let decay = !(ndim == 1 || name.ends_with(".bias"));
        let f: Vec<&str> = name.split('.').collect();
        let id = if f[0] == "backbone" && f[1] == "downsample_layers" {
            0
        } else if f[0] == "backbone" && f[1] == "stages" {
            f[2].parse::<i64>().unwrap() + 1
        } else {
            n + 1
        };
        (id, decay)
    }

    /// Parameter names and shapes of a ConvNeXt-T dense backbone + a few head names.
    pub(crate) fn convnext_names(depths: &[i64], dims: &[i64]) -> Vec<(String, Vec<i64>)> {
        let mut v = vec![];
        let d = dims;
        v.push((
            "backbone.downsample_layers.0.0.weight".into(),
            vec![d[0], 3, 4, 4],
        ));
        v.push(("backbone.downsample_layers.0.0.bias".into(), vec![d[0]]));
        v.push(("backbone.downsample_layers.0.1.weight".into(), vec![d[0]]));
        v.push(("backbone.downsample_layers.0.1.bias".into(), vec![d[0]]));
        for s in 1..4 {
            v.push((
                format!("backbone.downsample_layers.{s}.0.weight"),
                vec![d[s - 1]],
            ));
            v.push((
                format!("backbone.downsample_layers.{s}.0.bias"),
                vec![d[s - 1]],
            ));
            v.push((
                format!("backbone.downsample_layers.{s}.1.weight"),
                vec![d[s], d[s - 1], 2, 2],
            ));
            v.push((format!("backbone.downsample_layers.{s}.1.bias"), vec![d[s]]));
        }
        for s in 0..4 {
            for b in 0..depths[s] {
                let p = format!("backbone.stages.{s}.{b}");
                let c = d[s];
                v.push((format!("{p}.dwconv.weight"), vec![c, 1, 7, 7]));
                v.push((format!("{p}.dwconv.bias"), vec![c]));
                v.push((format!("{p}.norm.weight"), vec![c]));
                v.push((format!("{p}.norm.bias"), vec![c]));
                v.push((format!("{p}.pwconv1.weight"), vec![4 * c, c]));
                v.push((format!("{p}.pwconv1.bias"), vec![4 * c]));
                v.push((format!("{p}.pwconv2.weight"), vec![c, 4 * c]));
                v.push((format!("{p}.pwconv2.bias"), vec![c]));
                v.push((format!("{p}.gamma"), vec![c]));
            }
            v.push((format!("backbone.norm{s}.weight"), vec![d[s]]));
            v.push((format!("backbone.norm{s}.bias"), vec![d[s]]));
        }
        v.push((
            "neck.lateral_convs.0.conv.weight".into(),
            vec![256, 96, 1, 1],
        ));
        v.push(("neck.lateral_convs.0.conv.bias".into(), vec![256]));
        v.push(("roi_head.bbox_head.fc_cls.weight".into(), vec![81, 1024]));
        v.push(("decode_head.bottleneck.bn.weight".into(), vec![512]));
        v.push((
            "decode_head.bottleneck.conv.weight".into(),
            vec![512, 2048, 3, 3],
        ));
        v
    }

    /// Check every (name, shape) against the expected mapping for a preset's optimizer config:
    /// `num_layers` is 6 when `stages.2` has 9 blocks (T) and 12 when it has 27 (S/B/L/XL).
    pub(crate) fn check_groups(params: &[(String, Vec<i64>)], preset: &str) {
        let cfg = presets::find(preset).unwrap().config().optimizer;
        let blocks = params
            .iter()
            .filter(|(p, _)| p.starts_with("backbone.stages.2.") && p.ends_with(".dwconv.weight"))
            .count();
        let n = match blocks {
            9 => 6,
            27 => 12,
            b => panic!("{preset}: {b} blocks in stages.2"),
        };
        assert_eq!(cfg.num_layers, n, "{preset}");
        let groups = build_groups(params, &cfg, cfg.lr);
        let mut seen = 0;
        for g in &groups {
            for p in &g.params {
                let shape = &params.iter().find(|(n, _)| n == p).unwrap().1;
                let (id, decay) = match cfg.decay_type {
                    DecayType::LayerWise => expected_det(p, shape.len(), n),
                    _ => expected_seg(p, shape.len(), n),
                };
                assert_eq!(g.layer_id, id, "{p}");
                assert_eq!(g.weight_decay, if decay { 0.05 } else { 0.0 }, "{p}");
                let scale = cfg.decay_rate.powi((n + 2 - id - 1) as i32);
                assert!((g.lr_scale - scale).abs() < 1e-15, "{p}");
                assert!((g.initial_lr - cfg.lr * scale).abs() < 1e-18, "{p}");
                seen += 1;
            }
        }
        assert_eq!(seen, params.len());
    }

    #[test]
    fn groups_of_convnext_tiny_names_follow_the_recipes() {
        let names = convnext_names(&[3, 3, 9, 3], &[96, 192, 384, 768]);
        check_groups(&names, "mask_rcnn_convnext_tiny_3x");
        check_groups(&names, "upernet_convnext_tiny_512_160k");
        let names = convnext_names(&[3, 3, 27, 3], &[128, 256, 512, 1024]);
        check_groups(&names, "cascade_mask_rcnn_convnext_base_3x");
        check_groups(&names, "upernet_convnext_base_512_160k");
        // With 12 layers the last stages.2 block is layer 11 and the stem layer 0: at decay 0.8
        // they get 0.8^2 and 0.8^13 of the base lr (6 layers gave them 0.8^-4 and 0.8^7).
        let cfg = presets::find("cascade_mask_rcnn_convnext_base_3x")
            .unwrap()
            .config()
            .optimizer;
        let g = build_groups(&names, &cfg, 1.0);
        let scale_of = |p: &str| {
            g.iter()
                .find(|g| g.params.iter().any(|x| x == p))
                .unwrap()
                .lr_scale
        };
        assert!((scale_of("backbone.stages.2.26.pwconv1.weight") - 0.8f64.powi(2)).abs() < 1e-15);
        assert!(
            (scale_of("backbone.downsample_layers.0.0.weight") - 0.8f64.powi(13)).abs() < 1e-15
        );
        let cfg = presets::find("mask_rcnn_convnext_tiny_3x")
            .unwrap()
            .config()
            .optimizer;
        let g = build_groups(
            &convnext_names(&[3, 3, 9, 3], &[96, 192, 384, 768]),
            &cfg,
            1e-4,
        );
        // Layer ids 0..7 each with decay and no_decay = 16 groups.
        assert_eq!(g.len(), 16);
        let seg = presets::find("upernet_convnext_tiny_512_160k")
            .unwrap()
            .config()
            .optimizer;
        let g = build_groups(
            &convnext_names(&[3, 3, 9, 3], &[96, 192, 384, 768]),
            &seg,
            1e-4,
        );
        // Stage-wise: ids 0 (downsample), 1..4 (stages), 7 (rest).
        let ids: std::collections::BTreeSet<i64> = g.iter().map(|g| g.layer_id).collect();
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 7]);
    }

    /// Every trainable parameter of the real convnext_tiny Mask R-CNN and UperNet against the
    /// recipe's mapping.
    #[test]
    fn groups_of_real_convnext_tiny_detector_and_segmentor() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let d = cnx_heads::DetectorConfig::mask_rcnn_convnext("tiny").unwrap();
        let _det = cnx_heads::Detector::new(&vs.root(), &d);
        let names: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.size()))
            .collect();
        assert!(names.len() > 200, "{}", names.len());
        assert!(names.iter().any(|(n, _)| n == "backbone.stages.2.8.gamma"));
        assert!(names
            .iter()
            .any(|(n, _)| n.starts_with("roi_head.mask_head")));
        check_groups(&names, "mask_rcnn_convnext_tiny_3x");
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let s = cnx_heads::segmentor::SegmentorConfig::upernet_convnext("tiny").unwrap();
        let _seg = cnx_heads::segmentor::Segmentor::new_uninit(&vs.root(), &s).unwrap();
        let names: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, t.size()))
            .collect();
        assert!(names
            .iter()
            .any(|(n, _)| n.starts_with("decode_head.fpn_bottleneck")));
        assert!(names.iter().any(|(n, _)| n.starts_with("auxiliary_head.")));
        check_groups(&names, "upernet_convnext_tiny_512_160k");
    }

    /// Our AdamW against torch.optim.AdamW (fixture from tools/reference/gen_adamw.py): three
    /// steps on fixed parameters/gradients with two groups, compared to 1e-7 relative.
    #[test]
    fn adamw_matches_pytorch() {
        adamw_matches_pytorch_with(false);
        adamw_matches_pytorch_with(true);
    }

    fn adamw_matches_pytorch_with(fused: bool) {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/adamw/adamw.safetensors"
        );
        let t: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir).unwrap().into_iter().collect();
        let cfg = OptimizerConfig {
            lr: 1e-3,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.05,
            decay_type: DecayType::None,
            decay_rate: 1.0,
            num_layers: 6,
            base_batch_size: 16,
            scale_lr: false,
            no_decay_keys: vec![],
            no_decay_1d_and_bias: true,
        };
        let w = t["w0"].copy().set_requires_grad(true);
        let b = t["b0"].copy().set_requires_grad(true);
        let params: BTreeMap<String, Tensor> = [
            ("head.weight".to_string(), w.shallow_clone()),
            ("head.bias".to_string(), b.shallow_clone()),
        ]
        .into_iter()
        .collect();
        let shapes: Vec<(String, Vec<i64>)> =
            params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        let groups = build_groups(&shapes, &cfg, 1e-3);
        let mut opt = AdamW::new(groups, params, &cfg).unwrap();
        // The fused kernel (CUDA's path) runs on the CPU too: both paths against PyTorch.
        opt.fused = fused;
        for step in 0..3 {
            opt.zero_grad();
            let loss = (&w * &t[&format!("gw{step}")]).sum(Kind::Float)
                + (&b * &t[&format!("gb{step}")]).sum(Kind::Float);
            loss.backward();
            for g in opt.groups.iter_mut() {
                g.lr = 1e-3 * (step + 1) as f64;
            }
            opt.step().unwrap();
            let ew = &t[&format!("w{}", step + 1)];
            let eb = &t[&format!("b{}", step + 1)];
            let dw = (&w - ew).abs().max().double_value(&[]);
            let db = (&b - eb).abs().max().double_value(&[]);
            assert!(
                dw < 1e-7 && db < 1e-7,
                "fused {fused}, step {step}: {dw} {db}"
            );
        }
    }
}
