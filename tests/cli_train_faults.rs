//! `cnx train` over a damaged or changed dataset, as a user runs it on `cnx data synth` sets:
//! unreadable training images are replaced and named (or stop the run under `data.strict`),
//! unreadable validation images are skipped and counted, and a run resumed after its training
//! set lost images finishes its schedule (issue 19, items 1 and 3).

mod common;

use common::{cnx, stderr, stdout, tmp};
use std::path::Path;

/// 16 training and 4 validation images (`{id:012}.jpg`, ids 1-16 train).
fn synth(out: &Path) {
    let o = cnx(&[
        "data",
        "synth",
        "coco",
        "--out",
        out.to_str().unwrap(),
        "--images",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn train(root: &Path, work: &Path, extra: &[&str]) -> std::process::Output {
    let root = format!("data.root={}", root.display());
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
        "runtime.log_interval=1",
        "--work-dir",
        work.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    a.extend_from_slice(extra);
    cnx(&a)
}

fn log_lines(work: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(work.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn state(work: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(work.join("latest.json")).unwrap()).unwrap()
}

fn truncate(p: &Path) {
    let b = std::fs::read(p).unwrap();
    std::fs::write(p, &b[..b.len() / 2]).unwrap();
}

#[test]
fn unreadable_images_are_replaced_named_and_counted_or_stop_under_strict() {
    let d = tmp("cli-faults-broken");
    synth(&d);
    let name = |i: usize| format!("{i:012}.jpg");
    truncate(&d.join("train").join(name(3)));
    std::fs::write(d.join("train").join(name(5)), b"").unwrap();
    // One validation image (ids after the training ones) is unreadable too.
    let val: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("annotations/instances_val.json")).unwrap())
            .unwrap();
    let val_name = val["images"][0]["file_name"].as_str().unwrap().to_string();
    truncate(&d.join("val").join(&val_name));

    // 8 iterations per epoch: every training image is drawn.
    let work = d.join("work");
    let o = train(&d, &work, &["--set", "runtime.max_iters=8", "--json"]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "{err}");
    for f in [name(3), name(5)] {
        assert_eq!(
            err.matches(&format!(
                "unreadable training image {}",
                d.join("train").join(&f).display()
            ))
            .count(),
            1,
            "{f} named once:\n{err}"
        );
    }
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["iter"], 8);
    let skipped: Vec<&str> = summary["skipped_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 2, "{summary}");
    assert!(
        skipped.iter().any(|s| s.ends_with(&name(3)))
            && skipped.iter().any(|s| s.ends_with(&name(5)))
    );
    let log = log_lines(&work);
    // Every training line says where its time went: data wait, forward, backward, optimizer
    // (seconds per iteration, together at most the iteration's wall time).
    for v in log.iter().filter(|v| v["mode"] == "train") {
        let t = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        let phases = [
            "data_time",
            "forward_time",
            "backward_time",
            "optimizer_time",
        ];
        assert!(phases.iter().all(|k| t(k) >= 0.0), "{v}");
        assert!(t("forward_time") > 0.0 && t("backward_time") > 0.0, "{v}");
        let sum: f64 = phases.iter().map(|k| t(k)).sum();
        assert!(sum <= t("time") * 1.05 + 0.01, "{sum} > {}: {v}", t("time"));
        assert!(v.get("sync_time").is_none(), "single process: {v}");
    }
    let mut logged: Vec<String> = log
        .iter()
        .filter(|v| v["mode"] == "data")
        .map(|v| v["skipped_image"].as_str().unwrap().to_string())
        .collect();
    logged.sort();
    assert_eq!(
        logged,
        [
            d.join("train").join(name(3)).display().to_string(),
            d.join("train").join(name(5)).display().to_string()
        ]
    );
    // Evaluation skipped the unreadable validation image and said so, as `cnx test` does.
    assert!(
        err.contains(&format!("skipping validation image {val_name}"))
            && err.contains("1 validation images could not be read and were skipped"),
        "{err}"
    );
    let val_rec = log.iter().rev().find(|v| v["mode"] == "val").unwrap();
    assert_eq!(val_rec["skipped_images"], 1.0, "{val_rec}");

    // The human summary counts and lists them.
    let work2 = d.join("work2");
    let o = train(&d, &work2, &["--set", "runtime.max_iters=8", "--no-eval"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains("skipped    2 unreadable training images")
            && out.contains(&name(3))
            && out.contains(&name(5)),
        "{out}"
    );

    // data.strict: the run stops at the first one, naming it.
    let work3 = d.join("work3");
    let o = train(
        &d,
        &work3,
        &[
            "--set",
            "runtime.max_iters=8",
            "--set",
            "data.strict=true",
            "--no-eval",
        ],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "strict must stop:\n{err}");
    let named = [name(3), name(5)]
        .iter()
        .filter(|f| err.contains(f.as_str()))
        .count();
    assert_eq!(named, 1, "the first broken file only:\n{err}");
    assert!(err.contains("data.strict"), "{err}");
    assert!(!work3.join("iter_0000008.safetensors").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn resume_after_deleting_training_images_finishes_the_schedule() {
    let d = tmp("cli-faults-resume");
    synth(&d);
    // A two-epoch schedule counted in epochs: its length depends on the data.
    let epochs = [
        "--set",
        "runtime.max_iters=0",
        "--set",
        "runtime.max_epochs=2",
        "--no-eval",
    ];
    // Reference: the same schedule on the intact data, uninterrupted (for the lr).
    let reference = d.join("reference");
    let o = train(&d, &reference, &epochs);
    assert!(o.status.success(), "{}", stderr(&o));
    let ipe = state(&reference)["iters_per_epoch"].as_u64().unwrap();
    let total = 2 * ipe;
    assert_eq!(state(&reference)["iter"], total);

    let work = d.join("work");
    let mut first = epochs.to_vec();
    first.extend(["--stop-at", "5"]);
    let o = train(&d, &work, &first);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(state(&work)["iter"], 5);

    // Five training images leave the set: files and annotations.
    let ann = d.join("annotations/instances_train.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ann).unwrap()).unwrap();
    let gone: [u64; 5] = [2, 3, 4, 6, 8];
    v["images"]
        .as_array_mut()
        .unwrap()
        .retain(|im| !gone.contains(&im["id"].as_u64().unwrap()));
    v["annotations"]
        .as_array_mut()
        .unwrap()
        .retain(|a| !gone.contains(&a["image_id"].as_u64().unwrap()));
    std::fs::write(&ann, serde_json::to_vec(&v).unwrap()).unwrap();
    for id in &gone {
        std::fs::remove_file(d.join("train").join(format!("{id:012}.jpg"))).unwrap();
    }

    // Another batch size is refused, naming it.
    let mut bs = epochs.to_vec();
    bs.extend(["--set", "data.batch_size=4", "--resume", "auto"]);
    let o = train(&d, &work, &bs);
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("data.batch_size 2 -> 4"),
        "{err}"
    );

    let mut resume = epochs.to_vec();
    resume.extend(["--resume", "auto", "--json"]);
    let o = train(&d, &work, &resume);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let new_ipe = {
        let line = err
            .lines()
            .find(|l| l.contains("the training data changed since the checkpoint"))
            .unwrap_or_else(|| panic!("no warning:\n{err}"));
        assert!(
            line.contains(&format!("{ipe} iterations per epoch then"))
                && line.contains("(11 training images)")
                && line.contains(&format!("{total} iterations in all")),
            "{line}"
        );
        let now = line.split(" now").next().unwrap();
        now.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    assert!(new_ipe < ipe, "{new_ipe} {ipe}");
    let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        summary["iter"], total,
        "the schedule's iterations, not the new data's"
    );
    let st = state(&work);
    assert_eq!(st["iter"], total);
    assert_eq!(st["iters_per_epoch"], ipe, "the schedule's epochs are kept");
    // The lr of every iteration after the resume is the uninterrupted schedule's: no new warmup.
    let lrs = |w: &Path| -> Vec<(u64, f64)> {
        log_lines(w)
            .iter()
            .filter(|v| v["mode"] == "train")
            .map(|v| (v["iter"].as_u64().unwrap(), v["lr"].as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (lrs(&reference), lrs(&work));
    assert_eq!(b.len() as u64, total, "{b:?}");
    for ((ia, la), (ib, lb)) in a.iter().zip(&b) {
        assert_eq!(ia, ib);
        assert!(
            (la - lb).abs() <= 1e-12 * la.abs(),
            "iter {ia}: {la} vs {lb}"
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}
