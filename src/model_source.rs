//! Which model `cnx test` and `cnx predict` run, and with which weights: a paper preset (the
//! published mmdet / mmseg files), a training config (`--config FILE`), a work dir (its
//! `config.toml` and latest checkpoint), or nothing but a cnx checkpoint, whose safetensors
//! header carries the config and class names it was trained with ([`ModelCard`]). One resolver,
//! so a model trained on your own dataset is evaluated and used exactly as it was trained.

use crate::engine::checkpoint::{self, ModelCard};
use crate::engine::config::{Arch, Config};
use crate::engine::tasks;
use anyhow::{bail, Context, Result};
use cnx_datasets::pipeline::TestPipeline;
use cnx_heads::cascade::CascadeConfig;
use cnx_heads::segmentor::SegmentorConfig;
use cnx_heads::{DetectorConfig, TwoStageDetector};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Device;

/// The model of a test / predict run.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub weights: PathBuf,
    /// The training configuration (from `--config`, the work dir or the weights' card);
    /// `None` when the model is a preset.
    pub config: Option<Config>,
    pub preset: Option<String>,
    /// Class names in label order (empty: the preset's dataset, COCO or ADE20K).
    pub classes: Vec<String>,
    /// Dataset category id of each label (empty: COCO's).
    pub category_ids: Vec<i64>,
}

impl ModelSource {
    /// Resolve the flags of `test` / `predict`. Weights: `--weights`, else the work dir's latest
    /// checkpoint. Model: `--config`, else the work dir's `config.toml`, else the card in the
    /// weights, else `--preset` (which wins over a card when given).
    pub fn resolve(
        preset: Option<&str>,
        config: Option<&Path>,
        work_dir: Option<&Path>,
        weights: Option<&Path>,
    ) -> Result<Self> {
        let weights = match (weights, work_dir) {
            (Some(w), _) => w.to_path_buf(),
            (None, Some(d)) => match checkpoint::resolve("auto", d)? {
                Some((st, dir)) => dir.join(st.weights),
                None => bail!("{}: no checkpoint (latest.json) to test", d.display()),
            },
            (None, None) => bail!("give --weights FILE (or --work-dir DIR of a training run)"),
        };
        if !weights.exists() {
            bail!("{}: no such weights file", weights.display());
        }
        let card = ModelCard::read(&weights)?;
        let config = match (config, work_dir, preset) {
            (Some(f), _, _) => Some(Config::load(f)?),
            (None, Some(d), None) => Some(
                Config::load(&d.join("config.toml"))
                    .with_context(|| format!("{}: the run's config", d.display()))?,
            ),
            (None, None, None) => match card.as_ref().and_then(|c| c.config.as_deref()) {
                Some(toml) => Some(Config::from_toml(toml).with_context(|| {
                    format!("{}: the config recorded in the weights", weights.display())
                })?),
                None => bail!(
                    "{} records no model configuration (not a cnx checkpoint): give --preset, \
                     --config FILE or --work-dir DIR",
                    weights.display()
                ),
            },
            _ => None,
        };
        let card = card.unwrap_or_default();
        Ok(Self {
            weights,
            config,
            preset: preset.map(str::to_string),
            classes: card.classes,
            category_ids: card.category_ids,
        })
    }

    /// The model's name (the preset's, or the config's).
    pub fn name(&self) -> &str {
        match (&self.config, &self.preset) {
            (Some(c), _) => &c.name,
            (None, Some(p)) => p,
            (None, None) => "model",
        }
    }

    pub fn is_segmentor(&self) -> bool {
        match &self.config {
            Some(c) => c.model.arch == Arch::Upernet,
            None => self.name().starts_with("upernet_"),
        }
    }

    /// The segmentor's configuration.
    pub fn segmentor_config(&self) -> Result<SegmentorConfig> {
        Ok(match &self.config {
            Some(c) => tasks::segmentor_config(c)?,
            None => SegmentorConfig::preset(self.name())?,
        })
    }

    /// The detection test pipeline: the training config's `data.img_scale` (keep-ratio resize,
    /// pad to 32), the paper's 1333x800 for presets.
    pub fn test_pipeline(&self) -> TestPipeline {
        match &self.config {
            Some(c) => TestPipeline {
                scale: (c.data.img_scale[1] as usize, c.data.img_scale[0] as usize),
                size_divisor: 32,
            },
            None => TestPipeline::default(),
        }
    }

    /// Build the detector on `device` and load the weights (mmdet checkpoint layout, `.pth` or
    /// safetensors; Swin / ResNet backbone keys mapped).
    pub fn load_detector(
        &self,
        drop_class_layers: bool,
        device: Device,
    ) -> Result<(VarStore, TwoStageDetector)> {
        let mut vs = VarStore::new(device);
        let det = match &self.config {
            Some(c) => tasks::build_detector(&vs.root(), c)?,
            None => preset_detector(&vs.root(), self.name())?,
        };
        let backbone = det.config.backbone.dense()?;
        let report = cnx_heads::weights::load_checkpoint_for(
            &mut vs,
            &self.weights,
            drop_class_layers,
            &backbone,
        )
        .with_context(|| format!("loading {}", self.weights.display()))?;
        eprintln!("{}: {}", self.weights.display(), report.summary());
        Ok((vs, det))
    }
}

/// The detector a paper preset names (Mask R-CNN or Cascade Mask R-CNN), built from the heads
/// crate's preset configs with fresh weights (what test / predict / compare load files into).
pub fn preset_detector(root: &tch::nn::Path, preset: &str) -> Result<TwoStageDetector> {
    Ok(if preset.starts_with("cascade_") {
        TwoStageDetector::new(root, &CascadeConfig::preset(preset)?)
    } else {
        TwoStageDetector::new(root, &DetectorConfig::preset(preset)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::presets;

    fn names_and_shapes(vs: &VarStore) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        v.sort();
        v
    }

    /// Every paper preset builds the same network whether a command takes it by name (`test`,
    /// `predict`, `flops`, `compare`: the heads crate's preset configs) or from the training
    /// config `cnx train` writes into its checkpoints (the engine's translation): equal
    /// variable names and shapes, so a model trained by cnx loads where the preset's does.
    /// The presets of one architecture (three tests, so they build in parallel).
    fn check_presets(arch: Arch) -> usize {
        let mut checked = 0;
        for p in presets::all() {
            if p.name.starts_with("demo_") || p.config().model.arch != arch {
                continue;
            }
            let cfg = p.config();
            let by_name = VarStore::new(Device::Cpu);
            let by_config = VarStore::new(Device::Cpu);
            if cfg.model.arch == Arch::Upernet {
                let a = SegmentorConfig::preset(p.name).unwrap();
                let b = tasks::segmentor_config(&cfg).unwrap();
                drop(cnx_heads::segmentor::Segmentor::new_uninit(&by_name.root(), &a).unwrap());
                drop(cnx_heads::segmentor::Segmentor::new_uninit(&by_config.root(), &b).unwrap());
            } else {
                let a = preset_detector(&by_name.root(), p.name).unwrap();
                let b = tasks::build_detector(&by_config.root(), &cfg).unwrap();
                assert_eq!(a.num_classes(), b.num_classes(), "{}", p.name);
            }
            let (x, y) = (names_and_shapes(&by_name), names_and_shapes(&by_config));
            assert!(x.len() > 100, "{}", p.name);
            assert!(
                x == y,
                "{}: the preset and its config build different models",
                p.name
            );
            checked += 1;
        }
        checked
    }

    #[test]
    fn every_mask_rcnn_preset_builds_the_same_model_through_every_command() {
        assert_eq!(check_presets(Arch::MaskRcnn), 2);
    }

    #[test]
    fn every_cascade_preset_builds_the_same_model_through_every_command() {
        assert_eq!(check_presets(Arch::CascadeMaskRcnn), 14);
    }

    #[test]
    fn every_upernet_preset_builds_the_same_model_through_every_command() {
        assert_eq!(check_presets(Arch::Upernet), 11);
    }
}
