//! `cnx train`: train a detector or segmentor from a preset or a TOML config, with single-field
//! overrides, resume, a pretrained backbone, progress, logs, plots and checkpoints.

use crate::engine::config::Config;
use crate::engine::distributed::DataParallel;
use crate::engine::presets;
use crate::engine::tasks;
use crate::engine::trainer::{self, RunOptions, Summary};
use anyhow::{bail, Result};
use cnx_backbone::replica;
use std::path::PathBuf;
use tch::Tensor;

#[derive(clap::Args)]
pub struct Args {
    /// Preset name (see `cnx presets`); or give --config.
    preset: Option<String>,
    /// TOML config (e.g. an edited `cnx config show PRESET`).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Override one field: dotted path into the TOML (repeatable), e.g. --set optimizer.lr=2e-4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Resume from a checkpoint: a state/weights file, a work dir, or `auto` (latest in the work
    /// dir; a fresh start when there is none).
    #[arg(long, num_args = 0..=1, default_missing_value = "auto", value_name = "FILE|auto")]
    resume: Option<String>,
    /// ImageNet ConvNeXt checkpoint (official .pth, timm, safetensors) for the backbone.
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Work directory (checkpoints, log.jsonl, curves.png); default work_dirs/<name>.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Stop after this many iterations (the schedule keeps its configured length).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Skip periodic and final evaluation.
    #[arg(long)]
    no_eval: bool,
    /// Print the final summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Data-parallel on this machine: run N ranks (processes), one per GPU with CUDA, else N CPU
    /// processes with Gloo (what `torchrun --nproc-per-node N --no-python cnx train ...` does).
    /// Each rank runs `data.batch_size` images, so a step sees N x that.
    #[arg(long, value_name = "N", default_value_t = 1)]
    nproc_per_node: usize,
    /// Port of the rank-0 store for --nproc-per-node (default: a free one per attempt).
    #[arg(long)]
    master_port: Option<u16>,
    /// With --nproc-per-node: when a rank fails, restart the whole group up to this many times,
    /// resuming from the last complete checkpoint (`--resume auto` is added), as
    /// `torchrun --max-restarts` does.
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// Collective backend: nccl (CUDA) or gloo (CPU, or CUDA tensors through the host).
    /// Default: nccl on CUDA devices, gloo on the CPU.
    #[arg(long)]
    dist_backend: Option<String>,
}

/// The config an invocation describes: preset or file, then the explicit flags, then --set.
pub fn resolve_config(
    preset: Option<&str>,
    file: Option<&PathBuf>,
    sets: &[String],
) -> Result<Config> {
    let base = match (preset, file) {
        (Some(p), None) => presets::find(p)?.config(),
        (None, Some(f)) => Config::load(f)?,
        (None, None) => bail!("give a preset name or --config FILE (see `cnx presets`)"),
        (Some(_), Some(_)) => bail!("give either a preset or --config, not both"),
    };
    let cfg = base.with_overrides(sets)?;
    cfg.validate()?;
    Ok(cfg)
}

/// Train `cfg` end to end (the one code path of `cnx train` and `cnx demo`).
pub fn train_config(
    cfg: &Config,
    opts: &RunOptions,
) -> Result<(Summary, Box<dyn tasks::DemoTask>)> {
    train_config_on(cfg, opts, None)
}

/// [`train_config`] as one rank of a data-parallel run when the environment describes one
/// (torchrun, SLURM or `--nproc-per-node`); `backend` overrides NCCL/Gloo.
pub fn train_config_on(
    cfg: &Config,
    opts: &RunOptions,
    backend: Option<&str>,
) -> Result<(Summary, Box<dyn tasks::DemoTask>)> {
    cfg.validate()?;
    let device = crate::engine::distributed::resolve_device(&cfg.runtime.device)?;
    let threads = crate::engine::threads::ThreadPlan::from_env(cfg, device);
    threads.apply();
    crate::device::cudnn_benchmark_for(device, cfg.model.arch());
    crate::device::winograd_for(device);
    // Model config errors and missing data come before any work.
    tasks::check_model(cfg)?;
    let mut dp = DataParallel::from_env(backend, device)?;
    if !opts.quiet && dp.as_ref().is_none_or(|d| d.is_main()) {
        eprintln!("threads: {}", threads.describe());
    }
    // Model initialisation draws from libtorch's generator: seed it so a run is repeatable.
    tch::manual_seed(cfg.runtime.seed as i64);
    let mut task = tasks::build(cfg, device)?;
    if let Some(d) = &dp {
        task.as_train().set_replica(d.rank(), d.world())?;
        task.as_train().set_eval_shard(d.eval_shard());
    }
    let summary = match dp.as_mut() {
        None => trainer::train(cfg, task.as_train(), device, opts)?,
        Some(d) => {
            let (pg, world) = (d.pg.clone(), d.world());
            let agree = d.shape_agreement();
            // Batch-mean losses divide by counts summed over the ranks, and the heads' SyncBN
            // layers normalise with statistics over the global batch (see
            // cnx_backbone::replica): then N ranks x k images train as 1 process x N.k.
            let (count_pg, bn_pg) = (pg.clone(), pg.clone());
            let reduce = move |t: &Tensor| {
                let t = t.detach().copy();
                if let Err(e) = count_pg.all_reduce_sum(std::slice::from_ref(&t)) {
                    panic!("loss normaliser all-reduce: {e}");
                }
                t
            };
            let sync_bn = move |x: &Tensor, p: &replica::BatchNormParams| {
                cnx_dist::sync_batch_norm(
                    &bn_pg,
                    x,
                    p.weight,
                    p.bias,
                    p.running_mean,
                    p.running_var,
                    p.momentum,
                    p.eps,
                )
                .unwrap_or_else(|e| panic!("SyncBN: {e}"))
            };
            replica::with_count_reducer(world, reduce, || {
                replica::with_sync_batch_norm(sync_bn, || {
                    crate::engine::distributed::with_batch_shape_agreement(agree, || {
                        trainer::train_replica(cfg, task.as_train(), device, opts, Some(d))
                    })
                })
            })?
        }
    };
    Ok((summary, task))
}

pub fn run(args: Args) -> Result<()> {
    // `--nproc-per-node N` launches the ranks (each sees RANK etc. and trains); a rank started
    // by torchrun / SLURM / this launcher trains directly.
    if let Some(done) = crate::engine::distributed::launch_local(
        args.nproc_per_node,
        args.master_port,
        args.max_restarts,
    ) {
        return done;
    }
    let mut sets = vec![];
    if let Some(p) = &args.pretrained {
        if !p.exists() {
            bail!("--pretrained {}: file not found", p.display());
        }
    }
    if let Some(w) = &args.work_dir {
        sets.push(format!("runtime.work_dir={:?}", w.display().to_string()));
    }
    if let Some(d) = &args.device {
        sets.push(format!("runtime.device={d:?}"));
    }
    sets.extend(args.sets.iter().cloned());
    let mut cfg = resolve_config(args.preset.as_deref(), args.config.as_ref(), &sets)?;
    if let Some(p) = &args.pretrained {
        cfg.model.set_pretrained(&p.display().to_string());
    }
    let opts = RunOptions {
        resume: args.resume.clone(),
        stop_at: args.stop_at,
        quiet: false,
        no_eval: args.no_eval,
        ..Default::default()
    };
    let (s, _task) = train_config_on(&cfg, &opts, args.dist_backend.as_deref())?;
    // One writer: the other ranks of a data-parallel run end quietly.
    let main = cnx_dist::DistEnv::from_env()?.is_none_or(|e| e.is_main());
    if !main {
        if s.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    if args.json {
        let v = serde_json::json!({
            "iter": s.iter,
            "work_dir": s.work_dir,
            "weights": s.weights,
            "metrics": s.metrics,
            "seconds": s.seconds,
            "interrupted": s.interrupted,
            "skipped_images": s.skipped_images,
        });
        println!("{v}");
    } else {
        println!("work dir   {}", s.work_dir.display());
        if let Some(w) = &s.weights {
            println!("weights    {}", w.display());
        }
        println!("log        {}", s.work_dir.join("log.jsonl").display());
        println!("curves     {}", s.work_dir.join("curves.png").display());
        for (k, v) in &s.metrics {
            println!("{k:<12} {v:.4}");
        }
        println!("time       {:.1} s", s.seconds);
        if !s.skipped_images.is_empty() {
            println!(
                "skipped    {} unreadable training images (each replaced by another image of its aspect group):",
                s.skipped_images.len()
            );
            for f in &s.skipped_images {
                println!("           {f}");
            }
        }
    }
    if s.interrupted {
        std::process::exit(130);
    }
    Ok(())
}
