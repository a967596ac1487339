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
    let mut run = Run::set_up(cfg, task, device, opts, dp.as_deref())?;
    while run.iter < run.stop_at {
        if run.stop_requested(dp.as_deref())? {
            run.interrupted = true;
            break;
        }
        let step = run.step(task, dp.as_deref_mut())?;
        run.record(task, &step, dp.is_some())?;
        run.checkpoint_and_evaluate(task)?;
    }
    run.finish(task)
}

/// One training run between set-up and finish: what set-up fixed (schedule, batch, precision,
/// the model card), the optimizer and loss scaler, the log and progress bar, and the position.
struct Run<'a> {
    cfg: &'a Config,
    opts: &'a RunOptions,
    device: Device,
    t0: Instant,
    work_dir: PathBuf,
    is_main: bool,
    world: usize,
    quiet: bool,
    accum: u64,
    /// Iterations per epoch of the data as it is now (the data position: epoch = iteration /
    /// data_ipe).
    data_ipe: u64,
    /// Iterations per epoch of the schedule (lr steps, the length of an epoch-counted run, the
    /// log's epoch). It differs from `data_ipe` only when resuming a run whose dataset has
    /// changed since: the schedule keeps counting in the checkpoint's epochs, so the lr goes on
    /// as before and the run ends at the same iteration, while the data position is recomputed
    /// over the new data (the interrupted epoch continues at the same iteration of the new
    /// data's order, every later epoch is a full pass over the new data). Both depend on the
    /// iteration alone, so a later resume of the changed run stays exact; the checkpoint keeps
    /// the schedule's count.
    ipe: u64,
    stop_at: u64,
    schedule: Schedule,
    /// Images per batch over all ranks (the global batch; each rank runs `ipb / world`).
    ipb: usize,
    amp_mode: Amp,
    device_label: String,
    /// What every weights file says about its model: the config and the classes.
    card: checkpoint::ModelCard,
    curves: PathBuf,
    opt: AdamW,
    scaler: LossScaler,
    /// The gradients the ranks average, in one fixed order (name order, as the optimizer's).
    dp_params: Vec<Tensor>,
    log: RunLog,
    pb: ProgressBar,
    tty: bool,
    interval: Interval,
    iter: u64,
    epoch: u64,
    start: u64,
    last_weights: Option<PathBuf>,
    metrics: BTreeMap<String, f64>,
    interrupted: bool,
    skipped_images: Vec<String>,
}

/// What one iteration produced.
struct Step {
    /// Loss terms, mean over ranks and micro-batches (empty terms when the step was lost).
    terms: BTreeMap<String, f64>,
    /// First non-finite loss term (fp16 loss scaling only: otherwise the run stops).
    bad_loss: Option<(String, f64)>,
    outcome: StepOutcome,
}

/// Seconds per phase over the log interval: waiting for data, forward (without the wait),
/// backward, the gradient all-reduce (data parallel), the optimizer step. Host-side times: on
/// CUDA, kernels still queued at a phase's end are counted by the phase that waits.
const PHASES: [&str; 5] = [
    "data_time",
    "forward_time",
    "backward_time",
    "sync_time",
    "optimizer_time",
];

/// Sums over the current log interval.
struct Interval {
    sums: BTreeMap<String, f64>,
    phase: [f64; 5],
    /// Iterations in the interval, and those of them whose loss terms count (a step skipped
    /// for a non-finite loss has none).
    n_sum: u64,
    n_loss: u64,
    skipped: u64,
    nonfinite: u64,
    since: Instant,
}

impl Interval {
    fn new() -> Self {
        Self {
            sums: BTreeMap::new(),
            phase: [0.0; 5],
            n_sum: 0,
            n_loss: 0,
            skipped: 0,
            nonfinite: 0,
            since: Instant::now(),
        }
    }
}

impl<'a> Run<'a> {
    /// Check the work dir and the checkpoint to resume, write config.toml, build the optimizer
    /// groups and loss scaler, restore or initialise the weights (pretrained backbone, the
    /// broadcast of rank 0's), open the log and position the data.
    fn set_up(
        cfg: &'a Config,
        task: &mut dyn TrainTask,
        device: Device,
        opts: &'a RunOptions,
        dp: Option<&DataParallel>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let work_dir = cfg.work_dir();
        let is_main = dp.is_none_or(|d| d.is_main());
        let world = dp.map_or(1, |d| d.world());
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
        let data_ipe = (task.batches_per_epoch() / accum).max(1);
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
        let params: BTreeMap<String, Tensor> = task
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
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
        // The checkpoint resumed from, when it lives in this work dir: a run that stops before
        // its first iteration (e.g. `--resume auto --stop-at N` to evaluate at N) does not
        // rewrite it.
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
        if let Some(d) = dp {
            // Every rank loaded the same files; the broadcast also makes random initialisation
            // equal.
            d.broadcast_state(task.var_store())?;
            say(format!(
                "data parallel: {} ranks ({}), rank 0 writes {}",
                world,
                d.pg.backend(),
                work_dir.display()
            ));
        }
        let card = checkpoint::ModelCard {
            config: Some(cfg.to_toml()?),
            classes: task.class_names(),
            category_ids: task.category_ids(),
        };
        let log = if is_main {
            RunLog::open(&work_dir, Some(start))?
        } else {
            RunLog::in_memory()
        };

        let epoch = start / data_ipe;
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
        Ok(Self {
            cfg,
            opts,
            device,
            t0,
            curves: work_dir.join("curves.png"),
            work_dir,
            is_main,
            world,
            quiet,
            accum,
            data_ipe,
            ipe,
            stop_at,
            schedule,
            ipb,
            amp_mode,
            device_label: crate::device::label(device),
            card,
            opt,
            scaler,
            dp_params,
            log,
            pb,
            tty,
            interval: Interval::new(),
            iter: start,
            epoch,
            start,
            last_weights: resumed_here,
            metrics: BTreeMap::new(),
            interrupted: false,
            skipped_images: Vec::new(),
        })
    }

    /// Ctrl-C was pressed (on any rank: all ranks agree, so they stop at the same iteration).
    fn stop_requested(&self, dp: Option<&DataParallel>) -> Result<bool> {
        let stop = INTERRUPTED.load(Ordering::SeqCst);
        match dp {
            Some(d) => d.any(stop),
            None => Ok(stop),
        }
    }

    /// Print a line above the progress bar (or plainly when there is none).
    fn println(&self, line: String) {
        if self.quiet {
            return;
        }
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }

    fn last_good(&self) -> String {
        self.last_weights
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none (no checkpoint written yet)".into())
    }

    /// One optimizer step: reseed, set the lr, forward + backward each micro-batch, average the
    /// gradients over ranks, then unscale / clip / step (or skip a step lost to a non-finite
    /// fp16 loss). A non-finite loss without loss scaling stops the run before the bad step
    /// reaches the weights.
    fn step(&mut self, task: &mut dyn TrainTask, dp: Option<&mut DataParallel>) -> Result<Step> {
        let (cfg, iter, accum) = (self.cfg, self.iter, self.accum);
        if iter / self.data_ipe != self.epoch {
            self.epoch = iter / self.data_ipe;
            task.seek(self.epoch, 0)?;
        }
        tch::manual_seed(iteration_seed(cfg.runtime.seed, iter));
        for g in self.opt.groups.iter_mut() {
            g.lr = self.schedule.lr(g.initial_lr, iter);
        }
        self.opt.zero_grad();
        let phase = &mut self.interval.phase;
        let mut terms: BTreeMap<String, f64> = BTreeMap::new();
        let mut bad_loss: Option<(String, f64)> = None;
        for micro in 0..accum {
            let keys = cnx_backbone::replica::BatchKeys {
                seed: cfg.runtime.seed,
                iteration: iter * accum + micro,
                samples: sample_keys(task.images_per_batch(), dp.as_deref()),
            };
            let t_fwd = Instant::now();
            let (device, amp_mode) = (self.device, self.amp_mode);
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
                if !self.scaler.enabled {
                    self.pb.abandon();
                    bail!(
                        "loss term {name} is {v} at iteration {} (epoch {}): training stopped; the last good checkpoint is {}",
                        iter + 1,
                        self.epoch,
                        self.last_good()
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
            (total * (self.scaler.scale / accum as f64)).backward();
            phase[2] += t_bwd.elapsed().as_secs_f64();
        }
        // Gradients averaged once per step (not on accumulation micro-batches), before
        // unscaling / clipping see them; a lost step still all-reduces so the ranks stay paired.
        if let Some(d) = dp {
            let t_sync = Instant::now();
            d.average_gradients(&self.dp_params)?;
            phase[3] += t_sync.elapsed().as_secs_f64();
        }
        let t_opt = Instant::now();
        let outcome = match &bad_loss {
            Some((name, v)) => self.skip_step(name, *v)?,
            None => {
                self.scaler.finite_loss();
                amp::finish_step(&mut self.opt, &mut self.scaler, cfg.runtime.clip_grad_norm)?
            }
        };
        self.interval.phase[4] += t_opt.elapsed().as_secs_f64();
        self.iter += 1;
        self.pb.set_position(self.iter);
        Ok(Step {
            terms,
            bad_loss,
            outcome,
        })
    }

    /// A step lost to a non-finite loss under fp16 loss scaling: back the scale off as
    /// GradScaler does, and stop after too many in a row.
    fn skip_step(&mut self, name: &str, v: f64) -> Result<StepOutcome> {
        let streak = self.scaler.nonfinite_loss();
        self.interval.nonfinite += 1;
        if streak >= MAX_NONFINITE_LOSS_STREAK {
            self.pb.abandon();
            bail!(
                "loss non-finite for {streak} consecutive iterations under fp16 loss scaling (last: {name} = {v} at iteration {}, epoch {}; loss scale now {:e}): training stopped; the last good checkpoint is {}",
                self.iter + 1,
                self.epoch,
                self.scaler.scale,
                self.last_good()
            );
        }
        self.println(format!(
            "iteration {}: loss term {name} is {v}: step skipped, loss scale backed off to {:e} ({streak} in a row; training stops at {MAX_NONFINITE_LOSS_STREAK})",
            self.iter + 1,
            self.scaler.scale
        ));
        Ok(StepOutcome {
            stepped: false,
            grad_norm: f64::NAN,
        })
    }

    /// After a step: name the unreadable images the loader replaced, add the step to the
    /// interval, update the progress bar, and at the end of a log interval write the log line
    /// and the curves.
    fn record(&mut self, task: &mut dyn TrainTask, step: &Step, data_parallel: bool) -> Result<()> {
        let iter = self.iter;
        // Unreadable images the loader replaced: each named once, here and in log.jsonl.
        for b in task.take_broken() {
            self.println(format!(
                "warning: unreadable training image {}: {}; replaced by another image of its aspect group (data.strict = true stops instead)",
                b.file, b.error
            ));
            self.log.event(
                "data",
                iter,
                &[
                    ("skipped_image", b.file.clone().into()),
                    ("error", b.error.into()),
                ],
            )?;
            self.skipped_images.push(b.file);
        }
        let skipped_note = if self.skipped_images.is_empty() {
            String::new()
        } else {
            format!(
                " | {} unreadable images replaced",
                self.skipped_images.len()
            )
        };
        let iv = &mut self.interval;
        if !step.outcome.stepped {
            iv.skipped += 1;
        }
        let total_loss: f64 = step.terms.values().sum();
        if step.bad_loss.is_none() {
            for (k, v) in &step.terms {
                *iv.sums.entry(k.clone()).or_insert(0.0) += v;
            }
            *iv.sums.entry("loss".into()).or_insert(0.0) += total_loss;
            iv.n_loss += 1;
        }
        iv.n_sum += 1;
        let lr_now = self.opt.groups.iter().map(|g| g.lr).fold(0.0, f64::max);
        if self.tty {
            let short: Vec<String> = step
                .terms
                .iter()
                .map(|(k, v)| format!("{} {:.3}", k.trim_start_matches("loss_"), v))
                .collect();
            self.pb.set_message(format!(
                "loss {total_loss:.3} [{}] lr {lr_now:.2e}{skipped_note}",
                short.join(" ")
            ));
        }
        if !(iter.is_multiple_of(self.cfg.runtime.log_interval.max(1)) || iter == self.stop_at) {
            return Ok(());
        }
        let dt = iv.since.elapsed().as_secs_f64();
        let n = iv.n_sum as f64;
        let mut v: BTreeMap<String, f64> = iv
            .sums
            .iter()
            .map(|(k, s)| (k.clone(), s / iv.n_loss.max(1) as f64))
            .collect();
        v.insert("lr".into(), lr_now);
        v.insert("epoch".into(), (iter - 1) as f64 / self.ipe as f64);
        v.insert("time".into(), dt / n);
        for (name, secs) in PHASES.iter().zip(&iv.phase) {
            if *name != "sync_time" || data_parallel {
                v.insert((*name).into(), secs / n);
            }
        }
        v.insert(
            "images_per_s".into(),
            n * self.accum as f64 * self.ipb as f64 / dt.max(1e-9),
        );
        if self.scaler.enabled {
            v.insert("loss_scale".into(), self.scaler.scale);
            v.insert("skipped_steps".into(), iv.skipped as f64);
            v.insert("nonfinite_loss".into(), iv.nonfinite as f64);
        }
        if step.outcome.grad_norm.is_finite() {
            v.insert("grad_norm".into(), step.outcome.grad_norm);
        }
        self.log.log(
            "train",
            iter,
            &v,
            &[("device", self.device_label.clone().into())],
        )?;
        if !self.tty && !self.quiet {
            let short: Vec<String> = v
                .iter()
                .filter(|(k, _)| k.starts_with("loss"))
                .map(|(k, x)| format!("{k} {x:.4}"))
                .collect();
            eprintln!(
                "iter {iter}/{} lr {lr_now:.3e} {} ({:.2} s/it){skipped_note}",
                self.stop_at,
                short.join(" "),
                dt / n
            );
        }
        self.interval = Interval::new();
        if self.is_main {
            plot_curves(&self.curves, &self.cfg.name, &self.log.train, &self.log.val).ok();
        }
        Ok(())
    }

    /// Save a checkpoint and evaluate when their intervals say so (not at the last iteration:
    /// [`Run::finish`] does both there).
    fn checkpoint_and_evaluate(&mut self, task: &mut dyn TrainTask) -> Result<()> {
        let (iter, rt) = (self.iter, &self.cfg.runtime);
        let ck = rt.checkpoint_interval;
        if self.is_main && ck > 0 && iter.is_multiple_of(ck) && iter < self.stop_at {
            self.last_weights = Some(self.save(task)?);
        }
        let ev = rt.eval_interval;
        if !self.opts.no_eval && ev > 0 && iter.is_multiple_of(ev) && iter < self.stop_at {
            self.evaluate(task)?;
            // Evaluation time is not training time.
            self.interval.since = Instant::now();
        }
        Ok(())
    }

    /// Evaluate (under data parallel every rank its share; rank 0 gets the metrics), keep the
    /// best checkpoint and redraw the curves.
    fn evaluate(&mut self, task: &mut dyn TrainTask) -> Result<()> {
        self.metrics = run_eval(
            task,
            &self.work_dir,
            self.iter,
            &mut self.log,
            &self.pb,
            self.quiet,
            self.is_main,
        )?;
        if self.is_main {
            keep_best(
                self.cfg,
                task,
                &self.card,
                &self.work_dir,
                &self.metrics,
                self.iter,
                &self.pb,
                self.quiet,
            )?;
            plot_curves(&self.curves, &self.cfg.name, &self.log.train, &self.log.val).ok();
        }
        Ok(())
    }

    /// Write the weights, the optimizer state and latest.json at the current iteration, and
    /// prune old checkpoints.
    fn save(&self, task: &dyn TrainTask) -> Result<PathBuf> {
        let iter = self.iter;
        let st = ResumeState {
            iter,
            // The data position; `iters_per_epoch` is the schedule's (see `data_ipe`).
            epoch: iter / self.data_ipe,
            iter_in_epoch: iter % self.data_ipe,
            iters_per_epoch: self.ipe,
            seed: self.cfg.runtime.seed,
            optimizer_step: self.opt.step,
            loss_scale: self.scaler.scale,
            scale_growth_tracker: self.scaler.growth_tracker,
            config_name: self.cfg.name.clone(),
            weights: checkpoint::weights_file_name(iter),
            optimizer: checkpoint::optimizer_file_name(iter),
            world_size: self.world as u64,
        };
        let weights = named_weights(task);
        let p = checkpoint::save(
            &self.work_dir,
            &weights,
            &self.card,
            &self.opt.state_tensors(),
            &st,
        )?;
        checkpoint::prune(&self.work_dir, self.cfg.runtime.keep_checkpoints, iter)?;
        Ok(p)
    }

    /// The final checkpoint (or the one Ctrl-C asked for) and the final evaluation.
    fn finish(mut self, task: &mut dyn TrainTask) -> Result<Summary> {
        self.pb.finish_and_clear();
        if self.is_main && (self.iter > self.start || self.last_weights.is_none()) {
            self.last_weights = Some(self.save(task)?);
        }
        if self.interrupted {
            if !self.quiet {
                eprintln!(
                    "interrupted at iteration {}: checkpoint {} saved; continue with --resume auto",
                    self.iter,
                    self.last_good()
                );
            }
        } else if !self.opts.no_eval {
            self.evaluate(task)?;
        }
        if self.is_main {
            plot_curves(&self.curves, &self.cfg.name, &self.log.train, &self.log.val).ok();
        }
        Ok(Summary {
            iter: self.iter,
            work_dir: self.work_dir,
            weights: self.last_weights,
            metrics: self.metrics,
            seconds: self.t0.elapsed().as_secs_f64(),
            interrupted: self.interrupted,
            skipped_images: self.skipped_images,
        })
    }
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
