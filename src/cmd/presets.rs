//! `cnx presets`: the paper's recipes (and the demos) with their key settings and the numbers the
//! paper reports for each.

use crate::engine::config::{DecayType, Policy, Task};
use crate::engine::presets::{self, PaperNumbers};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Print a JSON array instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let all = presets::all();
    if args.json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|p| {
                let c = p.config();
                let paper = match p.paper {
                    PaperNumbers::Coco { box_ap, mask_ap, params_m, flops_g } => {
                        serde_json::json!({"box_AP": box_ap, "mask_AP": mask_ap, "params_M": params_m, "FLOPs_G": flops_g})
                    }
                    PaperNumbers::Ade { miou_ss, miou_ms, params_m, flops_g } => {
                        serde_json::json!({"mIoU_ss": miou_ss, "mIoU_ms": miou_ms, "params_M": params_m, "FLOPs_G": flops_g})
                    }
                    PaperNumbers::None => serde_json::Value::Null,
                };
                serde_json::json!({"name": p.name, "description": p.description, "lr": c.optimizer.lr,
                    "decay_rate": c.optimizer.decay_rate, "drop_path": c.model.drop_path_rate(), "paper": paper})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", table());
    Ok(())
}

/// The presets table (also pasted into the README).
pub fn table() -> String {
    let mut s = String::new();
    s +=
        "| preset | task | lr | weight decay | lr decay | drop path | batch | schedule | paper |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for p in presets::all() {
        let c = p.config();
        let sched = match c.schedule.policy {
            Policy::Step => format!(
                "{} ep, steps {:?}",
                c.runtime.max_epochs, c.schedule.step_epochs
            ),
            Policy::Poly if c.runtime.max_iters >= 1000 => {
                format!("{}k it, poly", c.runtime.max_iters / 1000)
            }
            Policy::Poly => format!("{} it, poly", c.runtime.max_iters),
            Policy::Fixed => "fixed".into(),
        };
        let decay = match c.optimizer.decay_type {
            DecayType::None => "none".to_string(),
            DecayType::LayerWise => format!("{} layer", c.optimizer.decay_rate),
            DecayType::StageWise => format!("{} stage", c.optimizer.decay_rate),
        };
        let params = |m: f64| {
            if m.is_finite() {
                format!(", {m}M")
            } else {
                String::new()
            }
        };
        let paper = match p.paper {
            PaperNumbers::Coco {
                box_ap,
                mask_ap,
                params_m,
                ..
            } => format!("AP box {box_ap} / mask {mask_ap}{}", params(params_m)),
            PaperNumbers::Ade {
                miou_ss,
                miou_ms,
                params_m,
                ..
            } => format!("mIoU {miou_ss} / {miou_ms} ms{}", params(params_m)),
            PaperNumbers::None => "demo (CPU)".into(),
        };
        let task = match c.task {
            Task::Det => "COCO",
            Task::Seg => "ADE20K",
        };
        s += &format!(
            "| {} | {} | {:e} | {} | {} | {} | {} | {} | {} |\n",
            p.name,
            task,
            c.optimizer.lr,
            c.optimizer.weight_decay,
            decay,
            c.model.drop_path_rate(),
            c.data.batch_size,
            sched,
            paper
        );
    }
    s
}
