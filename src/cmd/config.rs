//! `cnx config show PRESET`: print a preset's full configuration as TOML (edit it and pass it to
//! `cnx train --config FILE`); `cnx config check FILE` validates an edited file; `cnx config
//! groups PRESET` prints the optimizer settings every trainable parameter gets (layer-decay group,
//! lr scale, weight decay), to check a recipe against the official constructor's.

use crate::cmd::train::resolve_config;
use crate::engine::config::Config;
use crate::engine::optim::{build_groups, ParamGroup};
use crate::engine::tasks;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Print the full config of a preset (or of a file) as TOML, after --set overrides.
    Show {
        /// Preset name (see `cnx presets`).
        preset: Option<String>,
        #[arg(long, conflicts_with = "preset")]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Parse and validate a config file (unknown keys and wrong types are errors).
    Check { file: PathBuf },
    /// Every trainable parameter of the preset's (or file's) whole model with its optimizer
    /// group (layer id), lr scale and weight decay. Builds the model on the CPU; reads no data.
    Groups {
        /// Preset name (see `cnx presets`).
        preset: Option<String>,
        #[arg(long, conflicts_with = "preset")]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// `{"preset", "base_lr", "params": {name: {"lr_scale", "weight_decay"}}}`.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.action {
        Action::Show {
            preset,
            config,
            sets,
        } => {
            let cfg = resolve_config(preset.as_deref(), config.as_ref(), &sets)?;
            print!("{}", cfg.to_toml()?);
        }
        Action::Check { file } => {
            let cfg = resolve_config(None, Some(&file), &[])?;
            println!("{}: ok ({})", file.display(), cfg.name);
        }
        Action::Groups {
            preset,
            config,
            sets,
            json,
        } => {
            let cfg = resolve_config(preset.as_deref(), config.as_ref(), &sets)?;
            print!("{}", groups_report(&cfg, json)?);
        }
    }
    Ok(())
}

/// The `config groups` output for a config: one entry per trainable parameter, in name order.
fn groups_report(cfg: &Config, json: bool) -> Result<String> {
    let params = tasks::trainable_parameters(cfg)?;
    let o = &cfg.optimizer;
    let groups = build_groups(&params, o, o.lr);
    let mut of: BTreeMap<&str, &ParamGroup> = BTreeMap::new();
    for g in &groups {
        for p in &g.params {
            of.insert(p.as_str(), g);
        }
    }
    if json {
        let params: serde_json::Map<String, serde_json::Value> = of
            .iter()
            .map(|(n, g)| {
                (
                    n.to_string(),
                    serde_json::json!({"lr_scale": g.lr_scale, "weight_decay": g.weight_decay}),
                )
            })
            .collect();
        let v = serde_json::json!({"preset": cfg.name, "base_lr": o.lr, "params": params});
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut s = format!(
        "{}: base lr {:e}, {:?} decay rate {} over num_layers {}, weight decay {}\n",
        cfg.name, o.lr, o.decay_type, o.decay_rate, o.num_layers, o.weight_decay
    );
    let width = of.keys().map(|n| n.len()).max().unwrap_or(4);
    s += &format!(
        "{:<width$}  {:>5}  {:>12}  {:>6}  group\n",
        "parameter", "layer", "lr scale", "wd"
    );
    for (n, g) in &of {
        s += &format!(
            "{n:<width$}  {:>5}  {:>12.10}  {:>6}  {}\n",
            g.layer_id, g.lr_scale, g.weight_decay, g.name
        );
    }
    s += &format!(
        "{} trainable parameters in {} groups\n",
        of.len(),
        groups.len()
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::presets;
    use serde_json::Value;

    const OFFICIAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/layer-decay");

    /// `config groups --json` of every ConvNeXt preset against the official constructor's
    /// groups on the official configs: the same names, lr scales within 1e-9, equal weight decay.
    #[test]
    fn groups_of_every_convnext_preset_match_the_official_constructor() {
        let mut checked = 0;
        for p in presets::all() {
            let file = format!("{OFFICIAL}/{}.json", p.name);
            if !std::path::Path::new(&file).exists() {
                assert!(
                    !p.name.contains("convnext") || p.name.starts_with("demo_"),
                    "no official groups for {}",
                    p.name
                );
                continue;
            }
            let want: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let cfg = p.config();
            let got: Value = serde_json::from_str(&groups_report(&cfg, true).unwrap()).unwrap();
            assert_eq!(got["preset"], p.name);
            assert_eq!(
                got["base_lr"].as_f64(),
                want["optimizer"]["lr"].as_f64(),
                "{}",
                p.name
            );
            assert_eq!(
                cfg.optimizer.num_layers,
                want["paramwise_cfg"]["num_layers"].as_i64().unwrap(),
                "{}",
                p.name
            );
            let (g, w) = (
                got["params"].as_object().unwrap(),
                want["params"].as_object().unwrap(),
            );
            let missing: Vec<&String> = w.keys().filter(|k| !g.contains_key(*k)).collect();
            let extra: Vec<&String> = g.keys().filter(|k| !w.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{}: missing {missing:?}, unexpected {extra:?}",
                p.name
            );
            for (name, v) in w {
                let (scale, wd) = (v[0].as_f64().unwrap(), v[1].as_f64().unwrap());
                let ours = &g[name];
                let d = (ours["lr_scale"].as_f64().unwrap() - scale).abs();
                assert!(
                    d < 1e-9,
                    "{} {name}: lr scale {} vs {scale}",
                    p.name,
                    ours["lr_scale"]
                );
                assert_eq!(
                    ours["weight_decay"].as_f64().unwrap(),
                    wd,
                    "{} {name}",
                    p.name
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 13);
    }

    /// The comparison rows against mmcv's `DefaultOptimizerConstructor` with the Swin configs'
    /// `custom_keys` on mmdet's / mmseg's own models (tools/reference/gen_swin_groups.py):
    /// only names containing those keys go without weight decay, biases are decayed. The
    /// fixture's backbone names are mmdet's; they are mapped to cnx's (the official Swin
    /// layout) by the checkpoint loader's key conversion.
    #[test]
    fn groups_of_comparison_rows_match_the_swin_configs_constructor() {
        let dir = format!("{OFFICIAL}/swin_rule");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let want: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let preset = want["preset"].as_str().unwrap();
            let cfg = presets::find(preset).unwrap().config();
            assert_eq!(cfg.optimizer.lr, want["lr"].as_f64().unwrap(), "{preset}");
            let bb = tasks::backbone_config(&cfg).unwrap();
            let w = want["params"].as_object().unwrap();
            // Fixture name → (lr scale, weight decay), backbone names in cnx's layout.
            let mut expect: BTreeMap<String, (f64, f64)> = BTreeMap::new();
            let mut backbone = vec![];
            for (name, v) in w {
                let sw = (v[0].as_f64().unwrap(), v[1].as_f64().unwrap());
                if let Some(rest) = name.strip_prefix("backbone.") {
                    let shape: Vec<i64> = v[2]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_i64().unwrap())
                        .collect();
                    let t = tch::Tensor::zeros(shape.as_slice(), tch::kind::FLOAT_CPU);
                    backbone.push((rest.to_string(), t, sw));
                } else {
                    expect.insert(name.clone(), sw);
                }
            }
            for (rest, t, sw) in backbone {
                let mapped = cnx_backbone::config::convert_state_dict(&bb, vec![(rest.clone(), t)]);
                assert_eq!(mapped.len(), 1, "{preset}: backbone.{rest} has no cnx name");
                expect.insert(format!("backbone.{}", mapped[0].0), sw);
            }
            assert_eq!(
                expect.len(),
                w.len(),
                "{preset}: two fixture names map to one"
            );
            let got: Value = serde_json::from_str(&groups_report(&cfg, true).unwrap()).unwrap();
            let g = got["params"].as_object().unwrap();
            let missing: Vec<&String> = expect.keys().filter(|k| !g.contains_key(*k)).collect();
            let extra: Vec<&String> = g.keys().filter(|k| !expect.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{preset}: missing {missing:?}, unexpected {extra:?}"
            );
            let mut no_decay = 0;
            for (name, (scale, wd)) in &expect {
                let ours = &g[name];
                assert!(
                    (ours["lr_scale"].as_f64().unwrap() - scale).abs() < 1e-9,
                    "{name}"
                );
                assert_eq!(
                    ours["weight_decay"].as_f64().unwrap(),
                    *wd,
                    "{preset} {name}"
                );
                no_decay += usize::from(*wd == 0.0);
            }
            // Swin rows exempt their norms and tables; ResNet rows (BN: "bn") exempt nothing.
            assert_eq!(no_decay > 0, preset.contains("swin"), "{preset}");
            checked += 1;
        }
        assert_eq!(checked, 5);
    }

    /// The text report lists every trainable parameter with its layer id.
    #[test]
    fn groups_text_report_lists_every_parameter() {
        let cfg = presets::find("demo_mask_rcnn_convnext_nano")
            .unwrap()
            .config();
        let n = tasks::trainable_parameters(&cfg).unwrap().len();
        let s = groups_report(&cfg, false).unwrap();
        assert!(s.contains("backbone.downsample_layers.0.0.weight"), "{s}");
        assert!(s.contains(&format!("{n} trainable parameters")), "{s}");
        assert_eq!(s.lines().count(), n + 3);
    }
}
