//! `cnx data check` and `cnx train`'s up-front existence check as a user runs them: synthetic
//! COCO and ADE sets written by `cnx data synth`, then damaged (truncated, zero-byte, missing,
//! resized images; out-of-range, unreadable, missing and wrong-size label PNGs).

mod common;
use common::{cnx, text, tmp};

use std::path::{Path, PathBuf};

fn synth(kind: &str, out: &Path, n: usize) {
    let o = cnx(&[
        "data",
        "synth",
        kind,
        "--out",
        out.to_str().unwrap(),
        "--images",
        &n.to_string(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The four damaged training images of [`damaged_coco`] with the kind each must get.
fn damage_coco(train: &Path) -> Vec<(PathBuf, &'static str)> {
    let f = |i: usize| train.join(format!("{i:012}.jpg"));
    let bytes = std::fs::read(f(1)).unwrap();
    std::fs::write(f(1), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(f(2), b"").unwrap();
    std::fs::remove_file(f(3)).unwrap();
    // A valid JPEG whose size is not the JSON's.
    image::RgbImage::from_pixel(50, 40, image::Rgb([90, 90, 90]))
        .save(f(4))
        .unwrap();
    vec![
        (f(1), "truncated"),
        (f(2), "empty"),
        (f(3), "missing"),
        (f(4), "wrong_size"),
    ]
}

#[test]
fn coco_check_lists_every_problem_and_fails() {
    let d = tmp("cli-check-coco");
    synth("coco", &d, 10); // 8 train, 2 val
    let ann = d.join("annotations/instances_train.json");
    let bad = damage_coco(&d.join("train"));

    let o = cnx(&[
        "data",
        "check",
        "--coco",
        s(&ann),
        "--images",
        s(&d.join("train")),
    ]);
    let out = text(&o);
    assert!(!o.status.success(), "problems must fail the check:\n{out}");
    for (f, kind) in &bad {
        let line = out
            .lines()
            .find(|l| l.contains(s(f)))
            .unwrap_or_else(|| panic!("{} not listed:\n{out}", f.display()));
        assert!(line.starts_with(kind), "{line} should say {kind}");
    }
    assert!(out.contains("8 images checked"), "{out}");
    assert!(out.contains("4 problems"), "{out}");

    let o = cnx(&[
        "data",
        "check",
        "--coco",
        s(&ann),
        "--images",
        s(&d.join("train")),
        "--json",
    ]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 8);
    let counts = v["counts"].as_object().unwrap();
    assert_eq!(counts.len(), 4, "{counts:?}");
    for (f, kind) in &bad {
        assert_eq!(counts[*kind], 1, "{kind}");
        let p = v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["file"] == s(f))
            .unwrap_or_else(|| panic!("{} not in the JSON", f.display()));
        assert_eq!(p["kind"], *kind);
        assert!(!p["detail"].as_str().unwrap().is_empty());
    }

    // The untouched validation split is clean: exit status 0.
    let o = cnx(&[
        "data",
        "check",
        "--coco",
        s(&d.join("annotations/instances_val.json")),
        "--images",
        s(&d.join("val")),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 2);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn ade_check_finds_label_problems() {
    let d = tmp("cli-check-ade");
    synth("ade", &d, 10); // 8 training, 2 validation; labels 0..=8 (objectInfo.txt: 8 classes)
    let lab = |i: usize| d.join(format!("annotations/training/ADE_train_{i:08}.png"));
    // Out of range: 200 > 8 classes (255, the ignore value, is allowed).
    let mut l = image::open(lab(1)).unwrap().into_luma8();
    l.get_pixel_mut(5, 0).0[0] = 200;
    l.get_pixel_mut(6, 0).0[0] = 255;
    l.save(lab(1)).unwrap();
    std::fs::write(lab(2), b"not a png").unwrap();
    std::fs::remove_file(lab(3)).unwrap();
    image::GrayImage::from_pixel(10, 10, image::Luma([1]))
        .save(lab(4))
        .unwrap();

    let o = cnx(&["data", "check", "--ade-root", s(&d), "--json"]);
    assert!(!o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 10, "both splits by default");
    let counts = v["counts"].as_object().unwrap();
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert_eq!(counts["label_size"], 1);
    assert_eq!(counts["label_out_of_range"], 1);
    assert_eq!(counts["label_unreadable"], 1);
    assert_eq!(counts["label_missing"], 1);
    let probs = v["problems"].as_array().unwrap();
    let p = probs.iter().find(|p| p["file"] == s(&lab(1))).unwrap();
    assert_eq!(p["kind"], "label_out_of_range");
    assert!(p["detail"].as_str().unwrap().contains("1 pixels"), "{p}");
    let p = probs.iter().find(|p| p["file"] == s(&lab(2))).unwrap();
    assert_eq!(p["kind"], "label_unreadable");

    // Human output lists them too; a larger class count accepts 200.
    let o = cnx(&[
        "data",
        "check",
        "--ade-root",
        s(&d),
        "--split",
        "training",
        "--num-classes",
        "250",
    ]);
    let out = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("8 images checked") && out.contains("3 problems"),
        "{out}"
    );
    assert!(out.contains("label_unreadable") && !out.contains("label_out_of_range"));

    // The validation split is clean.
    let o = cnx(&[
        "data",
        "check",
        "--ade-root",
        s(&d),
        "--split",
        "validation",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 problems"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn train_names_every_missing_image_before_starting() {
    let d = tmp("cli-check-train");
    synth("coco", &d, 10);
    let gone: Vec<PathBuf> = [2usize, 5, 7, 9]
        .iter()
        .map(|&i| {
            let split = if i <= 8 { "train" } else { "val" };
            d.join(format!("{split}/{i:012}.jpg"))
        })
        .collect();
    for f in &gone {
        std::fs::remove_file(f).unwrap();
    }
    let o = cnx(&[
        "train",
        "demo_mask_rcnn_convnext_nano",
        "--set",
        &format!("data.root={}", s(&d)),
        "--work-dir",
        s(&d.join("work")),
        "--device",
        "cpu",
        "--no-eval",
        "--stop-at",
        "1",
    ]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for f in &gone {
        assert!(out.contains(s(f)), "{} not named:\n{out}", f.display());
    }
    assert!(out.contains("3 of 8 files missing"), "{out}");
    assert!(out.contains("1 of 2 files missing"), "{out}");
    assert!(!d.join("work/latest.json").exists(), "no training happened");
    std::fs::remove_dir_all(&d).unwrap();
}
