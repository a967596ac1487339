//! Elastic restart with real processes: `cnx train --nproc-per-node 2 --max-restarts 1` (Gloo on
//! 127.0.0.1) survives a rank killed with SIGKILL after the first checkpoint: the launcher names
//! the rank, restarts the group from the last complete checkpoint, and the run ends with the
//! same weights as an uninterrupted one (the randomness is keyed, so this is exact).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn args(data: &Path, work: &Path) -> Vec<String> {
    [
        "train",
        "demo_mask_rcnn_convnext_nano",
        "--set",
        &format!("data.root={}", data.display()),
        "--set",
        "data.img_scale=[128, 128]",
        "--set",
        "data.batch_size=1",
        "--set",
        "runtime.threads=1",
        "--set",
        "data.workers=1",
        "--set",
        "runtime.checkpoint_interval=2",
        "--set",
        "runtime.keep_checkpoints=0",
        "--device",
        "cpu",
        "--stop-at",
        "16",
        "--no-eval",
        "--nproc-per-node",
        "2",
        "--work-dir",
        work.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The direct children of `pid` (Linux /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn rank_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("RANK=").map(str::to_string))
}

fn weights(p: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::read_safetensors(p).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn a_killed_rank_restarts_the_group_from_the_last_checkpoint_with_the_same_result() {
    let d = tmp("elastic");
    let data = d.join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(["data", "synth", "coco", "--images", "20", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success());

    let plain = d.join("plain");
    let o = Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(args(&data, &plain))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let work = d.join("elastic");
    let mut a = args(&data, &work);
    a.extend(["--max-restarts".to_string(), "1".to_string()]);
    let launcher = Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill rank 1 once the first checkpoint is complete (latest.json is written last).
    let t0 = Instant::now();
    while !work.join("latest.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = children(launcher.id())
        .into_iter()
        .find(|&c| rank_of(c).as_deref() == Some("1"))
        .expect("rank 1 running");
    let k = Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("rank 1 of 2 failed (killed by signal 9)") && err.contains("restart 1 of 1"),
        "{err}"
    );
    assert!(err.contains("resumed from"), "{err}");

    let (a, b) = (
        weights(&plain.join("iter_0000016.safetensors")),
        weights(&work.join("iter_0000016.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after the restart");
    }
    let _ = std::fs::remove_dir_all(&d);
}
