//! `cnx train --nproc-per-node 2` with real processes (Gloo on the CPU), as a user runs it on
//! `cnx data synth` sets: 2 ranks x 1 image train as 1 process x 2 images (losses and weights),
//! only rank 0 writes the work dir, a 2-rank checkpoint resumes on 1 process with the same
//! global sample order, a killed rank stops the run with a message naming it, and a process
//! killed at any point resumes to the weights of an uninterrupted run.
//!
//! Every run uses 1 thread and 1 loader worker per process, so 2 ranks fit 2 cores, and small
//! images with few steps: the whole file takes well under a minute.
//!
//! Conditioning of the comparisons (measured on this data, seed 0, 1 thread per process):
//! - `optimizer.eps=1e-3` (1e-2 for Cascade): AdamW's update is lr * m / (sqrt(v) + eps), so
//!   with the default eps (1e-8) a parameter whose gradient is float noise (a bias or conv in
//!   front of a BatchNorm, whose true gradient is ~0 but whose per-rank partial gradients are
//!   not) takes a full +-lr step whose sign is the noise's, and 1 process and 2 ranks (other
//!   summation orders) then differ by ~lr on it. A larger eps turns a noise-level gradient into
//!   a noise-level step while a real gradient still moves a weight by ~lr, so the comparison
//!   stays sharp for a wrong gradient, sample or batch split and blind to rounding.
//! - `schedule.warmup_iters=0`: the first steps run at the full lr, so a wrong step is far above
//!   the tolerance rather than hidden by warmup's 1e-3 factor.
//! - Cascade: also `optimizer.lr=5e-4`. Its training is chaotic at the preset lr: a 1-process
//!   run whose lr is changed by 5e-7 relative (a no-op up to rounding) already differs by 3e-4
//!   in its losses at iteration 3 for some seeds (a RoI crossing an IoU threshold, a ReLU
//!   flipping), and 2 ranks vs 1 process differ the same way. Smaller steps keep iteration 3 in
//!   the range where rounding cannot flip a discrete decision.
//! - BatchNorm running statistics (buffers, not trained weights) are compared at 1e-4 relative:
//!   the running variance (~3) carries ~1e-5 of rounding noise (1 process at 1 vs 2 threads
//!   already differs by 1e-5 on UperNet's PSP running_var). Trained weights: 1e-5 absolute.

mod common;

use common::{cnx, stderr, tmp};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DET: &str = "demo_mask_rcnn_convnext_nano";
const CASCADE: &str = "demo_cascade_mask_rcnn_convnext_nano";
const SEG: &str = "demo_upernet_convnext_nano";

fn synth(kind: &str, out: &Path, images: usize) {
    let o = cnx(&[
        "data",
        "synth",
        kind,
        "--out",
        out.to_str().unwrap(),
        "--images",
        &images.to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The arguments of `cnx train PRESET` on the data at `root`, into `work`: 1 thread and 1 loader
/// worker per process, log every iteration, no evaluation, `extra` last (so it overrides).
/// `optimizer.eps=1e-3` unless `extra` sets it (see the top of the file).
fn train_args(preset: &str, root: &Path, work: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["train".into(), preset.into()];
    let sets = [
        format!("data.root={}", root.display()),
        "runtime.threads=1".into(),
        "data.workers=1".into(),
        "runtime.log_interval=1".into(),
        "schedule.warmup_iters=0".into(),
        "optimizer.eps=1e-3".into(),
    ];
    for s in sets {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(
        [
            "--work-dir",
            work.to_str().unwrap(),
            "--device",
            "cpu",
            "--no-eval",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn train(preset: &str, root: &Path, work: &Path, extra: &[&str]) -> std::process::Output {
    let a = train_args(preset, root, work, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    cnx(&a)
}

/// `train`, which must succeed.
fn train_ok(preset: &str, root: &Path, work: &Path, extra: &[&str]) {
    let o = train(preset, root, work, extra);
    assert!(
        o.status.success(),
        "cnx train {extra:?} into {}:\n{}",
        work.display(),
        stderr(&o)
    );
}

fn log_lines(work: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(work.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The training records of a log: iteration and loss terms (`loss*` keys).
fn train_losses(work: &Path) -> Vec<(u64, BTreeMap<String, f64>)> {
    log_lines(work)
        .iter()
        .filter(|v| v["mode"] == "train")
        .map(|v| {
            let terms = v
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with("loss"))
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                .collect();
            (v["iter"].as_u64().unwrap(), terms)
        })
        .collect()
}

/// Largest relative difference of the logged losses of two runs (same iterations, same terms).
fn max_loss_rel_diff(a: &Path, b: &Path) -> f64 {
    let (la, lb) = (train_losses(a), train_losses(b));
    assert_eq!(la.len(), lb.len(), "{la:?}\n{lb:?}");
    let mut worst = 0.0f64;
    for ((ia, ta), (ib, tb)) in la.iter().zip(&lb) {
        assert_eq!(ia, ib);
        assert_eq!(
            ta.keys().collect::<Vec<_>>(),
            tb.keys().collect::<Vec<_>>(),
            "iteration {ia}"
        );
        assert!(ta.len() > 1, "iteration {ia}: no loss terms logged: {ta:?}");
        for (k, x) in ta {
            let y = tb[k];
            let rel = (x - y).abs() / x.abs().max(y.abs()).max(1e-12);
            assert!(
                rel <= 1e-5,
                "iteration {ia}: {k} {x} vs {y} ({rel:.2e} relative)"
            );
            worst = worst.max(rel);
        }
    }
    worst
}

fn weights(p: &Path) -> BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .collect()
}

/// Running statistics of BatchNorm layers: buffers, not trained weights.
fn is_running_stat(name: &str) -> bool {
    name.contains("running_mean") || name.contains("running_var")
}

/// How two weights files (the same names and shapes) differ: the largest absolute difference
/// of the trained weights and of the BatchNorm running statistics relative to
/// max(1, |value|), each with the tensor it is in.
#[derive(Debug)]
struct WeightDiff {
    weights: (f64, String),
    running: (f64, String),
}

fn weight_diff(a: &Path, b: &Path) -> WeightDiff {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(
        wa.keys().collect::<Vec<_>>(),
        wb.keys().collect::<Vec<_>>(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    let mut d = WeightDiff {
        weights: (0.0, String::new()),
        running: (0.0, String::new()),
    };
    for (k, x) in &wa {
        let y = &wb[k];
        assert_eq!(x.size(), y.size(), "{k}");
        if x.numel() == 0 {
            continue;
        }
        let (x, y) = (x.to_kind(tch::Kind::Double), y.to_kind(tch::Kind::Double));
        let diff = (&x - &y).abs();
        let (v, worst) = if is_running_stat(k) {
            let scale = x.abs().clamp_min(1.0);
            ((diff / scale).max().double_value(&[]), &mut d.running)
        } else {
            (diff.max().double_value(&[]), &mut d.weights)
        };
        assert!(v.is_finite(), "{k}: {v}");
        if v > worst.0 {
            *worst = (v, k.clone());
        }
    }
    d
}

/// Trained weights within 1e-5 absolute, running statistics within 1e-4 relative (see the
/// top of the file); returns the largest weight difference.
fn assert_weights_close(a: &Path, b: &Path, what: &str) -> f64 {
    let d = weight_diff(a, b);
    eprintln!("{what}: {d:?}");
    assert!(
        d.weights.0 <= 1e-5 && d.running.0 <= 1e-4,
        "{what}: {} and {} differ: {d:?}",
        a.display(),
        b.display()
    );
    d.weights.0
}

fn ckpt(work: &Path, iter: u64) -> PathBuf {
    work.join(format!("iter_{iter:07}.safetensors"))
}

fn latest(work: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(work.join("latest.json")).unwrap()).unwrap()
}

fn dir_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// One run of 2 ranks x 1 image and one of 1 process x 2 images, 3 steps each: the same logged
/// losses and final weights, and the 2-rank work dir holds what the 1-process one does, written
/// once (rank 0 alone).
fn two_ranks_equal_one_process(preset: &str, root: &Path, d: &Path, extra: &[&str]) {
    let (one, two) = (d.join("one"), d.join("two"));
    let mut a = extra.to_vec();
    a.extend(["--stop-at", "3", "--set", "data.batch_size=2"]);
    train_ok(preset, root, &one, &a);
    let mut b = extra.to_vec();
    b.extend([
        "--stop-at",
        "3",
        "--set",
        "data.batch_size=1",
        "--nproc-per-node",
        "2",
    ]);
    train_ok(preset, root, &two, &b);

    let rel = max_loss_rel_diff(&one, &two);
    let w = assert_weights_close(&ckpt(&one, 3), &ckpt(&two, 3), preset);
    eprintln!("{preset} {extra:?}: max loss difference {rel:e} relative, weights {w:e}");

    // Rank 0 alone wrote: one log with iterations 1, 2, 3 once each, and the same files as the
    // 1-process run (one checkpoint, no leftovers of a second writer).
    let iters: Vec<u64> = train_losses(&two).iter().map(|(i, _)| *i).collect();
    assert_eq!(iters, [1, 2, 3], "{:?}", log_lines(&two));
    assert_eq!(dir_names(&two), dir_names(&one));
    let ckpts: Vec<String> = dir_names(&two)
        .into_iter()
        .filter(|n| n.starts_with("iter_"))
        .collect();
    assert_eq!(
        ckpts,
        [
            "iter_0000003.optim.safetensors",
            "iter_0000003.safetensors",
            "iter_0000003.state.json"
        ]
    );
    let st = latest(&two);
    assert_eq!(
        (st["iter"].as_u64(), st["world_size"].as_u64()),
        (Some(3), Some(2))
    );
}

#[test]
fn two_ranks_train_as_one_process_mask_rcnn_with_drop_path() {
    let d = tmp("dist-mask-rcnn");
    let data = d.join("data");
    synth("coco", &data, 20);
    // Drop path draws per sample: keyed by the global sample index, the draws are the same
    // however the batch is split.
    two_ranks_equal_one_process(
        DET,
        &data,
        &d,
        &[
            "--set",
            "data.img_scale=[128, 128]",
            "--set",
            "model.backbone.drop_path_rate=0.3",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn two_ranks_train_as_one_process_cascade_with_sync_bn() {
    let d = tmp("dist-cascade");
    let data = d.join("data");
    synth("coco", &data, 20);
    // The box heads' ConvModules are SyncBN under data parallel.
    two_ranks_equal_one_process(
        CASCADE,
        &data,
        &d,
        &[
            "--set",
            "data.img_scale=[128, 128]",
            // Well-conditioned steps (see the top of the file).
            "--set",
            "optimizer.eps=1e-2",
            "--set",
            "optimizer.lr=5e-4",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn two_ranks_train_as_one_process_upernet() {
    let d = tmp("dist-upernet");
    let data = d.join("data");
    synth("ade", &data, 10);
    // Random crops of resized images (per-sample draws in the loader) and dropout in the head.
    two_ranks_equal_one_process(
        SEG,
        &data,
        &d,
        &[
            "--set",
            "data.img_scale=[96, 96]",
            "--set",
            "data.crop_size=[64, 64]",
            "--set",
            "model.backbone.drop_path_rate=0.3",
        ],
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn two_rank_checkpoint_resumes_on_one_process_in_the_same_sample_order() {
    let d = tmp("dist-resume");
    let data = d.join("data");
    synth("coco", &data, 20);
    let base = [
        "--set",
        "data.img_scale=[128, 128]",
        "--set",
        "runtime.max_iters=4",
        "--set",
        "model.backbone.drop_path_rate=0.3",
    ];
    let with = |more: &[&'static str]| -> Vec<&'static str> {
        let mut v = base.to_vec();
        v.extend_from_slice(more);
        v
    };

    // Reference: 1 process x 2 images, 4 iterations uninterrupted.
    let reference = d.join("reference");
    train_ok(
        DET,
        &data,
        &reference,
        &with(&["--set", "data.batch_size=2"]),
    );

    // 2 ranks x 1 image stopped at 2: the run's end writes the checkpoint at 2.
    let work = d.join("work");
    train_ok(
        DET,
        &data,
        &work,
        &with(&[
            "--set",
            "data.batch_size=1",
            "--nproc-per-node",
            "2",
            "--stop-at",
            "2",
        ]),
    );
    let st = latest(&work);
    assert_eq!(
        (st["iter"].as_u64(), st["world_size"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(ckpt(&work, 2).exists());

    // Another global batch is refused, naming it: 1 process x 1 image (2 -> 1) ...
    let o = train(
        DET,
        &data,
        &work,
        &with(&["--set", "data.batch_size=1", "--resume", "auto"]),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "resume with batch 1 must fail:\n{err}");
    assert!(
        err.contains("global batch 2 -> 1") && err.contains("ranks 2 -> 1"),
        "{err}"
    );
    // ... and 2 ranks x 2 images (2 -> 4).
    let o = train(
        DET,
        &data,
        &work,
        &with(&[
            "--set",
            "data.batch_size=2",
            "--nproc-per-node",
            "2",
            "--resume",
            "auto",
        ]),
    );
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "resume with batch 2x2 must fail:\n{err}"
    );
    assert!(err.contains("global batch 2 -> 4"), "{err}");
    // The refusals left the checkpoint as it was.
    assert_eq!(latest(&work)["iter"], 2);

    // 1 process x 2 images continues at iteration 2 of the same global order to 4.
    train_ok(
        DET,
        &data,
        &work,
        &with(&["--set", "data.batch_size=2", "--resume", "auto"]),
    );
    assert_eq!(latest(&work)["iter"], 4);
    let iters: Vec<u64> = train_losses(&work).iter().map(|(i, _)| *i).collect();
    assert_eq!(iters, [1, 2, 3, 4]);
    let rel = max_loss_rel_diff(&reference, &work);
    let w = assert_weights_close(
        &ckpt(&reference, 4),
        &ckpt(&work, 4),
        "2 ranks to 2, then 1 process to 4",
    );
    eprintln!("resume 2 ranks -> 1 process: max loss difference {rel:e} relative, weights {w:e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Pids of the children of `pid` (all its threads' children).
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                v.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// The `RANK` in a process's environment.
fn rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"RANK="))
        .and_then(|r| std::str::from_utf8(r).ok()?.parse().ok())
}

/// Whether `pid` still runs (a zombie waiting for its new parent to reap it does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

fn sigkill(pid: u32) {
    let o = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .expect("run kill");
    assert!(o.status.success(), "kill -9 {pid}: {}", stderr(&o));
}

/// `cnx train` in the background, stdout and stderr to files in `d` (a pipe nobody reads could
/// fill and block it).
fn spawn_train(args: &[String], d: &Path, name: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(d.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(d.join(format!("{name}.err"))).unwrap())
        .spawn()
        .expect("start cnx train")
}

/// Wait until `cond` holds, polling every 10 ms; false after `limit`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Whatever latest.json names is a complete checkpoint: weights and optimizer files that read
/// in full, and the state file.
fn assert_latest_complete(work: &Path) {
    if !work.join("latest.json").exists() {
        return;
    }
    let st = latest(work);
    for k in ["weights", "optimizer"] {
        let f = work.join(st[k].as_str().unwrap());
        assert!(!weights(&f).is_empty(), "{}", f.display());
    }
    let state = work.join(format!(
        "iter_{:07}.state.json",
        st["iter"].as_u64().unwrap()
    ));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(s, st);
}

#[test]
fn killing_one_rank_stops_the_other_naming_it() {
    let d = tmp("dist-kill-rank");
    let data = d.join("data");
    synth("coco", &data, 20);
    let work = d.join("work");
    std::fs::create_dir_all(&d).unwrap();
    let args = train_args(
        DET,
        &data,
        &work,
        &[
            "--set",
            "data.img_scale=[128, 128]",
            "--set",
            "data.batch_size=1",
            "--set",
            "runtime.max_iters=400",
            "--set",
            "runtime.checkpoint_interval=3",
            "--nproc-per-node",
            "2",
        ],
    );
    let mut launcher = spawn_train(&args, &d, "launcher");
    let pid = launcher.id();
    let err = || std::fs::read_to_string(d.join("launcher.err")).unwrap_or_default();
    // Running, with a checkpoint written (iteration 3) for latest.json to name.
    let logged = wait_for(Duration::from_secs(120), || {
        work.join("latest.json").exists() || matches!(launcher.try_wait(), Ok(Some(_)))
    });
    assert!(
        logged && launcher.try_wait().unwrap().is_none(),
        "no checkpoint written:\n{}",
        err()
    );
    assert!(!train_losses(&work).is_empty());
    let ranks: Vec<(u32, Option<usize>)> =
        children(pid).into_iter().map(|c| (c, rank_of(c))).collect();
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let rank1 = ranks.iter().find(|(_, r)| *r == Some(1)).unwrap().0;
    let rank0 = ranks.iter().find(|(_, r)| *r == Some(0)).unwrap().0;
    sigkill(rank1);
    let t = Instant::now();
    let exited = wait_for(Duration::from_secs(60), || {
        matches!(launcher.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = launcher.kill();
        sigkill(rank0);
        let _ = launcher.wait();
        panic!(
            "the launcher still runs 60 s after rank 1 was killed:\n{}",
            err()
        );
    }
    let status = launcher.wait().unwrap();
    let took = t.elapsed();
    let err = err();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("rank 1") && err.contains("killed by signal 9"),
        "the launcher's message names rank 1 and its signal:\n{err}"
    );
    // Rank 0 was stopped with the launcher, not left to wait for its collective's timeout.
    assert!(
        wait_for(Duration::from_secs(5), || !alive(rank0)),
        "rank 0 (pid {rank0}) still runs"
    );
    assert!(!alive(rank1));
    assert_latest_complete(&work);
    eprintln!(
        "launcher exited {status} {:.2} s after rank 1 was killed; latest checkpoint: {:?}",
        took.as_secs_f64(),
        work.join("latest.json")
            .exists()
            .then(|| latest(&work)["iter"].clone())
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// A delay in [0, `max_ms`) ms from the system clock's nanoseconds (no rand dependency).
fn clock_delay(max_ms: u64) -> Duration {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(ns % max_ms)
}

#[test]
fn process_killed_at_a_random_point_resumes_to_the_uninterrupted_weights() {
    let d = tmp("dist-kill-resume");
    let data = d.join("data");
    synth("coco", &data, 20);
    std::fs::create_dir_all(&d).unwrap();
    let extra = [
        "--set",
        "data.img_scale=[128, 128]",
        "--set",
        "data.batch_size=2",
        "--set",
        "runtime.max_iters=10",
        "--set",
        "runtime.checkpoint_interval=2",
        "--set",
        "model.backbone.drop_path_rate=0.3",
    ];
    let reference = d.join("reference");
    train_ok(DET, &data, &reference, &extra);

    let work = d.join("work");
    let mut child = spawn_train(&train_args(DET, &data, &work, &extra), &d, "killed");
    // After the first checkpoint (latest.json appears), a random delay: the kill lands in an
    // iteration, in a checkpoint write, or after the end; every case must resume exactly.
    let ck = wait_for(Duration::from_secs(120), || {
        work.join("latest.json").exists() || matches!(child.try_wait(), Ok(Some(_)))
    });
    assert!(ck, "no checkpoint written");
    let delay = clock_delay(1200);
    std::thread::sleep(delay);
    let still_running = child.try_wait().unwrap().is_none();
    let at = latest(&work)["iter"].clone();
    if still_running {
        sigkill(child.id());
    }
    let st = child.wait().unwrap();
    eprintln!(
        "killed {} ms after the first checkpoint ({}; latest.json at iteration {at} then, {} now)",
        delay.as_millis(),
        if still_running {
            st.to_string()
        } else {
            "had finished".into()
        },
        latest(&work)["iter"]
    );
    assert_latest_complete(&work);

    let mut resume = extra.to_vec();
    resume.extend(["--resume", "auto"]);
    train_ok(DET, &data, &work, &resume);
    assert_eq!(latest(&work)["iter"], 10);
    let w = assert_weights_close(
        &ckpt(&reference, 10),
        &ckpt(&work, 10),
        "killed and resumed",
    );
    eprintln!("killed and resumed: max weight difference {w:e}");
    std::fs::remove_dir_all(&d).unwrap();
}
