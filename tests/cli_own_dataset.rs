//! Your own dataset end to end, as a user runs it: train on a COCO-format set with its own 6
//! categories and on an ADE-layout set with its own 9-class table, then `cnx test` and
//! `cnx predict` with nothing but the checkpoint (it records its config and class names), or
//! the run's work dir. Category ids and names come from the dataset, not COCO's / ADE20K's.

mod common;
use common::{cnx, stderr, stdout, tmp};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = cnx(args);
    assert!(
        o.status.success(),
        "cnx {}:\n{}\n{}",
        args.join(" "),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Two training iterations on `data` into `work`; returns the checkpoint.
fn train(preset: &str, data: &Path, work: &Path, extra: &[&str]) -> PathBuf {
    let root = format!("data.root={:?}", s(data));
    let mut args = vec![
        "train",
        preset,
        "--set",
        &root,
        "--set",
        "runtime.max_iters=2",
        "--set",
        "runtime.checkpoint_interval=2",
        "--stop-at",
        "2",
        "--no-eval",
        "--device",
        "cpu",
        "--work-dir",
        s(work),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    work.join("iter_0000002.safetensors")
}

#[test]
fn detection_on_a_six_category_coco_set() {
    let d = tmp("own-det");
    ok(&[
        "demo",
        "det",
        "--data-only",
        "--images",
        "16",
        "--out",
        s(&d),
    ]);
    let data = d.join("data");
    let ann = data.join("annotations/instances_val.json");
    let gt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ann).unwrap()).unwrap();
    let cats: Vec<(i64, String)> = gt["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_i64().unwrap(),
                c["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(cats.len(), 6);
    let weights = train("demo_mask_rcnn_convnext_nano", &data, &d.join("work"), &[]);

    // test with the checkpoint alone, then with the work dir.
    let res = d.join("results.json");
    let out = ok(&[
        "test",
        "--weights",
        s(&weights),
        "--coco",
        s(&ann),
        "--images",
        s(&data.join("val")),
        "--out",
        s(&res),
        "--device",
        "cpu",
    ]);
    assert!(out.contains("Evaluate annotation type *bbox*"), "{out}");
    assert!(out.contains("Evaluate annotation type *segm*"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap();
    let ids: Vec<i64> = cats.iter().map(|c| c.0).collect();
    for det in r.as_array().unwrap() {
        assert!(ids.contains(&det["category_id"].as_i64().unwrap()), "{det}");
    }
    let out = ok(&[
        "test",
        "--work-dir",
        s(&d.join("work")),
        "--coco",
        s(&ann),
        "--images",
        s(&data.join("val")),
        "--out",
        s(&d.join("r2.json")),
        "--eval",
        "bbox",
        "--device",
        "cpu",
    ]);
    assert!(out.contains("*bbox*") && !out.contains("*segm*"), "{out}");

    // --json: the metrics under the names of the training log (one schema everywhere).
    let out = ok(&[
        "test",
        "--weights",
        s(&weights),
        "--coco",
        s(&ann),
        "--images",
        s(&data.join("val")),
        "--out",
        s(&d.join("r3.json")),
        "--device",
        "cpu",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let m = j["metrics"].as_object().unwrap();
    for t in ["bbox", "segm"] {
        for k in ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"] {
            assert!(m.contains_key(&format!("{t}_{k}")), "{t}_{k} in {j}");
        }
    }
    assert_eq!(m.len(), 12, "{j}");

    // predict: drawings and COCO results with the dataset's category ids.
    let imgs: Vec<PathBuf> = std::fs::read_dir(data.join("val"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let pred = d.join("pred");
    let mut args = vec![
        "predict",
        "--weights",
        s(&weights),
        "--out-dir",
        s(&pred),
        "--device",
        "cpu",
    ];
    args.extend(imgs.iter().map(|p| s(p)));
    ok(&args);
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pred.join("predictions.json")).unwrap())
            .unwrap();
    assert!(!p.as_array().unwrap().is_empty());
    for det in p.as_array().unwrap() {
        assert!(ids.contains(&det["category_id"].as_i64().unwrap()), "{det}");
    }
    for i in &imgs {
        let stem = i.file_stem().unwrap().to_string_lossy();
        assert!(pred.join(format!("{stem}.png")).exists(), "{stem}");
    }

    // Folders: --recursive mirrors them in the outputs, same names never collide, --json
    // lists what was written and skipped, and a skipped image gives exit status 2.
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::copy(&imgs[0], tree.join("a.jpg")).unwrap();
    std::fs::copy(&imgs[1], tree.join("sub/a.jpg")).unwrap();
    std::fs::write(tree.join("sub/broken.jpg"), b"not a jpeg").unwrap();
    let out_dir = d.join("tree_pred");
    let o = cnx(&[
        "predict",
        "--weights",
        s(&weights),
        "--out-dir",
        s(&out_dir),
        "--device",
        "cpu",
        "--recursive",
        "--json",
        s(&tree),
        s(&tree.join("a.jpg")),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let last = stdout(&o).lines().last().unwrap().to_string();
    let j: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(j["task"], "det");
    assert_eq!(j["images"], 4);
    assert_eq!(j["written"].as_array().unwrap().len(), 3);
    assert!(
        j["skipped"][0].as_str().unwrap().ends_with("broken.jpg"),
        "{j}"
    );
    for f in ["a.png", "a_1.png", "sub/a.png"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    assert!(stderr(&o).contains("broken.jpg"));

    // A weights file that records no model needs a preset, and says so.
    let bare = d.join("bare.safetensors");
    let t = tch::Tensor::zeros([2], tch::kind::FLOAT_CPU);
    tch::Tensor::write_safetensors(&[("w", &t)], &bare).unwrap();
    let o = cnx(&[
        "test",
        "--weights",
        s(&bare),
        "--coco",
        s(&ann),
        "--images",
        s(&data.join("val")),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("records no model configuration"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn segmentation_on_a_nine_class_ade_layout_set() {
    let d = tmp("own-seg");
    ok(&[
        "demo",
        "seg",
        "--data-only",
        "--images",
        "10",
        "--out",
        s(&d),
    ]);
    let data = d.join("data");
    // The dataset's own class table: the generator's 8 classes plus a ninth.
    let info = data.join("objectInfo.txt");
    let mut table = std::fs::read_to_string(&info).unwrap();
    table.push_str("9\tlamp\n");
    std::fs::write(&info, table).unwrap();
    let weights = train(
        "demo_upernet_convnext_nano",
        &data,
        &d.join("work"),
        &["--set", "model.num_classes=9"],
    );
    let out = ok(&[
        "test",
        "--weights",
        s(&weights),
        "--ade-root",
        s(&data),
        "--device",
        "cpu",
    ]);
    assert!(out.contains("mIoU"), "{out}");
    let out = ok(&[
        "test",
        "--weights",
        s(&weights),
        "--ade-root",
        s(&data),
        "--device",
        "cpu",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let keys: Vec<&String> = j["metrics"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["aAcc", "mAcc", "mIoU"], "{j}");
    let imgs: Vec<PathBuf> = std::fs::read_dir(data.join("images/validation"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let pred = d.join("pred");
    let mut args = vec![
        "predict",
        "--weights",
        s(&weights),
        "--out-dir",
        s(&pred),
        "--device",
        "cpu",
    ];
    args.extend(imgs.iter().map(|p| s(p)));
    let out = ok(&args);
    // Class names are the dataset's (never ADE20K's 150 names).
    for ade in ["wall", "building", "road", "tree", "ceiling"] {
        assert!(!out.contains(&format!(" {ade} ")), "{ade} in\n{out}");
    }
    for i in &imgs {
        let stem = i.file_stem().unwrap().to_string_lossy();
        let label = image::open(pred.join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        assert!(
            label.pixels().all(|p| p[0] < 9),
            "{stem}: class index out of range"
        );
    }
    // The same exit rule as detectors: some images skipped → 2, the others written.
    let broken = d.join("broken.jpg");
    std::fs::write(&broken, b"").unwrap();
    let o = cnx(&[
        "predict",
        "--weights",
        s(&weights),
        "--out-dir",
        s(&d.join("pred2")),
        "--device",
        "cpu",
        "--json",
        s(&imgs[0]),
        s(&broken),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert_eq!(
        (j["task"].as_str(), j["images"].as_i64()),
        (Some("seg"), Some(2))
    );
    assert_eq!(j["written"][0]["outputs"].as_array().unwrap().len(), 2);
}
