//! Loading weights into a detector VarStore: mmdetection Mask R-CNN checkpoints (`backbone.`,
//! `neck.`, `rpn_head.`, `roi_head.` under `state_dict`), or ImageNet ConvNeXt checkpoints
//! (official or timm names) into the backbone alone. A checkpoint trained for another number of
//! classes is refused with a message naming the option that drops the class-specific layers.

use crate::HeadsError;
use cnx_backbone::checkpoint::{load_into, read_state_dict, LoadOptions, LoadReport, StateDict};
use cnx_backbone::config::{convert_state_dict, BackboneConfig};
use std::path::Path;
use tch::nn::VarStore;

/// Name fragments of the layers whose shapes depend on the number of classes.
pub const CLASS_LAYERS: [&str; 3] = [".fc_cls.", ".fc_reg.", ".conv_logits."];

/// What kind of checkpoint a state dict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// A whole detector in mmdet's layout.
    Detector,
    /// An ImageNet classifier / bare backbone (official or timm ConvNeXt names).
    Backbone,
}

pub fn kind_of(sd: &StateDict) -> CheckpointKind {
    if sd
        .keys()
        .any(|k| k.starts_with("backbone.") || k.starts_with("roi_head.") || k.starts_with("neck."))
    {
        CheckpointKind::Detector
    } else {
        CheckpointKind::Backbone
    }
}

fn is_class_layer(k: &str) -> bool {
    CLASS_LAYERS.iter().any(|p| k.contains(p))
}

/// Load a checkpoint file into a detector VarStore (see [`load_state_dict`]).
pub fn load_checkpoint(
    vs: &mut VarStore,
    path: impl AsRef<Path>,
    drop_class_layers: bool,
) -> Result<LoadReport, HeadsError> {
    let sd = read_state_dict(path)?;
    load_state_dict(vs, &sd, drop_class_layers)
}

/// [`load_checkpoint`] for a model whose backbone is `backbone`: Swin and ResNet weights are
/// first mapped to the names this crate builds ([`convert_backbone_keys`]), whether the file is
/// a whole detector (`backbone.*` keys) or an ImageNet classifier. ConvNeXt files load as they are.
pub fn load_checkpoint_for(
    vs: &mut VarStore,
    path: impl AsRef<Path>,
    drop_class_layers: bool,
    backbone: &BackboneConfig,
) -> Result<LoadReport, HeadsError> {
    let sd = read_state_dict(path)?;
    load_state_dict(vs, &convert_backbone_keys(&sd, backbone), drop_class_layers)
}

/// Map a checkpoint's backbone tensors to the names [`cnx_backbone::config::build`] creates for
/// `backbone` ([`cnx_backbone::config::convert_state_dict`]: timm, official and mmdet Swin
/// layouts; torchvision ResNets). In a whole-model file (`backbone.*`, `neck.*`, ...) only the
/// `backbone.` part is mapped; a classifier file is mapped whole and stays unprefixed. ConvNeXt
/// state dicts are returned as they are.
pub fn convert_backbone_keys(sd: &StateDict, backbone: &BackboneConfig) -> StateDict {
    let whole = kind_of(sd) == CheckpointKind::Detector;
    let mut out = StateDict::new();
    if matches!(backbone, BackboneConfig::ConvNeXt(_)) {
        for (k, t) in sd.iter() {
            out.insert(k.clone(), t.shallow_clone());
        }
        return out;
    }
    let (bb, rest): (Vec<_>, Vec<_>) = sd
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .partition(|(k, _)| !whole || k.starts_with("backbone."));
    let prefix = if whole { "backbone." } else { "" };
    for (k, t) in convert_state_dict(backbone, bb) {
        out.insert(format!("{prefix}{k}"), t);
    }
    for (k, t) in rest {
        out.insert(k, t);
    }
    out
}
/// Detector checkpoints load strictly (with `drop_class_layers`, the class-specific layers are
/// left out and keep their initialisation); backbone checkpoints load into `backbone.` as
/// mmdet's `init_cfg=Pretrained` does.
pub fn load_state_dict(
    vs: &mut VarStore,
    sd: &StateDict,
    drop_class_layers: bool,
) -> Result<LoadReport, HeadsError> {
    match kind_of(sd) {
        CheckpointKind::Backbone => Ok(load_into(vs, sd, &LoadOptions::pretrained_backbone())?),
        CheckpointKind::Detector => {
            let vars = vs.variables();
            if !drop_class_layers {
                for (k, t) in sd.iter().filter(|(k, _)| {
                    k.ends_with("fc_cls.weight") || k.ends_with("conv_logits.weight")
                }) {
                    if let Some(v) = vars.get(k) {
                        if v.size()[0] != t.size()[0] {
                            let (ck, mk) = if k.ends_with("fc_cls.weight") {
                                (t.size()[0] - 1, v.size()[0] - 1)
                            } else {
                                (t.size()[0], v.size()[0])
                            };
                            return Err(HeadsError::ClassMismatch(format!(
                                "checkpoint was trained for {ck} classes but the model has {mk} ({k}: {:?} vs {:?}); \
                                 pass --drop-class-layers to load everything else and keep the class-specific layers \
                                 (fc_cls, fc_reg, conv_logits) freshly initialised",
                                t.size(),
                                v.size()
                            )));
                        }
                    }
                }
                return Ok(load_into(vs, sd, &LoadOptions::strict())?);
            }
            let mut kept = StateDict::new();
            for (k, t) in sd.iter().filter(|(k, _)| !is_class_layer(k)) {
                kept.insert(k.clone(), t.shallow_clone());
            }
            let mut report = load_into(vs, &kept, &LoadOptions::partial())?;
            let bad: Vec<_> = report
                .missing
                .iter()
                .filter(|(k, _)| !is_class_layer(k))
                .cloned()
                .collect();
            if !bad.is_empty() || !report.unexpected.is_empty() || !report.mismatched.is_empty() {
                report.strict = true;
                return Err(HeadsError::Checkpoint(
                    cnx_backbone::checkpoint::CheckpointError::Mismatch(Box::new(report)),
                ));
            }
            Ok(report)
        }
    }
}
