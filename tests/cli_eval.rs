//! `cnx eval coco` and `cnx eval seg` as a user runs them: output format, JSON, and a clear
//! message plus a non-zero exit status for each kind of bad input.

mod common;
use common::{cnx, stderr, stdout};

use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use cnx_eval::coco::{self, CocoGt, IouType};
use cnx_eval::miou::{self, Accumulator};
use serde_json::{json, Value};

const GT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/coco-tiny/annotations/instances_train2017.json"
);
const ADE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ade-sample");

fn tmp_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cnx-cli-eval-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn write(name: &str, text: &str) -> String {
    let p = tmp_dir().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Detections made from the ground truth: shifted boxes, with masks from the box.
fn results() -> Value {
    let gt: Value = serde_json::from_str(&std::fs::read_to_string(GT).unwrap()).unwrap();
    let imgs: std::collections::HashMap<i64, (usize, usize)> = gt["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let hw = (
                i["height"].as_u64().unwrap() as usize,
                i["width"].as_u64().unwrap() as usize,
            );
            (i["id"].as_i64().unwrap(), hw)
        })
        .collect();
    let mut out = Vec::new();
    for (n, a) in gt["annotations"].as_array().unwrap().iter().enumerate() {
        let b: Vec<f64> = a["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let s = (n % 7) as f64;
        let bb = [b[0] + s, b[1] + s * 0.5, b[2], b[3]];
        let (h, w) = imgs[&a["image_id"].as_i64().unwrap()];
        let rle = cnx_eval::Rle::from_bbox(bb, h, w);
        out.push(json!({
            "image_id": a["image_id"], "category_id": a["category_id"],
            "score": ((n * 37) % 100) as f64 / 100.0, "bbox": bb,
            "segmentation": {"size": [h, w], "counts": rle.to_compressed_string()},
        }));
    }
    Value::Array(out)
}

#[test]
fn coco_text_json_and_per_class() {
    let res = results();
    let path = write("res.json", &res.to_string());
    let o = cnx(&[
        "eval",
        "coco",
        "--gt",
        GT,
        "--results",
        &path,
        "--iou-type",
        "both",
        "--per-class",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let gt = CocoGt::load(GT).unwrap();
    let dets = coco::load_results(&path).unwrap();
    for t in [IouType::Bbox, IouType::Segm] {
        let ev = coco::evaluate(&gt, &dets, t).unwrap();
        let block = format!(
            "Evaluate annotation type *{}*\n{}",
            t.name(),
            ev.summary.format_pycocotools()
        );
        assert!(text.contains(&block), "{text}");
    }
    assert!(
        text.contains(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")
    );
    assert!(text.contains("person"), "per-class table: {text}");

    let o = cnx(&["eval", "coco", "--gt", GT, "--results", &path, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let ev = coco::evaluate(&gt, &dets, IouType::Segm).unwrap();
    // Default with masks in the results: both types.
    assert_eq!(v["segm"]["AP"].as_f64().unwrap(), ev.summary.ap);
    assert_eq!(v["segm"]["ARl"].as_f64().unwrap(), ev.summary.ar_large);
    assert!(v["bbox"]["AP50"].is_f64());
}

#[test]
fn coco_bad_input_fails_clearly() {
    let mut res = results();
    res[3]["image_id"] = json!(7);
    res[5]["image_id"] = json!(8);
    let p = write("bad_img.json", &res.to_string());
    let o = cnx(&["eval", "coco", "--gt", GT, "--results", &p]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("image_id 7") && e.contains("2 result"), "{e}");

    let mut res = results();
    res[0]["category_id"] = json!(12);
    let p = write("bad_cat.json", &res.to_string());
    let o = cnx(&["eval", "coco", "--gt", GT, "--results", &p]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("category_id 12"), "{}", stderr(&o));

    let mut res = results();
    res[2]["segmentation"]["counts"] = json!("!!");
    let p = write("bad_rle.json", &res.to_string());
    let o = cnx(&[
        "eval",
        "coco",
        "--gt",
        GT,
        "--results",
        &p,
        "--iou-type",
        "segm",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("result #2"), "{}", stderr(&o));

    let p = write(
        "nan.json",
        r#"[{"image_id": 262145, "category_id": 1, "bbox": [1, 2, 3, 4], "score": NaN}]"#,
    );
    let o = cnx(&["eval", "coco", "--gt", GT, "--results", &p]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("non-finite"), "{}", stderr(&o));

    let o = cnx(&["eval", "coco", "--gt", GT, "--results", "/nonexistent.json"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent.json"), "{}", stderr(&o));
}

#[test]
fn coco_empty_results_warn_and_give_zeros() {
    let p = write("empty.json", "[]");
    let o = cnx(&["eval", "coco", "--gt", GT, "--results", &p, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["bbox"]["AP"].as_f64().unwrap(), 0.0);
}

/// Predictions for the ADE sample: the reduced label with a band of wrong classes.
fn ade_preds(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut pairs = Vec::new();
    let ann = Path::new(ADE).join("annotations/validation");
    let mut names: Vec<_> = std::fs::read_dir(&ann)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let lab = image::open(&p).unwrap().to_luma8();
        let (w, h) = lab.dimensions();
        let pred: Vec<u8> = lab
            .as_raw()
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if i % 97 < 9 {
                    (i % 150) as u8
                } else {
                    l.saturating_sub(1)
                }
            })
            .collect();
        image::GrayImage::from_raw(w, h, pred.clone())
            .unwrap()
            .save(dir.join(p.file_name().unwrap()))
            .unwrap();
        pairs.push((pred, lab.into_raw()));
    }
    pairs
}

#[test]
fn seg_json_matches_library_and_names_classes() {
    let dir = tmp_dir().join("preds");
    let pairs = ade_preds(&dir);
    let gt_dir = format!("{ADE}/annotations/validation");
    let o = cnx(&[
        "eval",
        "seg",
        "--gt-dir",
        &gt_dir,
        "--pred-dir",
        dir.to_str().unwrap(),
        "--reduce-zero-label",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let mut acc = Accumulator::new(150, true);
    for (p, l) in &pairs {
        acc.add(p, l).unwrap();
    }
    let names = miou::load_class_names(format!("{ADE}/objectInfo150.txt")).unwrap();
    let s = acc.summary(&names);
    assert_eq!(v["mIoU"].as_f64().unwrap(), s.miou);
    assert_eq!(v["aAcc"].as_f64().unwrap(), s.aacc);
    assert_eq!(v["per_class"][0]["name"], "wall");
    assert_eq!(v["per_class"].as_array().unwrap().len(), 150);

    let o = cnx(&[
        "eval",
        "seg",
        "--gt-dir",
        &gt_dir,
        "--pred-dir",
        dir.to_str().unwrap(),
        "--reduce-zero-label",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("mIoU:"), "{}", stdout(&o));
}

#[test]
fn seg_bad_input_fails_clearly() {
    let gt_dir = format!("{ADE}/annotations/validation");
    // A prediction of another size.
    let dir = tmp_dir().join("preds_size");
    ade_preds(&dir);
    let victim = dir.join("ADE_val_00000002.png");
    image::GrayImage::new(10, 10).save(&victim).unwrap();
    let o = cnx(&[
        "eval",
        "seg",
        "--gt-dir",
        &gt_dir,
        "--pred-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ADE_val_00000002.png") && e.contains("10x10") && e.contains(&gt_dir),
        "{e}"
    );
    // A class >= num_classes.
    let dir = tmp_dir().join("preds_class");
    ade_preds(&dir);
    let victim = dir.join("ADE_val_00000001.png");
    let mut img = image::open(&victim).unwrap().to_luma8();
    img.put_pixel(3, 0, image::Luma([200]));
    img.save(&victim).unwrap();
    let o = cnx(&[
        "eval",
        "seg",
        "--gt-dir",
        &gt_dir,
        "--pred-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ADE_val_00000001.png") && e.contains("200"),
        "{e}"
    );
    // A missing prediction.
    std::fs::remove_file(dir.join("ADE_val_00000003.png")).unwrap();
    let o = cnx(&[
        "eval",
        "seg",
        "--gt-dir",
        &gt_dir,
        "--pred-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
}
