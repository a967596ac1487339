//! Mixed precision with PyTorch's semantics: autocast regions (fp16 or bf16) through libtorch's
//! non-deprecated per-device entry points, and fp16 dynamic loss scaling that follows
//! `torch.amp.GradScaler` step for step.
//!
//! Loss scaling (fp16 on CUDA only; bf16 and fp32 need none):
//! - init scale 2^16; after `growth_interval` (2000) consecutive steps with finite gradients the
//!   scale doubles (unless that would overflow fp32) and the count restarts; a step whose
//!   unscaled gradients hold an inf/nan is skipped, the scale halves and the count restarts
//!   (`_amp_update_scale_`, checked against a fixture from `tools/reference/gen_grad_scaler.py`).
//! - A non-finite *loss* skips the step the same way (PyTorch would backward it into non-finite
//!   gradients and skip; here the backward is not even run) and is counted. Only when the loss
//!   stays non-finite for [`MAX_NONFINITE_LOSS_STREAK`] consecutive iterations does the run stop,
//!   naming the last good checkpoint. Without the scaler (fp32, bf16) a non-finite loss stops the
//!   run at once, before the bad step reaches the weights.
//!
//! tch's own `tch::autocast` calls `at::autocast::is_enabled()` / `set_enabled()`, inline
//! wrappers that libtorch 2.4+ marks deprecated and that `TORCH_WARN_DEPRECATION` on every call;
//! [`autocast`] here goes through `cnx_backbone::autocast` instead (see there).

use super::config::Amp;
use super::optim::AdamW;
use cnx_backbone::autocast::{self as ac, DeviceType};
use tch::{Device, Kind};

/// Consecutive iterations with a non-finite loss under fp16 loss scaling after which training
/// stops. By then the scale has backed off 50 times (2^16 → 2^-34, far below where fp16
/// gradients underflow), so the scale is not the cause: the weights or the data are.
pub const MAX_NONFINITE_LOSS_STREAK: u64 = 50;

/// Run `f` under autocast in `amp`'s precision on `device`'s device type (CUDA; CPU autocast
/// for bf16 inference), or plainly for `Amp::None`. Sets the autocast dtype of that device type
/// first (the thread's setting; fp16 is CUDA's default, bf16 the CPU's).
pub fn autocast<T>(device: Device, amp: Amp, f: impl FnOnce() -> T) -> T {
    let kind = match amp {
        Amp::None => return f(),
        Amp::Fp16 => Kind::Half,
        Amp::Bf16 => Kind::BFloat16,
    };
    let dt = match device {
        Device::Cuda(_) => DeviceType::Cuda,
        Device::Cpu => DeviceType::Cpu,
        _ => return f(),
    };
    ac::set_dtype(dt, kind);
    ac::with_autocast(dt, true, f)
}

/// Dynamic loss scaling for fp16 (identity when disabled: bf16 / fp32).
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub enabled: bool,
    /// Current scale (kept with fp32's rounding, as PyTorch's scale tensor).
    pub scale: f64,
    /// Consecutive steps with finite gradients since the last growth or backoff.
    pub growth_tracker: u64,
    pub growth_interval: u64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Consecutive iterations whose loss was non-finite (reset by a finite loss).
    pub nonfinite_loss_streak: u64,
    /// Steps skipped so far in this process (non-finite gradients or loss).
    pub skipped_steps: u64,
    /// Iterations with a non-finite loss so far in this process.
    pub nonfinite_losses: u64,
}

impl LossScaler {
    /// PyTorch GradScaler's defaults: init 2^16, growth x2 every 2000 finite steps, backoff x0.5.
    pub fn new(enabled: bool) -> Self {
        Self::with(enabled, 65536.0, 2.0, 0.5, 2000)
    }

    pub fn with(
        enabled: bool,
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u64,
    ) -> Self {
        Self {
            enabled,
            scale: if enabled {
                init_scale as f32 as f64
            } else {
                1.0
            },
            growth_tracker: 0,
            growth_interval,
            growth_factor,
            backoff_factor,
            nonfinite_loss_streak: 0,
            skipped_steps: 0,
            nonfinite_losses: 0,
        }
    }

    /// `torch._amp_update_scale_` after a step whose unscaled gradients had a non-finite value
    /// (`found_inf`) or not. Returns whether the optimizer step is taken (always when disabled).
    pub fn update(&mut self, found_inf: bool) -> bool {
        if !self.enabled {
            return true;
        }
        if found_inf {
            // float scale * double factor, stored back as float (the kernel's arithmetic).
            self.scale = (self.scale * self.backoff_factor) as f32 as f64;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
            false
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.growth_interval {
                let grown = (self.scale * self.growth_factor) as f32;
                if grown.is_finite() {
                    self.scale = grown as f64;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
            true
        }
    }

    /// An iteration's loss was non-finite under the scaler: skip its step and back off as
    /// PyTorch would (the non-finite loss makes non-finite gradients there). Returns how many
    /// iterations in a row have had a non-finite loss.
    pub fn nonfinite_loss(&mut self) -> u64 {
        self.nonfinite_losses += 1;
        self.nonfinite_loss_streak += 1;
        self.update(true);
        self.nonfinite_loss_streak
    }

    /// An iteration's loss was finite.
    pub fn finite_loss(&mut self) {
        self.nonfinite_loss_streak = 0;
    }
}

/// What [`finish_step`] did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The optimizer step was taken.
    pub stepped: bool,
    /// Global norm of the (unscaled) gradients; NaN when neither the scaler nor clipping needed
    /// it.
    pub grad_norm: f64,
}

/// After an iteration's backward passes: unscale the gradients (scaler on), take their global
/// norm, which is at the same time the finite check (inf/nan exactly when a gradient element
/// is), in one host read, update the scale, and when the step is taken clip to `clip_grad_norm`
/// (0 = off) and step the optimizer. The order of `scaler.unscale_(opt);
/// clip_grad_norm_(...); scaler.step(opt); scaler.update()` in PyTorch.
pub fn finish_step(
    opt: &mut AdamW,
    scaler: &mut LossScaler,
    clip_grad_norm: f64,
) -> anyhow::Result<StepOutcome> {
    if scaler.enabled {
        opt.scale_grads(1.0 / scaler.scale);
    }
    let grad_norm = if scaler.enabled || clip_grad_norm > 0.0 {
        opt.grad_norm()
    } else {
        f64::NAN
    };
    let found_inf = scaler.enabled && !grad_norm.is_finite();
    let stepped = scaler.update(found_inf);
    if stepped {
        if clip_grad_norm > 0.0 {
            let coef = clip_grad_norm / (grad_norm + 1e-6);
            if coef < 1.0 {
                opt.scale_grads(coef);
            }
        }
        opt.step()?;
    }
    Ok(StepOutcome { stepped, grad_norm })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{DecayType, OptimizerConfig};
    use crate::engine::optim::build_groups;
    use std::collections::BTreeMap;
    use tch::Tensor;

    /// A preset's optimizer settings without layer decay (every parameter in one lr group).
    fn opt_cfg() -> OptimizerConfig {
        let mut c = crate::engine::presets::find("mask_rcnn_convnext_tiny_3x")
            .unwrap()
            .config()
            .optimizer;
        c.decay_type = DecayType::None;
        c.decay_rate = 1.0;
        c.lr = 1e-3;
        c
    }

    /// The fixture's parameters (w 4x3, b 3) in an AdamW, like the trainer's.
    fn setup() -> (AdamW, Tensor, Tensor) {
        let w = Tensor::ones([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let params: BTreeMap<String, Tensor> = [
            ("head.weight".to_string(), w.shallow_clone()),
            ("head.bias".to_string(), b.shallow_clone()),
        ]
        .into_iter()
        .collect();
        let shapes: Vec<(String, Vec<i64>)> =
            params.iter().map(|(n, p)| (n.clone(), p.size())).collect();
        let cfg = opt_cfg();
        let groups = build_groups(&shapes, &cfg, 1e-3);
        (AdamW::new(groups, params, &cfg).unwrap(), w, b)
    }

    fn f32s(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    /// torch.amp.GradScaler against ours over the fixture's sequences: the same gradients
    /// (with the same inf / -inf / nan injected, or a non-finite loss) go through the trainer's
    /// path — backward of the scaled loss in fp32, `finish_step` (unscale, one-read norm/finite
    /// check, update, AdamW step) or, for a non-finite loss, `nonfinite_loss` — and the scale
    /// used, the scale and growth tracker after each step, and which steps were skipped (weights
    /// unchanged) must equal PyTorch's exactly. Finite steps also unscale to the exact gradients.
    #[test]
    fn grad_scaler_matches_pytorch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/grad_scaler/grad_scaler.json"
        );
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let seqs = j["sequences"].as_array().unwrap();
        assert!(seqs.len() >= 4);
        let mut checked = 0;
        for seq in seqs {
            let name = seq["name"].as_str().unwrap();
            let mut s = LossScaler::with(
                true,
                seq["init_scale"].as_f64().unwrap(),
                seq["growth_factor"].as_f64().unwrap(),
                seq["backoff_factor"].as_f64().unwrap(),
                seq["growth_interval"].as_u64().unwrap(),
            );
            let (mut opt, w, b) = setup();
            for (i, st) in seq["steps"].as_array().unwrap().iter().enumerate() {
                let kind = st["kind"].as_str().unwrap();
                assert_eq!(
                    s.scale,
                    st["scale_used"].as_f64().unwrap(),
                    "{name} step {i}"
                );
                let mut gw = f32s(&st["gw"]);
                let mut gb = f32s(&st["gb"]);
                match kind {
                    "inf" => gw[5] = f32::INFINITY, // gw[1, 2]
                    "-inf" => gb[0] = f32::NEG_INFINITY,
                    "nan" => gw[9] = f32::NAN, // gw[3, 0]
                    _ => {}
                }
                let gw_t = Tensor::from_slice(&gw).view([4, 3]);
                let gb_t = Tensor::from_slice(&gb);
                let before = (w.copy(), b.copy());
                opt.zero_grad();
                let loss = (&w * &gw_t).sum(Kind::Float) + (&b * &gb_t).sum(Kind::Float);
                let loss_finite = !matches!(kind, "nan_loss" | "inf_loss");
                let stepped = if loss_finite {
                    s.finite_loss();
                    (loss * s.scale).backward();
                    let o = finish_step(&mut opt, &mut s, 0.0).unwrap();
                    if kind == "finite" {
                        // Unscaled gradients are the exact ones (scale is a power of two).
                        assert!(o.grad_norm.is_finite());
                        assert!(w.grad().equal(&gw_t) || !o.stepped, "{name} step {i}");
                    } else {
                        assert!(!o.grad_norm.is_finite(), "{name} step {i}");
                    }
                    o.stepped
                } else {
                    s.nonfinite_loss();
                    false
                };
                let skipped = before.0.equal(&w) && before.1.equal(&b);
                assert_eq!(skipped, !stepped, "{name} step {i}");
                assert_eq!(
                    skipped,
                    st["skipped"].as_bool().unwrap(),
                    "{name} step {i} ({kind}): skipped"
                );
                assert_eq!(
                    s.scale,
                    st["scale_after"].as_f64().unwrap(),
                    "{name} step {i} ({kind}): scale"
                );
                assert_eq!(
                    s.growth_tracker,
                    st["growth_tracker_after"].as_u64().unwrap(),
                    "{name} step {i} ({kind}): growth tracker"
                );
                checked += 1;
            }
        }
        assert!(checked > 60, "{checked}");
    }

    /// No code calls tch's autocast, whose deprecated libtorch entry points print a warning per
    /// call on CUDA builds (verified on torch 2.11): everything goes through [`autocast`].
    #[test]
    fn no_deprecated_autocast_calls() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stack: Vec<std::path::PathBuf> = [
            "src",
            "backbone/src",
            "heads/src",
            "datasets/src",
            "eval/src",
        ]
        .iter()
        .map(|d| root.join(d))
        .collect();
        let mut seen = 0;
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else if p.extension().is_some_and(|e| e == "rs") {
                seen += 1;
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    assert!(
                        !code.contains(concat!("tch::", "autocast(")),
                        "{}:{}: use engine::amp::autocast",
                        p.display(),
                        i + 1
                    );
                }
            }
        }
        assert!(seen > 20);
    }

    /// The defaults: 2^16, doubling after exactly 2000 finite steps, halving on overflow with
    /// the count restarting; disabled = always step, scale 1.
    #[test]
    fn default_interval_is_2000() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        for _ in 0..1999 {
            assert!(s.update(false));
        }
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 1999));
        assert!(s.update(false));
        assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
        for _ in 0..1500 {
            s.update(false);
        }
        assert!(!s.update(true));
        assert_eq!(
            (s.scale, s.growth_tracker, s.skipped_steps),
            (65536.0, 0, 1)
        );
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!(s.scale, 131072.0);
        let mut off = LossScaler::new(false);
        assert!(off.update(true));
        assert_eq!(off.scale, 1.0);
        // Streak bookkeeping of non-finite losses.
        let mut s = LossScaler::new(true);
        assert_eq!(s.nonfinite_loss(), 1);
        assert_eq!(s.nonfinite_loss(), 2);
        assert_eq!((s.scale, s.nonfinite_losses), (16384.0, 2));
        s.finite_loss();
        assert_eq!(s.nonfinite_loss(), 1);
    }

    /// One host read per iteration: the norm over every gradient equals the exact global norm,
    /// and an inf or nan anywhere makes it non-finite.
    #[test]
    fn fused_grad_norm_and_finite_check() {
        let (mut opt, w, b) = setup();
        opt.zero_grad();
        let gw = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([4, 3]);
        let gb = Tensor::from_slice(&[3f32, -4., 0.5]);
        ((&w * &gw).sum(Kind::Float) + (&b * &gb).sum(Kind::Float)).backward();
        let want = ((0..12).map(|i| (i * i) as f64).sum::<f64>() + 9.0 + 16.0 + 0.25).sqrt();
        assert!((opt.grad_norm() - want).abs() < 1e-9);
        // Clipping with the same norm scales every gradient by clip / norm.
        let mut s = LossScaler::new(false);
        let o = finish_step(&mut opt, &mut s, 1.0).unwrap();
        assert!(o.stepped && (o.grad_norm - want).abs() < 1e-9);
        let clipped = opt.grad_norm();
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
        for bad in [f32::INFINITY, f32::NAN] {
            opt.zero_grad();
            let gb = Tensor::from_slice(&[3f32, bad, 0.5]);
            ((&w * &gw).sum(Kind::Float) + (&b * &gb).sum(Kind::Float)).backward();
            assert!(!opt.grad_norm().is_finite() && !opt.grads_finite());
        }
    }
}
