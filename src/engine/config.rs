//! The training configuration: one TOML document with `model`, `data`, `optimizer`, `schedule`
//! and `runtime` tables. Presets (`engine::presets`) produce it; `cnx config show` prints it;
//! `cnx train --config FILE` reads an edited copy and `--set a.b=value` overrides single fields.
//!
//! Every struct denies unknown fields so a typo in an edited file is an error, not a silently
//! ignored setting.

use anyhow::{anyhow, bail, Context, Result};
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

/// The network: backbone plus neck/heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub backbone: BackboneConfig,
    /// Foreground classes (80 for COCO, 150 for ADE20K).
    pub num_classes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub det: Option<DetHeadConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seg: Option<SegHeadConfig>,
}

/// The backbone: a dense ConvNeXt (a LayerNorm after every output stage) from depths/dims, or a
/// comparison backbone built by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// `convnext_{tiny,small,base,large,xlarge}` or another `convnext*` name (depths/dims then
    /// rule); or `swin_{tiny,small,base,large}`, `resnet50`, `resnet101`,
    /// `resnext101_{32x4d,64x4d}`, built with their family's detection defaults (depths, dims
    /// and layer_scale_init unused).
    pub variant: String,
    pub depths: Vec<i64>,
    pub dims: Vec<i64>,
    pub drop_path_rate: f64,
    pub layer_scale_init: f64,
    pub out_indices: Vec<i64>,
    /// ImageNet checkpoint (official `.pth`, timm or safetensors) that initialises the backbone;
    /// empty = random init. `cnx train --pretrained FILE` sets it.
    #[serde(default)]
    pub pretrained: String,
}

/// FPN + RPN + RoI heads (mmdet 2.x defaults of the paper's configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetHeadConfig {
    pub fpn_channels: i64,
    pub rpn_train_nms_pre: i64,
    pub rpn_train_max_per_img: i64,
    pub rpn_test_nms_pre: i64,
    pub rpn_test_max_per_img: i64,
    pub rpn_nms_iou: f64,
    pub rcnn_train_num_rois: i64,
    pub rcnn_pos_fraction: f64,
    pub roi_fc_channels: i64,
    pub mask_convs: i64,
    pub test_score_thr: f64,
    pub test_nms_iou: f64,
    pub test_max_per_img: i64,
    pub mask_thr: f64,
}

/// UperNet decode head + FCN auxiliary head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegHeadConfig {
    pub channels: i64,
    pub pool_scales: Vec<i64>,
    pub aux_channels: i64,
    pub aux_loss_weight: f64,
    pub dropout: f64,
    /// "slide" (crop/stride below) or "whole".
    pub test_mode: String,
    pub test_crop: i64,
    pub test_stride: i64,
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
    /// Decoding/augmentation worker threads.
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
    /// libtorch intra-op threads (0 = leave libtorch's default).
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
        let b = &self.model.backbone;
        if !b.variant.starts_with("convnext") {
            // Swin / ResNet / ResNeXt are built by name (checked here); depths and dims unused.
            super::tasks::named_backbone(self)?;
        } else if b.depths.len() != 4 || b.dims.len() != 4 {
            bail!(
                "model.backbone: depths and dims need 4 entries (got {} and {})",
                b.depths.len(),
                b.dims.len()
            );
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
        match (self.task, self.model.arch) {
            (Task::Det, Arch::Upernet) | (Task::Seg, Arch::MaskRcnn | Arch::CascadeMaskRcnn) => {
                bail!(
                    "task {:?} does not match model.arch {:?}",
                    self.task,
                    self.model.arch
                )
            }
            _ => {}
        }
        if self.task == Task::Det && self.model.det.is_none() {
            bail!("model.det table missing for a detection config");
        }
        if self.task == Task::Seg && self.model.seg.is_none() {
            bail!("model.seg table missing for a segmentation config");
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
                "schedule.step_epochs=[8, 11]".into(),
                "data.root=/tmp/x".into(),
            ])
            .unwrap();
        assert_eq!(c2.optimizer.lr, 2e-4);
        assert_eq!(c2.data.batch_size, 4);
        assert_eq!(c2.runtime.device, "cpu");
        assert_eq!(c2.model.backbone.drop_path_rate, 0.0);
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
