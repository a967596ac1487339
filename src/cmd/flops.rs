//! `cnx flops NAME [--input HxW] [--json]`: parameters and FLOPs of a model, counted by walking
//! the real network at the real input shape (one forward of one image).
//!
//! Convention (fvcore / mmcv `get_flops`, the one the paper's tables use): one multiply-add is one
//! FLOP and only convolution, linear and matmul layers count. [`count_model`] is the registry:
//! detectors and segmentors add their names there.

use anyhow::{bail, Result};
use cnx_backbone::convnext::{self, ConvNeXt, ConvNeXtConfig};
use cnx_backbone::{flops, nn as cnn};
use serde::Serialize;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Model name (see the error message of an unknown name for the list).
    pub name: String,
    /// Input height x width.
    #[arg(long, default_value = "224x224", value_parser = parse_hw)]
    pub input: (i64, i64),
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    input: [i64; 2],
    params: i64,
    flops: f64,
}

/// `"800x1280"` or `"224"` (square) → (height, width).
pub fn parse_hw(s: &str) -> Result<(i64, i64), String> {
    let parse = |v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("'{s}' is not HxW (e.g. 224x224)"))
    };
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => (parse(s)?, parse(s)?),
    };
    if h < 1 || w < 1 {
        return Err(format!("'{s}': sizes must be positive"));
    }
    Ok((h, w))
}

/// Every name [`count_model`] knows.
pub fn known_models() -> Vec<String> {
    let mut v: Vec<String> = convnext::VARIANTS.iter().map(|s| s.to_string()).collect();
    // Comparison backbones and the roadmap steps (backbone::config).
    v.extend(cnx_backbone::config::classifier_names());
    // Every training preset's model: UperNet (mmseg get_flops: backbone + decode head; aux head
    // params counted), Mask R-CNN (mmdet get_flops: forward_dummy with 1000 RoIs / 100 mask
    // RoIs), Cascade Mask R-CNN (1000 RoIs through each of the 3 box heads, 100 through each
    // mask head).
    v.extend(
        crate::engine::presets::all()
            .into_iter()
            .filter(|p| !p.name.starts_with("demo_"))
            .map(|p| p.name.to_string()),
    );
    v
}

/// (parameters, FLOPs) of the named model at input `h` x `w`, batch 1.
pub fn count_model(name: &str, h: i64, w: i64) -> Result<(i64, f64)> {
    if name.starts_with("convnext_") {
        if let Ok(cfg) = ConvNeXtConfig::by_name(name) {
            return count_convnext(&cfg, h, w);
        }
    }
    // Detectors / segmentors with Swin or ResNet backbones (the comparison rows).
    if let Some(r) = crate::cmd::compare::count_preset(name, h, w) {
        return r;
    }
    if let Ok(model) = crate::engine::presets::model(name) {
        use crate::engine::config::ModelConfig;
        let (params, tally) = match &model {
            ModelConfig::MaskRcnn(d) => cnx_heads::two_stage::complexity(d, [h, w]),
            ModelConfig::CascadeMaskRcnn(c) => cnx_heads::two_stage::complexity(c, [h, w]),
            ModelConfig::Upernet(s) => cnx_heads::segmentor::complexity(s, [h, w])?,
        };
        return Ok((params, tally.total));
    }
    // Swin, ResNet/ResNeXt and roadmap classifiers (backbone::config).
    if let Some((params, tally)) = cnx_backbone::config::classifier_flops(name, h, w) {
        return Ok((params, tally.total));
    }
    bail!(
        "unknown model '{name}'; valid names: {}",
        known_models().join(", ")
    )
}

/// A ConvNeXt classifier as the paper's ImageNet table counts it (1000 classes).
pub fn count_convnext(cfg: &ConvNeXtConfig, h: i64, w: i64) -> Result<(i64, f64)> {
    if h < 32 || w < 32 {
        bail!("ConvNeXt needs inputs of at least 32x32, got {h}x{w}");
    }
    let vs = VarStore::new(Device::Cpu);
    // Weights are irrelevant to the count: skip the official init.
    let model = ConvNeXt::new_uninit(vs.root(), cfg);
    let params = cnn::param_count(&vs);
    let x = Tensor::zeros([1, 3, h, w], (Kind::Float, Device::Cpu));
    let (_, tally) = tch::no_grad(|| flops::count(|| model.forward_t(&x, false)));
    Ok((params, tally.total))
}

pub fn run(args: Args) -> Result<()> {
    let (h, w) = args.input;
    let (params, flops) = count_model(&args.name, h, w)?;
    if args.json {
        let r = Report {
            model: &args.name,
            input: [h, w],
            params,
            flops,
        };
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} @ {h}x{w}: {:.2}M params, {:.2} GFLOPs ({:.0} multiply-adds; conv, linear and matmul)",
            args.name,
            params as f64 / 1e6,
            flops / 1e9,
            flops
        );
    }
    Ok(())
}
