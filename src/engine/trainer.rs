//! The training loop shared by `cnx train` and `cnx demo`: AdamW with the recipe's parameter
//! groups, lr schedule by iteration, autocast + loss scaling on CUDA, gradient accumulation and
//! clipping, per-iteration reseeding (so resume is exact without saving generator state),
//! periodic checkpoints / evaluation / plots, and failures that lose nothing (a non-finite loss
//! stops the run before the bad step reaches the weights, except under fp16 loss scaling, where
//! the step is skipped and counted as PyTorch's GradScaler would, and only a long run of them
//! stops it: see `engine::amp`; Ctrl-C saves first).

use super::amp::{self, LossScaler, StepOutcome, MAX_NONFINITE_LOSS_STREAK};
use super::checkpoint::{self, ResumeState};
use super::config::{Amp, Config, Task};
use super::distributed::DataParallel;
use super::log::{plot_curves, RunLog};
use super::optim::{build_groups, group_table, AdamW};
use super::schedule::Schedule;
use super::task::TrainTask;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Options of one run besides the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `--resume FILE|DIR|auto`.
    pub resume: Option<String>,
    /// Stop after this many iterations in total even if the schedule is longer (tests, smoke
    /// runs); the schedule itself still uses the configured length.
    pub stop_at: Option<u64>,
    /// No progress bar and no per-log prints.
    pub quiet: bool,
    /// Skip evaluation entirely (tests).
    pub no_eval: bool,
    /// Tests: run fp16's dynamic loss scaling (with its non-finite handling) on any device,
    /// although autocast itself is CUDA-only.
    pub force_loss_scaler: bool,
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct Summary {
    pub iter: u64,
    pub work_dir: PathBuf,
    pub weights: Option<PathBuf>,
    pub metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    pub interrupted: bool,
    /// Training images found unreadable and replaced (each named once), in the order met.
    pub skipped_images: Vec<String>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: std::sync::Once = std::sync::Once::new();
static PRESSES: AtomicUsize = AtomicUsize::new(0);

fn install_ctrlc() {
    HANDLER.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if PRESSES.fetch_add(1, Ordering::SeqCst) >= 1 {
                eprintln!("\nsecond Ctrl-C: exiting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\nCtrl-C: saving a checkpoint after this iteration (press again to quit now)"
            );
            INTERRUPTED.store(true, Ordering::SeqCst);
        });
    });
}

/// libtorch seed of iteration `iter` (SplitMix64 of seed and iteration).
pub fn iteration_seed(seed: u64, iter: u64) -> i64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(iter)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The lr actually used at a step of `images_per_batch` images (over all ranks) `x grad_accum`
/// (linear scaling rule).
pub fn scaled_lr(cfg: &Config, images_per_batch: usize) -> f64 {
    let total = images_per_batch as f64 * cfg.runtime.grad_accum as f64;
    if cfg.optimizer.scale_lr {
        cfg.optimizer.lr * total / cfg.optimizer.base_batch_size as f64
    } else {
        cfg.optimizer.lr
    }
}

/// Train `task` as `cfg` says. `device` is where the task's model lives.
pub fn train(
    cfg: &Config,
    task: &mut dyn TrainTask,
    device: Device,
    opts: &RunOptions,
) -> Result<Summary> {
    train_replica(cfg, task, device, opts, None)
}

/// [`train`] as one rank of a data-parallel run (`dp`; `None` = the only process): the task's
/// data is this rank's slice of each global batch; gradients are averaged over the ranks after
/// backward, loss values and stop decisions agreed on; rank 0 alone writes the work dir.
pub fn train_replica(
    cfg: &Config,
    task: &mut dyn TrainTask,
    device: Device,
    opts: &RunOptions,
    mut dp: Option<&mut DataParallel>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let work_dir = cfg.work_dir();
    let is_main = dp.as_ref().is_none_or(|d| d.is_main());
    let world = dp.as_ref().map_or(1, |d| d.world());
    let quiet = opts.quiet || !is_main;
    if opts.resume.is_none() && is_main {
        checkpoint::refuse_existing_run(&work_dir)?;
    }
    // The checkpoint to resume from, checked against the config its run was written with
    // before this run's config.toml replaces it.
    let resumed = match &opts.resume {
        Some(r) => checkpoint::resolve(r, &work_dir)?,
        None => None,
    };
    if let Some((st, dir)) = &resumed {
        refuse_incompatible_resume(cfg, st, dir, world as u64)?;
    }
    if is_main {
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating work dir {}", work_dir.display()))?;
        std::fs::write(work_dir.join("config.toml"), cfg.to_toml()?)?;
    }
    install_ctrlc();
    INTERRUPTED.store(false, Ordering::SeqCst);
    PRESSES.store(0, Ordering::SeqCst);

    let accum = cfg.runtime.grad_accum.max(1);
    let batches = task.batches_per_epoch();
    // Iterations per epoch of the data as it is now (the data position: epoch = iteration /
    // data_ipe), and of the schedule (lr steps, the length of an epoch-counted run, the log's
    // epoch). They differ only when resuming a run whose dataset has changed since: the schedule
    // then keeps counting in the checkpoint's epochs, so the lr goes on as before and the run
    // ends at the same iteration, while the data position is recomputed over the new data (the
    // interrupted epoch continues at the same iteration of the new data's order, every later
    // epoch is a full pass over the new data). Both depend on the iteration alone, so a later
    // resume of the changed run stays exact; the checkpoint keeps the schedule's count.
    let data_ipe = (batches / accum).max(1);
    let ipe = match &resumed {
        Some((st, _)) => st.iters_per_epoch.max(1),
        None => data_ipe,
    };
    let max_iters = if cfg.runtime.max_iters > 0 {
        cfg.runtime.max_iters
    } else {
        cfg.runtime.max_epochs * ipe
    };
    let stop_at = opts.stop_at.unwrap_or(max_iters).min(max_iters);
    let schedule = Schedule::new(cfg.schedule.clone(), ipe, max_iters);
    // Images per batch over all ranks (the global batch; each rank runs `batch / world`).
    let ipb = task.images_per_batch() * world;
    let base_lr = scaled_lr(cfg, ipb);
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    say(format!(
        "{}: {} iterations ({} per epoch), batch {}{} x accum {} = {} images/step; lr {:.3e} = {:.3e} x {}/{} (linear scaling)",
        cfg.name,
        max_iters,
        ipe,
        ipb,
        if world > 1 {
            format!(" ({world} ranks x {})", ipb / world)
        } else {
            String::new()
        },
        accum,
        ipb as u64 * accum,
        base_lr,
        cfg.optimizer.lr,
        ipb as u64 * accum,
        cfg.optimizer.base_batch_size
    ));

    // Trainable parameters (frozen ones are excluded from the optimizer) in name order.
    let vars = task.var_store().variables();
    let mut params: BTreeMap<String, Tensor> = BTreeMap::new();
    for (n, t) in &vars {
        if t.requires_grad() {
            params.insert(n.clone(), t.shallow_clone());
        }
    }
    let shapes: Vec<(String, Vec<i64>)> =
        params.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let groups = build_groups(&shapes, &cfg.optimizer, base_lr);
    let numel = |n: &str| params.get(n).map(|t| t.numel() as i64).unwrap_or(0);
    say(format!(
        "parameter groups ({:?}, decay rate {}):\n{}",
        cfg.optimizer.decay_type,
        cfg.optimizer.decay_rate,
        group_table(&groups, &numel)
    ));
    // The gradients the ranks average, in one fixed order (name order, as the optimizer's).
    let dp_params: Vec<Tensor> = params.values().map(|t| t.shallow_clone()).collect();
    let mut opt = AdamW::new(groups, params, &cfg.optimizer)?;

    // Autocast is CUDA-only here (CPU autocast trains slower than fp32 on most CPUs).
    let amp_mode = if device.is_cuda() {
        cfg.runtime.amp
    } else {
        Amp::None
    };
    let mut scaler = LossScaler::new(
        amp_mode == Amp::Fp16 || (opts.force_loss_scaler && cfg.runtime.amp == Amp::Fp16),
    );
    let device_label = crate::device::label(device);
    say(format!(
        "device {}; precision {}",
        crate::device::describe(device),
        match (cfg.runtime.amp, amp_mode) {
            (Amp::None, _) => "fp32".to_string(),
            (a, Amp::None) => format!("fp32 (runtime.amp = {a:?} applies on CUDA only)"),
            (Amp::Fp16, _) => "fp16 autocast, dynamic loss scaling".to_string(),
            (Amp::Bf16, _) => "bf16 autocast".to_string(),
        }
    ));

    // Resume or initialise.
    let mut start = 0u64;
    // The checkpoint resumed from, when it lives in this work dir: a run that stops before its
    // first iteration (e.g. `--resume auto --stop-at N` to evaluate at N) does not rewrite it.
    let mut resumed_here: Option<PathBuf> = None;
    if opts.resume.is_some() {
        match resumed {
            Some((st, dir)) => {
                if st.iters_per_epoch != data_ipe {
                    say(format!(
                        "warning: the training data changed since the checkpoint: {} iterations per epoch then, {data_ipe} now{} (batch {} x accum {accum}); \
                         the schedule keeps the checkpoint's {} iterations per epoch ({max_iters} iterations in all, lr unchanged), \
                         and the data continues at iteration {} of the new data's order (epoch {}, batch {})",
                        st.iters_per_epoch,
                        task
                            .num_train_images()
                            .map(|n| format!(" ({n} training images)"))
                            .unwrap_or_default(),
                        ipb,
                        st.iters_per_epoch,
                        st.iter,
                        st.iter / data_ipe,
                        st.iter % data_ipe
                    ));
                }
                load_weights(task, &dir.join(&st.weights))?;
                opt.load_state_tensors(
                    &checkpoint::load_tensors(&dir.join(&st.optimizer))?,
                    st.optimizer_step,
                )?;
                scaler.scale = st.loss_scale;
                scaler.growth_tracker = st.scale_growth_tracker;
                start = st.iter;
                if dir.canonicalize().ok() == work_dir.canonicalize().ok() {
                    resumed_here = Some(dir.join(&st.weights));
                }
                say(format!(
                    "resumed from {} at iteration {start} (epoch {}, batch {})",
                    dir.join(&st.weights).display(),
                    st.epoch,
                    st.iter_in_epoch
                ));
            }
            None => say(format!(
                "--resume auto: no checkpoint in {}, starting fresh",
                work_dir.display()
            )),
        }
    }
    if start == 0 && !cfg.model.pretrained().is_empty() {
        let msg = task.load_pretrained(Path::new(cfg.model.pretrained()))?;
        say(format!("pretrained backbone: {msg}"));
    }
    if let Some(d) = dp.as_deref() {
        // Every rank loaded the same files; the broadcast also makes random initialisation equal.
        d.broadcast_state(task.var_store())?;
        say(format!(
            "data parallel: {} ranks ({}), rank 0 writes {}",
            world,
            d.pg.backend(),
            work_dir.display()
        ));
    }
    // What every weights file says about its model: the config and the classes.
    let card = checkpoint::ModelCard {
        config: Some(cfg.to_toml()?),
        classes: task.class_names(),
        category_ids: task.category_ids(),
    };
    let mut log = if is_main {
        RunLog::open(&work_dir, Some(start))?
    } else {
        RunLog::in_memory()
    };
    let curves = work_dir.join("curves.png");

    let mut epoch = start / data_ipe;
    task.seek(epoch, (start % data_ipe) * accum)?;
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(stop_at)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(start);
    let tty = !pb.is_hidden();

    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    // Seconds per phase over the log interval: waiting for data, forward (without the wait),
    // backward, the gradient all-reduce (data parallel), the optimizer step. Host-side times:
    // on CUDA, kernels still queued at a phase's end are counted by the phase that waits.
    let mut phase = [0f64; 5];
    const PHASES: [&str; 5] = [
        "data_time",
        "forward_time",
        "backward_time",
        "sync_time",
        "optimizer_time",
    ];
    // Iterations in the current log interval, and those of them whose loss terms count (a step
    // skipped for a non-finite loss has none).
    let mut n_sum = 0u64;
    let mut n_loss = 0u64;
    let mut skipped_in_interval = 0u64;
    let mut nonfinite_in_interval = 0u64;
    let mut t_log = Instant::now();
    let mut last_weights: Option<PathBuf> = resumed_here;
    let mut metrics = BTreeMap::new();
    let mut iter = start;
    let mut interrupted = false;
    let mut skipped_images: Vec<String> = Vec::new();
    let save =
        |task: &dyn TrainTask, opt: &AdamW, scaler: &LossScaler, iter: u64| -> Result<PathBuf> {
            let st = ResumeState {
                iter,
                // The data position; `iters_per_epoch` is the schedule's (see `data_ipe`).
                epoch: iter / data_ipe,
                iter_in_epoch: iter % data_ipe,
                iters_per_epoch: ipe,
                seed: cfg.runtime.seed,
                optimizer_step: opt.step,
                loss_scale: scaler.scale,
                scale_growth_tracker: scaler.growth_tracker,
                config_name: cfg.name.clone(),
                weights: checkpoint::weights_file_name(iter),
                optimizer: checkpoint::optimizer_file_name(iter),
                world_size: world as u64,
            };
            let weights = named_weights(task);
            let p = checkpoint::save(&work_dir, &weights, &card, &opt.state_tensors(), &st)?;
            checkpoint::prune(&work_dir, cfg.runtime.keep_checkpoints, iter)?;
            Ok(p)
        };

    while iter < stop_at {
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        let stop = match dp.as_deref() {
            Some(d) => d.any(stop)?,
            None => stop,
        };
        if stop {
            interrupted = true;
            break;
        }
        if iter / data_ipe != epoch {
            epoch = iter / data_ipe;
            task.seek(epoch, 0)?;
        }
        tch::manual_seed(iteration_seed(cfg.runtime.seed, iter));
        for g in opt.groups.iter_mut() {
            g.lr = schedule.lr(g.initial_lr, iter);
        }
        opt.zero_grad();
        let mut terms: BTreeMap<String, f64> = BTreeMap::new();
        // First non-finite loss term of this iteration (fp16 scaler only; otherwise it stops).
        let mut bad_loss: Option<(String, f64)> = None;
        for micro in 0..accum {
            let keys = cnx_backbone::replica::BatchKeys {
                seed: cfg.runtime.seed,
                iteration: iter * accum + micro,
                samples: sample_keys(task.images_per_batch(), dp.as_deref()),
            };
            let t_fwd = Instant::now();
            let losses = cnx_backbone::replica::with_batch_keys(keys, || {
                amp::autocast(device, amp_mode, || task.forward_train())
            })?;
            let wait = task.data_wait();
            phase[0] += wait;
            phase[1] += (t_fwd.elapsed().as_secs_f64() - wait).max(0.0);
            if losses.is_empty() {
                bail!("the model returned no loss terms");
            }
            let vals = Tensor::cat(
                &losses
                    .iter()
                    .map(|(_, t)| t.detach().to_kind(Kind::Float).reshape([1]))
                    .collect::<Vec<_>>(),
                0,
            )
            .to_device(Device::Cpu);
            let vals: Vec<f64> = Vec::<f64>::try_from(vals.to_kind(Kind::Double))?;
            // The mean over ranks: what is logged, and one non-finite check for all.
            let vals = match dp.as_deref() {
                Some(d) => d.mean(&vals)?,
                None => vals,
            };
            if let Some(((name, _), v)) = losses.iter().zip(&vals).find(|(_, v)| !v.is_finite()) {
                if !scaler.enabled {
                    pb.abandon();
                    bail!(
                        "loss term {name} is {v} at iteration {} (epoch {}): training stopped; the last good checkpoint is {}",
                        iter + 1,
                        epoch,
                        last_weights.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no checkpoint written yet)".into())
                    );
                }
                bad_loss.get_or_insert((name.clone(), *v));
            }
            // Once the step is lost, the remaining micro-batches still run forward (the data
            // order stays that of an uninterrupted run) but spend no backward.
            if bad_loss.is_some() {
                continue;
            }
            for ((name, _), v) in losses.iter().zip(&vals) {
                *terms.entry(name.clone()).or_insert(0.0) += v / accum as f64;
            }
            let total = losses
                .iter()
                .map(|(_, t)| t.to_kind(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            let t_bwd = Instant::now();
            (total * (scaler.scale / accum as f64)).backward();
            phase[2] += t_bwd.elapsed().as_secs_f64();
        }
        // Gradients averaged once per step (not on accumulation micro-batches), before
        // unscaling / clipping see them; a lost step still all-reduces so the ranks stay paired.
        if let Some(d) = dp.as_deref_mut() {
            let t_sync = Instant::now();
            d.average_gradients(&dp_params)?;
            phase[3] += t_sync.elapsed().as_secs_f64();
        }
        let t_opt = Instant::now();
        let outcome = if let Some((name, v)) = &bad_loss {
            let streak = scaler.nonfinite_loss();
            nonfinite_in_interval += 1;
            let last_good = || {
                last_weights
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none (no checkpoint written yet)".into())
            };
            if streak >= MAX_NONFINITE_LOSS_STREAK {
                pb.abandon();
                bail!(
                    "loss non-finite for {streak} consecutive iterations under fp16 loss scaling (last: {name} = {v} at iteration {}, epoch {}; loss scale now {:e}): training stopped; the last good checkpoint is {}",
                    iter + 1,
                    epoch,
                    scaler.scale,
                    last_good()
                );
            }
            if !quiet {
                let line = format!(
                    "iteration {}: loss term {name} is {v}: step skipped, loss scale backed off to {:e} ({streak} in a row; training stops at {MAX_NONFINITE_LOSS_STREAK})",
                    iter + 1,
                    scaler.scale
                );
                if pb.is_hidden() {
                    eprintln!("{line}");
                } else {
                    pb.println(line);
                }
            }
            StepOutcome {
                stepped: false,
                grad_norm: f64::NAN,
            }
        } else {
            scaler.finite_loss();
            amp::finish_step(&mut opt, &mut scaler, cfg.runtime.clip_grad_norm)
        };
        phase[4] += t_opt.elapsed().as_secs_f64();
        if !outcome.stepped {
            skipped_in_interval += 1;
        }
        let grad_norm = outcome.grad_norm;
        iter += 1;
        pb.set_position(iter);
        // Unreadable images the loader replaced: each named once, here and in log.jsonl.
        for b in task.take_broken() {
            if !quiet {
                let line = format!(
                    "warning: unreadable training image {}: {}; replaced by another image of its aspect group (data.strict = true stops instead)",
                    b.file, b.error
                );
                if pb.is_hidden() {
                    eprintln!("{line}");
                } else {
                    pb.println(line);
                }
            }
            log.event(
                "data",
                iter,
                &[
                    ("skipped_image", b.file.clone().into()),
                    ("error", b.error.into()),
                ],
            )?;
            skipped_images.push(b.file);
        }
        let skipped_note = if skipped_images.is_empty() {
            String::new()
        } else {
            format!(" | {} unreadable images replaced", skipped_images.len())
        };

        let total_loss: f64 = terms.values().sum();
        if bad_loss.is_none() {
            for (k, v) in &terms {
                *sums.entry(k.clone()).or_insert(0.0) += v;
            }
            *sums.entry("loss".into()).or_insert(0.0) += total_loss;
            n_loss += 1;
        }
        n_sum += 1;
        let lr_now = opt.groups.iter().map(|g| g.lr).fold(0.0, f64::max);
        if tty {
            let short: Vec<String> = terms
                .iter()
                .map(|(k, v)| format!("{} {:.3}", k.trim_start_matches("loss_"), v))
                .collect();
            pb.set_message(format!(
                "loss {total_loss:.3} [{}] lr {lr_now:.2e}{skipped_note}",
                short.join(" ")
            ));
        }
        if iter.is_multiple_of(cfg.runtime.log_interval.max(1)) || iter == stop_at {
            let dt = t_log.elapsed().as_secs_f64();
            let mut v: BTreeMap<String, f64> = sums
                .iter()
                .map(|(k, s)| (k.clone(), s / n_loss.max(1) as f64))
                .collect();
            v.insert("lr".into(), lr_now);
            v.insert("epoch".into(), (iter - 1) as f64 / ipe as f64);
            v.insert("time".into(), dt / n_sum as f64);
            for (name, secs) in PHASES.iter().zip(&phase) {
                if *name != "sync_time" || dp.is_some() {
                    v.insert((*name).into(), secs / n_sum as f64);
                }
            }
            v.insert(
                "images_per_s".into(),
                (n_sum * accum) as f64 * ipb as f64 / dt.max(1e-9),
            );
            if scaler.enabled {
                v.insert("loss_scale".into(), scaler.scale);
                v.insert("skipped_steps".into(), skipped_in_interval as f64);
                v.insert("nonfinite_loss".into(), nonfinite_in_interval as f64);
            }
            if grad_norm.is_finite() {
                v.insert("grad_norm".into(), grad_norm);
            }
            log.log(
                "train",
                iter,
                &v,
                &[("device", device_label.clone().into())],
            )?;
            if !tty && !quiet {
                let short: Vec<String> = v
                    .iter()
                    .filter(|(k, _)| k.starts_with("loss"))
                    .map(|(k, x)| format!("{k} {x:.4}"))
                    .collect();
                eprintln!(
                    "iter {iter}/{stop_at} lr {lr_now:.3e} {} ({:.2} s/it){skipped_note}",
                    short.join(" "),
                    dt / n_sum as f64
                );
            }
            sums.clear();
            phase = [0.0; 5];
            n_sum = 0;
            n_loss = 0;
            skipped_in_interval = 0;
            nonfinite_in_interval = 0;
            t_log = Instant::now();
            if is_main {
                plot_curves(&curves, &cfg.name, &log.train, &log.val).ok();
            }
        }
        let ck = cfg.runtime.checkpoint_interval;
        if is_main && ck > 0 && iter.is_multiple_of(ck) && iter < stop_at {
            last_weights = Some(save(task, &opt, &scaler, iter)?);
        }
        let ev = cfg.runtime.eval_interval;
        // Under data parallel every rank evaluates its share; rank 0 gets the metrics.
        if !opts.no_eval && ev > 0 && iter.is_multiple_of(ev) && iter < stop_at {
            metrics = run_eval(task, &work_dir, iter, &mut log, &pb, quiet, is_main)?;
            if is_main {
                keep_best(cfg, task, &card, &work_dir, &metrics, iter, &pb, quiet)?;
                plot_curves(&curves, &cfg.name, &log.train, &log.val).ok();
            }
            t_log = Instant::now();
        }
    }
    pb.finish_and_clear();
    if is_main && (iter > start || last_weights.is_none()) {
        last_weights = Some(save(task, &opt, &scaler, iter)?);
    }
    if interrupted {
        say(format!(
            "interrupted at iteration {iter}: checkpoint {} saved; continue with --resume auto",
            last_weights.as_ref().unwrap().display()
        ));
    } else if !opts.no_eval {
        metrics = run_eval(task, &work_dir, iter, &mut log, &pb, quiet, is_main)?;
        if is_main {
            keep_best(cfg, task, &card, &work_dir, &metrics, iter, &pb, quiet)?;
        }
    }
    if is_main {
        plot_curves(&curves, &cfg.name, &log.train, &log.val).ok();
    }
    Ok(Summary {
        iter,
        work_dir,
        weights: last_weights,
        metrics,
        seconds: t0.elapsed().as_secs_f64(),
        interrupted,
        skipped_images,
    })
}

/// Global sample index of each image of this rank's batch (rank r of a world of w with k images
/// each holds samples r*k .. r*k+k of the global batch): the key of every random draw inside
/// the model, so a draw does not depend on how the global batch is split.
fn sample_keys(per_rank: usize, dp: Option<&DataParallel>) -> Vec<u64> {
    let first = dp.map_or(0, |d| d.rank() * per_rank);
    (first..first + per_rank).map(|i| i as u64).collect()
}

/// Refuse to resume what cannot continue: a checkpoint of another config or model (another
/// config name; another architecture, backbone or class count in the config.toml next to the
/// checkpoint), or another batch size (images per step: the lr and the data position are counted
/// in them). A dataset that gained or lost images is not refused (see `data_ipe` in [`train`]).
fn refuse_incompatible_resume(
    cfg: &Config,
    st: &ResumeState,
    dir: &Path,
    world: u64,
) -> Result<()> {
    let what = dir.join(&st.weights);
    if st.config_name != cfg.name {
        bail!(
            "{} was written by config {:?}, this run is {:?}: a checkpoint resumes only the run of its own model (use --pretrained or a new work dir to start another)",
            what.display(),
            st.config_name,
            cfg.name
        );
    }
    let Ok(old) = Config::load(&dir.join("config.toml")) else {
        return Ok(());
    };
    let (a, b) = (&old.model, &cfg.model);
    let mut changed = Vec::new();
    if a.arch() != b.arch() {
        changed.push(format!("model.arch {:?} -> {:?}", a.arch(), b.arch()));
    }
    let describe = |m: &super::config::ModelConfig| {
        let (depths, dims) = m.depths_dims();
        format!(
            "{} {depths:?}/{dims:?}",
            m.backbone_name().unwrap_or("convnext")
        )
    };
    if describe(a) != describe(b) {
        changed.push(format!("backbone {} -> {}", describe(a), describe(b)));
    }
    if a.num_classes() != b.num_classes() {
        changed.push(format!(
            "number of classes {} -> {}",
            a.num_classes(),
            b.num_classes()
        ));
    }
    // The global batch (images per step over all ranks): the lr and the data position are
    // counted in it. How it is split over ranks may change: a 2-rank run with batch 1 resumes
    // on 1 process with batch 2 and continues the same global sample order.
    let global = |c: &Config, w: u64| c.data.batch_size as u64 * w;
    if global(&old, st.world_size) != global(cfg, world) {
        changed.push(format!(
            "global batch {} -> {} (data.batch_size {} -> {}, ranks {} -> {world})",
            global(&old, st.world_size),
            global(cfg, world),
            old.data.batch_size,
            cfg.data.batch_size,
            st.world_size
        ));
    }
    if old.runtime.grad_accum != cfg.runtime.grad_accum {
        changed.push(format!(
            "runtime.grad_accum {} -> {}",
            old.runtime.grad_accum, cfg.runtime.grad_accum
        ));
    }
    if !changed.is_empty() {
        bail!(
            "cannot resume {}: {} changed since the checkpoint ({}); only the dataset may change on resume",
            what.display(),
            changed.join(", "),
            dir.join("config.toml").display()
        );
    }
    Ok(())
}

/// The metric a task's best checkpoint is chosen by: COCO box AP for detection, mIoU for
/// segmentation (what the paper's tables report first).
pub fn best_metric(cfg: &Config) -> &'static str {
    match cfg.task {
        Task::Det => "bbox_mAP",
        Task::Seg => "mIoU",
    }
}

/// After an evaluation: keep `best_<metric>.safetensors` when the metric improved.
#[allow(clippy::too_many_arguments)]
fn keep_best(
    cfg: &Config,
    task: &dyn TrainTask,
    card: &checkpoint::ModelCard,
    work_dir: &Path,
    metrics: &BTreeMap<String, f64>,
    iter: u64,
    pb: &ProgressBar,
    quiet: bool,
) -> Result<()> {
    let metric = best_metric(cfg);
    if let Some(b) = checkpoint::update_best(
        work_dir,
        metric,
        metrics,
        iter,
        || named_weights(task),
        card,
    )? {
        if !quiet {
            pb.println(format!(
                "best {metric} {:.4} at iteration {iter}: best_{metric}.safetensors",
                b.value
            ));
        }
    }
    Ok(())
}

fn run_eval(
    task: &mut dyn TrainTask,
    work_dir: &Path,
    iter: u64,
    log: &mut RunLog,
    pb: &ProgressBar,
    quiet: bool,
    is_main: bool,
) -> Result<BTreeMap<String, f64>> {
    let t = Instant::now();
    let dir = work_dir.join("eval").join(format!("iter_{iter:07}"));
    if is_main {
        std::fs::create_dir_all(&dir)?;
    }
    let m = tch::no_grad(|| task.evaluate(&dir))?;
    if !is_main {
        return Ok(m);
    }
    let secs = t.elapsed().as_secs_f64();
    log.log("val", iter, &m, &[("eval_seconds", secs.into())])?;
    if !quiet {
        let s: Vec<String> = m
            .iter()
            .filter(|(k, _)| !k.ends_with("_s") && !k.ends_with("_m") && !k.ends_with("_l"))
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        let line = format!("eval @ iter {iter} ({secs:.1} s): {}", s.join(", "));
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    }
    Ok(m)
}

/// All variables of the task's model under their checkpoint names (name order).
pub fn named_weights(task: &dyn TrainTask) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = task.var_store().variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Copy a weights file into the task's variables; every variable must be present.
pub fn load_weights(task: &dyn TrainTask, path: &Path) -> Result<()> {
    let src: BTreeMap<String, Tensor> = checkpoint::load_tensors(path)?.into_iter().collect();
    let vars = task.var_store().variables();
    tch::no_grad(|| -> Result<()> {
        for (n, mut t) in vars {
            let s = src
                .get(&n)
                .with_context(|| format!("{}: missing {n}", path.display()))?;
            if s.size() != t.size() {
                bail!(
                    "{}: {n} has shape {:?}, model {:?}",
                    path.display(),
                    s.size(),
                    t.size()
                );
            }
            t.copy_(s);
        }
        Ok(())
    })
}
