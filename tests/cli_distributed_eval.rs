//! Sharded evaluation with real processes (Gloo on 127.0.0.1): `cnx test --nproc-per-node 2`
//! (each rank runs every second image, rank 0 gathers) gives exactly the single-process numbers
//! and results file, for a detector (COCO AP) and a segmentor (mIoU); and the periodic
//! evaluation of a 2-rank training run reports what one process measures on its checkpoint.

use std::path::{Path, PathBuf};
use std::process::Output;

fn cnx(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cnx"))
        .args(args)
        .output()
        .expect("running cnx")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The JSON object on the last line of stdout.
fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A few training steps of `preset` on `root` (1 thread per process), weights in `work`.
fn train(preset: &str, root: &Path, work: &Path, extra: &[&str]) -> Output {
    let root = format!("data.root={}", root.display());
    let mut a = vec![
        "train",
        preset,
        "--set",
        &root,
        "--set",
        "runtime.threads=1",
        "--set",
        "data.workers=1",
        "--work-dir",
        s(work),
        "--device",
        "cpu",
        "--json",
    ];
    a.extend_from_slice(extra);
    cnx(&a)
}

#[test]
fn sharded_coco_test_and_training_evaluation_equal_one_process() {
    let d = tmp("dist-eval-det");
    let data = d.join("data");
    ok(cnx(&[
        "data",
        "synth",
        "coco",
        "--out",
        s(&data),
        "--images",
        "30",
    ]));
    // 2 ranks x 1 image per step, evaluated at the end by both ranks (sharded).
    let work = d.join("work");
    let o = ok(train(
        "demo_mask_rcnn_convnext_nano",
        &data,
        &work,
        &[
            "--set",
            "data.batch_size=1",
            "--set",
            "data.img_scale=[160, 160]",
            "--stop-at",
            "4",
            "--nproc-per-node",
            "2",
        ],
    ));
    let trained = last_json(&o);
    let ann = data.join("annotations/instances_val.json");
    let images = data.join("val");
    let test = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "test",
            "--work-dir",
            s(&work),
            "--coco",
            s(&ann),
            "--images",
            s(&images),
            "--device",
            "cpu",
            "--out",
            s(out),
            "--json",
        ];
        a.extend_from_slice(extra);
        last_json(&ok(cnx(&a)))
    };
    let one = test(&d.join("one.json"), &[]);
    let two = test(&d.join("two.json"), &["--nproc-per-node", "2"]);
    assert_eq!(one["metrics"], two["metrics"], "{one} vs {two}");
    // The gathered results are the single process's, in its order.
    let r1 = std::fs::read(d.join("one.json")).unwrap();
    let r2 = std::fs::read(d.join("two.json")).unwrap();
    assert!(r1.len() > 100, "detections were made");
    assert!(r1 == r2, "results files differ");
    // The training run's sharded evaluation reports what `cnx test` measures on its weights
    // (the test pipeline of the preset at the config's scale on the same images).
    let m = &trained["metrics"];
    assert!(m["bbox_mAP"].is_number(), "{trained}");
    let single = test(&d.join("again.json"), &["--batch-size", "2"]);
    assert_eq!(
        single["metrics"]["bbox_mAP"], m["bbox_mAP"],
        "{single} vs {trained}"
    );
    assert_eq!(
        single["metrics"]["segm_mAP"], m["segm_mAP"],
        "{single} vs {trained}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn sharded_ade_test_equals_one_process() {
    let d = tmp("dist-eval-seg");
    let data = d.join("data");
    ok(cnx(&[
        "data",
        "synth",
        "ade",
        "--out",
        s(&data),
        "--images",
        "25",
    ]));
    let work = d.join("work");
    ok(train(
        "demo_upernet_convnext_nano",
        &data,
        &work,
        &[
            "--set",
            "data.batch_size=2",
            "--set",
            "data.img_scale=[96, 96]",
            "--set",
            "data.crop_size=[96, 96]",
            "--stop-at",
            "3",
            "--no-eval",
        ],
    ));
    let test = |extra: &[&str]| {
        let mut a = vec![
            "test",
            "--work-dir",
            s(&work),
            "--ade-root",
            s(&data),
            "--device",
            "cpu",
            "--json",
        ];
        a.extend_from_slice(extra);
        last_json(&ok(cnx(&a)))
    };
    let one = test(&[]);
    let two = test(&["--nproc-per-node", "2"]);
    assert!(one["metrics"]["mIoU"].is_number(), "{one}");
    assert_eq!(one["metrics"], two["metrics"], "{one} vs {two}");
    assert_eq!(one["images"], two["images"]);
    let _ = std::fs::remove_dir_all(&d);
}
