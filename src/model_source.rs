//! Which model `cnx test` and `cnx predict` run, and with which weights: a paper preset (the
//! published mmdet / mmseg files), a training config (`--config FILE`), a work dir (its
//! `config.toml` and latest checkpoint), or nothing but a cnx checkpoint, whose safetensors
//! header carries the config and class names it was trained with ([`ModelCard`]). One resolver,
//! so a model trained on your own dataset is evaluated and used exactly as it was trained.

use crate::engine::checkpoint::{self, ModelCard};
use crate::engine::config::{Arch, Config, ModelConfig};
use crate::engine::{presets, tasks};
use anyhow::{bail, Context, Result};
use cnx_datasets::pipeline::TestPipeline;
use cnx_heads::segmentor::SegmentorConfig;
use cnx_heads::TwoStageDetector;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Device;

/// The model of a test / predict run.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub weights: PathBuf,
    /// The training configuration: from `--config`, the work dir or the weights' card, or the
    /// preset's (the one registry of `cnx train`).
    pub config: Config,
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
            (Some(f), _, _) => Config::load(f)?,
            (None, _, Some(p)) => presets::find(p)?.config(),
            (None, Some(d), None) => Config::load(&d.join("config.toml"))
                .with_context(|| format!("{}: the run's config", d.display()))?,
            (None, None, None) => match card.as_ref().and_then(|c| c.config.as_deref()) {
                Some(toml) => Config::from_toml(toml).with_context(|| {
                    format!("{}: the config recorded in the weights", weights.display())
                })?,
                None => bail!(
                    "{} records no model configuration (not a cnx checkpoint): give --preset, \
                     --config FILE or --work-dir DIR",
                    weights.display()
                ),
            },
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
        &self.config.name
    }

    pub fn is_segmentor(&self) -> bool {
        self.config.model.arch() == Arch::Upernet
    }

    /// The segmentor's configuration.
    pub fn segmentor_config(&self) -> Result<SegmentorConfig> {
        match &self.config.model {
            ModelConfig::Upernet(s) => Ok(s.clone()),
            _ => bail!("{} is not a segmentor", self.name()),
        }
    }

    /// The detection test pipeline: the config's `data.img_scale` (keep-ratio resize, pad to
    /// 32; the paper's 1333x800 for the presets).
    pub fn test_pipeline(&self) -> TestPipeline {
        let s = self.config.data.img_scale;
        TestPipeline {
            scale: (s[1] as usize, s[0] as usize),
            size_divisor: 32,
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
        let det = tasks::build_detector(&vs.root(), &self.config)?;
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

/// The detector a preset names (Mask R-CNN or Cascade Mask R-CNN) with fresh weights (what
/// compare loads files into).
pub fn preset_detector(root: &tch::nn::Path, preset: &str) -> Result<TwoStageDetector> {
    tasks::build_detector(root, &presets::find(preset)?.config())
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

    /// Every preset builds the same network whether a command takes it by name (`test`,
    /// `predict`, `flops`, `compare`: the registry) or from the configuration `cnx train` wrote
    /// into its checkpoint's card (TOML written and read back): equal variable names and shapes,
    /// so a model trained by cnx loads where the preset's does. The presets of one
    /// architecture (three tests, so they build in parallel).
    fn check_presets(arch: Arch) -> usize {
        let mut checked = 0;
        for p in presets::all() {
            if p.name.starts_with("demo_") || p.config().model.arch() != arch {
                continue;
            }
            let cfg = p.config();
            let card = Config::from_toml(&cfg.to_toml().unwrap()).unwrap();
            let by_name = VarStore::new(Device::Cpu);
            let by_card = VarStore::new(Device::Cpu);
            if arch == Arch::Upernet {
                let src = ModelSource {
                    weights: PathBuf::new(),
                    config: presets::find(p.name).unwrap().config(),
                    preset: Some(p.name.to_string()),
                    classes: vec![],
                    category_ids: vec![],
                };
                let a = src.segmentor_config().unwrap();
                let ModelConfig::Upernet(b) = &card.model else {
                    panic!("{}: not UperNet after the round trip", p.name)
                };
                drop(cnx_heads::segmentor::Segmentor::new_uninit(&by_name.root(), &a).unwrap());
                drop(cnx_heads::segmentor::Segmentor::new_uninit(&by_card.root(), b).unwrap());
            } else {
                let a = preset_detector(&by_name.root(), p.name).unwrap();
                let b = tasks::build_detector(&by_card.root(), &card).unwrap();
                assert_eq!(a.num_classes(), b.num_classes(), "{}", p.name);
            }
            let (x, y) = (names_and_shapes(&by_name), names_and_shapes(&by_card));
            assert!(x.len() > 100, "{}", p.name);
            assert!(
                x == y,
                "{}: the preset and its recorded config build different models",
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
