//! The training configuration: one TOML document with `model`, `data`, `optimizer`, `schedule`
//! and `runtime` tables. Presets (`engine::presets`) produce it; `cnx config show` prints it;
//! `cnx train --config FILE` reads an edited copy and `--set a.b=value` overrides single fields.
//!
//! Every struct denies unknown fields so a typo in an edited file is an error, not a silently
//! ignored setting.

use anyhow::{anyhow, bail, Context, Result};
pub use cnx_heads::cascade::CascadeConfig;
pub use cnx_heads::segmentor::SegmentorConfig;
pub use cnx_heads::DetectorConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the job trains: instance detection/segmentation on COCO or semantic segmentation on ADE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Det,
    Seg,
}

/// Whole configuration of one training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Preset (or user) name; the default work dir is `work_dirs/<name>`.
    pub name: String,
    pub task: Task,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub runtime: RuntimeConfig,
}

/// Model architectures the engine can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    MaskRcnn,
    CascadeMaskRcnn,
    Upernet,
}

/// The network: the heads crate's own configuration of the architecture `arch` names, read
/// straight from the `[model]` table (`arch = "mask_rcnn" | "cascade_mask_rcnn" | "upernet"`,
/// then that type's fields: mmdet / mmseg's model dicts, field for field). What `cnx train`
/// builds, what checkpoints record and what `test` / `predict` rebuild: no other description
/// of a model exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum ModelConfig {
    MaskRcnn(DetectorConfig),
    CascadeMaskRcnn(CascadeConfig),
    Upernet(SegmentorConfig),
}

impl ModelConfig {
    pub fn arch(&self) -> Arch {
        match self {
            ModelConfig::MaskRcnn(_) => Arch::MaskRcnn,
            ModelConfig::CascadeMaskRcnn(_) => Arch::CascadeMaskRcnn,
            ModelConfig::Upernet(_) => Arch::Upernet,
        }
    }

    /// The two-stage detector part (Cascade's shared base), `None` for a segmentor.
    pub fn detector(&self) -> Option<&DetectorConfig> {
        match self {
            ModelConfig::MaskRcnn(d) => Some(d),
            ModelConfig::CascadeMaskRcnn(c) => Some(&c.base),
            ModelConfig::Upernet(_) => None,
        }
    }

    fn detector_mut(&mut self) -> Option<&mut DetectorConfig> {
        match self {
            ModelConfig::MaskRcnn(d) => Some(d),
            ModelConfig::CascadeMaskRcnn(c) => Some(&mut c.base),
            ModelConfig::Upernet(_) => None,
        }
    }

    /// Foreground classes (80 for COCO, 150 for ADE20K).
    pub fn num_classes(&self) -> i64 {
        match self {
            ModelConfig::Upernet(s) => s.num_classes,
            m => m.detector().expect("a detector").roi.num_classes,
        }
    }

    pub fn set_num_classes(&mut self, n: i64) {
        match self {
            ModelConfig::Upernet(s) => s.num_classes = n,
            m => m.detector_mut().expect("a detector").roi.num_classes = n,
        }
    }

    /// The model's name (the config's name, as mmdet configs carry it).
    pub fn set_name(&mut self, name: &str) {
        match self {
            ModelConfig::Upernet(s) => s.name = name.to_string(),
            m => m.detector_mut().expect("a detector").name = name.to_string(),
        }
    }

    /// The backbone's dense config (ConvNeXt from depths/dims, or a comparison backbone by
    /// name): what checkpoint key mapping and the optimizer's layer ids go by.
    pub fn backbone(&self) -> Result<cnx_backbone::config::BackboneConfig> {
        match self {
            ModelConfig::Upernet(s) => {
                Ok(match s.backbone.named().map_err(|e| anyhow!("{e}"))? {
                    Some(b) => b,
                    None => {
                        cnx_backbone::config::BackboneConfig::ConvNeXt(s.backbone.to_convnext())
                    }
                })
            }
            m => m
                .detector()
                .expect("a detector")
                .backbone
                .dense()
                .map_err(|e| anyhow!("{e}")),
        }
    }

    /// The comparison backbone's name (Swin, ResNet, ResNeXt), `None` for ConvNeXt.
    pub fn backbone_name(&self) -> Option<&str> {
        match self {
            ModelConfig::Upernet(s) => s.backbone.name.as_deref(),
            m => m.detector().expect("a detector").backbone.name.as_deref(),
        }
    }

    /// ConvNeXt depths and widths (empty for a named backbone).
    pub fn depths_dims(&self) -> (&[i64], &[i64]) {
        match self {
            ModelConfig::Upernet(s) => (&s.backbone.depths, &s.backbone.dims),
            m => {
                let b = &m.detector().expect("a detector").backbone;
                (&b.depths, &b.dims)
            }
        }
    }

    pub fn drop_path_rate(&self) -> f64 {
        match self {
            ModelConfig::Upernet(s) => s.backbone.drop_path_rate,
            m => m.detector().expect("a detector").backbone.drop_path_rate,
        }
    }

    /// Initialise the backbone from this ImageNet checkpoint (`cnx train --pretrained`).
    pub fn set_pretrained(&mut self, path: &str) {
        match self {
            ModelConfig::Upernet(s) => s.backbone.pretrained = path.to_string(),
            m => m.detector_mut().expect("a detector").backbone.pretrained = path.to_string(),
        }
    }

    /// The ImageNet checkpoint that initialises the backbone (empty: none).
    pub fn pretrained(&self) -> &str {
        match self {
            ModelConfig::Upernet(s) => &s.backbone.pretrained,
            m => &m.detector().expect("a detector").backbone.pretrained,
        }
    }
}

/// Dataset location, pipeline and batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// "coco" or "ade".
    pub format: String,
    /// Dataset root; the paths below are relative to it.
    pub root: PathBuf,
    /// COCO: annotation JSON; ADE: label directory.
    pub train_ann: String,
    pub train_images: String,
    pub val_ann: String,
    pub val_images: String,
    /// Train pipeline name: "detr" (the paper's COCO multi-scale + crop policy), "ade" (resize
    /// ratio 0.5-2, crop, flip, photometric), or the demos' "simple" (fixed scale + flip).
    pub pipeline: String,
    /// Keep-ratio scale as (long, short): (1333, 800) COCO, (2048, 512) ADE.
    pub img_scale: [u32; 2],
    /// Segmentation crop (h, w); unused for detection.
    pub crop_size: [u32; 2],
    /// Images per iteration (the recipe's per-GPU 2 x 8 GPUs = 16).
    pub batch_size: usize,
    /// Decoding/augmentation worker threads (0 = by the rule of `engine::threads`: a quarter
    /// of the process's cores on CPU, all but one (at most 8) on CUDA).
    pub workers: usize,
    /// Validation images used by periodic evaluation (0 = all).
    pub val_max_images: usize,
    /// Stop at the first training image that cannot be read (naming it) instead of replacing it
    /// by another image of its aspect group and going on.
    #[serde(default)]
    pub strict: bool,
}

/// How parameters are grouped for learning-rate decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayType {
    LayerWise,
    StageWise,
    /// One lr for everything (no decay).
    None,
}

/// AdamW with mmcv's LearningRateDecayOptimizerConstructor parameter groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Learning rate at the recipe's batch size (`base_batch_size`).
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub decay_type: DecayType,
    pub decay_rate: f64,
    pub num_layers: i64,
    /// Batch the recipe's lr refers to (16); the lr is scaled by batch / base_batch_size.
    pub base_batch_size: usize,
    /// Apply the linear scaling rule above.
    pub scale_lr: bool,
    /// Parameter-name substrings that get no weight decay (the Swin configs' `custom_keys`
    /// with `decay_mult = 0`: absolute_pos_embed, relative_position_bias_table, norm).
    #[serde(default)]
    pub no_decay_keys: Vec<String>,
    /// 1-D parameters and biases get no weight decay (the ConvNeXt layer-decay constructor's
    /// rule). False for the Swin configs' `DefaultOptimizerConstructor`, which decays them and
    /// exempts only `no_decay_keys`.
    #[serde(default = "yes")]
    pub no_decay_1d_and_bias: bool,
}

fn yes() -> bool {
    true
}

/// Learning-rate policy after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Multiply by `gamma` at each epoch in `step_epochs` (mmcv StepLrUpdaterHook, by epoch).
    Step,
    /// (1 - iter/max_iters)^power to min_lr (mmcv PolyLrUpdaterHook, by iteration).
    Poly,
    /// No decay.
    Fixed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub policy: Policy,
    /// Linear warmup length in iterations (0 = none) and starting ratio.
    pub warmup_iters: u64,
    pub warmup_ratio: f64,
    pub step_epochs: Vec<u64>,
    pub gamma: f64,
    pub power: f64,
    pub min_lr: f64,
}

/// Mixed-precision mode on CUDA (CPU always runs fp32). The official L/XL configs train in
/// fp32 (`fp16` off), T/S/B in fp16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amp {
    /// Full precision; written `fp32` (`none` is read too).
    #[serde(rename = "fp32", alias = "none")]
    None,
    Fp16,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Length of training: epochs (detection) or iterations (segmentation); 0 = unused. When
    /// both are set, iterations win.
    pub max_epochs: u64,
    pub max_iters: u64,
    pub checkpoint_interval: u64,
    /// Evaluate every N iterations (0 = only at the end).
    pub eval_interval: u64,
    pub log_interval: u64,
    pub amp: Amp,
    /// Backward passes per optimizer step (effective batch = batch_size x grad_accum).
    pub grad_accum: u64,
    /// Clip the global gradient norm to this value (0 = off).
    pub clip_grad_norm: f64,
    pub seed: u64,
    /// "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    pub device: String,
    /// Where checkpoints, logs and plots go; empty = `work_dirs/<name>`.
    pub work_dir: String,
    /// libtorch intra-op threads (0 = by the rule of `engine::threads`: every core of the
    /// process on CPU, the cores the data workers leave on CUDA).
    pub threads: i32,
    /// Keep only the newest N periodic checkpoints (0 = keep all).
    pub keep_checkpoints: usize,
}

impl Config {
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn from_toml(s: &str) -> Result<Self> {
        Ok(toml::from_str(s)?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&s).with_context(|| format!("parsing config {}", path.display()))
    }

    /// Apply `key=value` overrides (dotted paths into the TOML document). The value is parsed as
    /// a TOML value (`0.5`, `true`, `[1, 2]`, `"text"`); a bare word that is not valid TOML is
    /// taken as a string. Unknown keys are errors, and the result must still type-check.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut doc: toml::Value = toml::Value::try_from(self)?;
        for s in sets {
            let (key, raw) = s
                .split_once('=')
                .ok_or_else(|| anyhow!("--set expects key=value, got {s:?}"))?;
            let key = key.trim();
            let value = parse_value(raw.trim());
            set_path(&mut doc, key, value)?;
        }
        let cfg: Config = doc.try_into().context("config after --set overrides")?;
        Ok(cfg)
    }

    /// Work directory (explicit or `work_dirs/<name>`).
    pub fn work_dir(&self) -> PathBuf {
        if self.runtime.work_dir.is_empty() {
            PathBuf::from("work_dirs").join(&self.name)
        } else {
            PathBuf::from(&self.runtime.work_dir)
        }
    }

    /// Checks that do not need any file: consistent lengths and positive sizes.
    pub fn validate(&self) -> Result<()> {
        let (depths, dims) = self.model.depths_dims();
        if self.model.backbone_name().is_none() && (depths.len() != 4 || dims.len() != 4) {
            bail!(
                "model backbone: depths and dims need 4 entries (got {} and {})",
                depths.len(),
                dims.len()
            );
        }
        // Swin / ResNet / ResNeXt are built by name: an unknown name is an error here.
        self.model.backbone()?;
        if let ModelConfig::Upernet(s) = &self.model {
            s.validate().map_err(|e| anyhow!("model: {e}"))?;
        }
        if self.data.batch_size == 0 {
            bail!("data.batch_size must be at least 1");
        }
        if self.runtime.grad_accum == 0 {
            bail!("runtime.grad_accum must be at least 1");
        }
        if self.runtime.max_iters == 0 && self.runtime.max_epochs == 0 {
            bail!("runtime: set max_iters or max_epochs");
        }
        match (self.task, self.model.arch()) {
            (Task::Det, Arch::Upernet) | (Task::Seg, Arch::MaskRcnn | Arch::CascadeMaskRcnn) => {
                bail!(
                    "task {:?} does not match model.arch {:?}",
                    self.task,
                    self.model.arch()
                )
            }
            _ => {}
        }
        if self.schedule.policy == Policy::Step
            && self.schedule.step_epochs.windows(2).any(|w| w[0] >= w[1])
        {
            bail!("schedule.step_epochs must increase");
        }
        Ok(())
    }
}

fn parse_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(doc: &mut toml::Value, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = doc;
    for (i, p) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {key}: {} is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            let old = table.get(*p);
            // Optional fields absent from the document are allowed only if they are tables of
            // the schema (model.det / model.seg): keep it simple and require existing keys,
            // except for the optional string/list fields that serde fills by default.
            if old.is_none() {
                let known: Vec<String> = table.keys().cloned().collect();
                bail!(
                    "--set {key}: unknown key {p:?} (known here: {})",
                    known.join(", ")
                );
            }
            // Integers given where floats live (`optimizer.lr=1`) are promoted.
            let value = match (old, value) {
                (Some(toml::Value::Float(_)), toml::Value::Integer(n)) => {
                    toml::Value::Float(n as f64)
                }
                (
                    Some(toml::Value::String(_)),
                    v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
                ) => toml::Value::String(v.to_string()),
                (_, v) => v,
            };
            table.insert(p.to_string(), value);
            return Ok(());
        }
        cur = table
            .get_mut(*p)
            .ok_or_else(|| anyhow!("--set {key}: unknown table {:?}", parts[..=i].join(".")))?;
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use crate::engine::presets;

    #[test]
    fn every_preset_roundtrips_through_toml() {
        for p in presets::all() {
            let c = p.config();
            c.validate().unwrap();
            let s = c.to_toml().unwrap();
            let back = super::Config::from_toml(&s).unwrap();
            assert_eq!(back, c, "{}", p.name);
        }
    }

    #[test]
    fn set_overrides_dotted_fields_and_rejects_unknown() {
        let c = presets::find("mask_rcnn_convnext_tiny_3x")
            .unwrap()
            .config();
        let c2 = c
            .with_overrides(&[
                "optimizer.lr=2e-4".into(),
                "data.batch_size=4".into(),
                "runtime.device=cpu".into(),
                "model.backbone.drop_path_rate=0".into(),
                "model.roi.num_classes=12".into(),
                "schedule.step_epochs=[8, 11]".into(),
                "data.root=/tmp/x".into(),
            ])
            .unwrap();
        assert_eq!(c2.optimizer.lr, 2e-4);
        assert_eq!(c2.data.batch_size, 4);
        assert_eq!(c2.runtime.device, "cpu");
        assert_eq!(c2.model.drop_path_rate(), 0.0);
        assert_eq!(c2.model.num_classes(), 12);
        assert_eq!(c2.schedule.step_epochs, vec![8, 11]);
        assert_eq!(c2.data.root, std::path::PathBuf::from("/tmp/x"));
        assert!(c.with_overrides(&["optimizer.lrr=1".into()]).is_err());
        assert!(c.with_overrides(&["data.batch_size=abc".into()]).is_err());
        assert!(c.with_overrides(&["nokey".into()]).is_err());
    }

    #[test]
    fn unknown_field_in_file_is_an_error() {
        let c = presets::find("upernet_convnext_tiny_512_160k")
            .unwrap()
            .config();
        let s = c
            .to_toml()
            .unwrap()
            .replace("[optimizer]\n", "[optimizer]\nlearning_rate = 1.0\n");
        assert!(super::Config::from_toml(&s).is_err());
    }
}
