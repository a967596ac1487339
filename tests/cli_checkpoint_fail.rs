//! A checkpoint write that fails during `cnx train` (here: a directory sits where the state JSON
//! goes, an I/O error root gets too) stops the run with the reason, leaves no partial files and
//! `latest.json` at the previous checkpoint; `--resume auto` then continues from it.

mod common;
use common::{cnx, text};

use std::path::{Path, PathBuf};

fn latest_iter(work: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("latest.json")).unwrap()).unwrap();
    v["iter"].as_u64().unwrap()
}

fn checkpoint_files(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("iter_") || n.starts_with("latest"))
        .collect();
    v.sort();
    v
}

#[test]
fn failed_checkpoint_stops_cleanly_and_resume_continues() {
    let d: PathBuf = std::env::temp_dir().join(format!("cnx-cli-ckpt-fail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let o = cnx(&[
        "data",
        "synth",
        "coco",
        "--out",
        d.to_str().unwrap(),
        "--images",
        "10",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    // The checkpoint of iteration 4 cannot be completed.
    let blocker = work.join("iter_0000004.state.json");
    std::fs::create_dir(&blocker).unwrap();
    let root = format!("data.root={}", d.display());
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "demo_mask_rcnn_convnext_nano",
            "--set",
            &root,
            "--set",
            "data.batch_size=2",
            "--set",
            "data.img_scale=[128, 128]",
            "--set",
            "runtime.checkpoint_interval=2",
            "--set",
            "runtime.keep_checkpoints=1",
            "--work-dir",
            work.to_str().unwrap(),
            "--device",
            "cpu",
            "--no-eval",
            "--stop-at",
            "6",
        ];
        a.extend_from_slice(extra);
        cnx(&a)
    };

    let o = train(&[]);
    let out = text(&o);
    assert!(!o.status.success(), "the run must stop:\n{out}");
    assert!(
        out.contains("checkpoint of iteration 4 could not be written")
            && out.contains("latest.json still names iteration 2"),
        "{out}"
    );
    assert_eq!(latest_iter(&work), 2);
    // Iteration 2 complete, nothing of iteration 4 but the blocker, no temporary files, and
    // iteration 2 not pruned although keep_checkpoints = 1.
    assert_eq!(
        checkpoint_files(&work),
        [
            "iter_0000002.optim.safetensors",
            "iter_0000002.safetensors",
            "iter_0000002.state.json",
            "iter_0000004.state.json",
            "latest.json",
        ]
    );

    std::fs::remove_dir(&blocker).unwrap();
    let o = train(&["--resume", "auto", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(latest_iter(&work), 6);
    assert_eq!(
        checkpoint_files(&work),
        [
            "iter_0000006.optim.safetensors",
            "iter_0000006.safetensors",
            "iter_0000006.state.json",
            "latest.json",
        ]
    );
    std::fs::remove_dir_all(&d).unwrap();
}
