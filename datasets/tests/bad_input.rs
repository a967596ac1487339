//! Bad input is reported with the file (and for JSON, line and column), or counted and skipped.

use std::path::PathBuf;
use std::sync::Arc;

use cnx_datasets::pipeline::load_state;
use cnx_datasets::*;
use serde_json::Value;

fn synth_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnx-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    synth::coco(&dir, 10, 11).unwrap();
    dir
}
fn edit_json(dir: &std::path::Path, f: impl FnOnce(&mut Value)) -> PathBuf {
    let p = dir.join("annotations/instances_train.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    let out = dir.join("annotations/edited.json");
    std::fs::write(&out, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    out
}

#[test]
fn malformed_json_reports_line_and_column() {
    let dir = synth_dir("json");
    let p = dir.join("annotations/broken.json");
    std::fs::write(&p, "{\n  \"images\": [\n    {\"id\": 1,, }\n  ]\n}\n").unwrap();
    let e = CocoDataset::load(&p, dir.join("train")).unwrap_err();
    match &e {
        DatasetError::Json { line, column, .. } => assert_eq!((*line, *column), (3, 14)),
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string().contains("broken.json") && e.to_string().contains("line 3"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_and_truncated_images_name_the_file_or_are_skipped() {
    let dir = synth_dir("img");
    let ds = CocoDataset::load(
        dir.join("annotations/instances_train.json"),
        dir.join("train"),
    )
    .unwrap();
    let f0 = dir.join("train").join(&ds.images[0].file_name);
    let f1 = dir.join("train").join(&ds.images[1].file_name);
    std::fs::remove_file(&f0).unwrap();
    let bytes = std::fs::read(&f1).unwrap();
    std::fs::write(&f1, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_state(&ds, 0, true, MaskMode::Bitmap, true)
        .err()
        .unwrap();
    assert!(
        matches!(e, DatasetError::MissingImage(_))
            && e.to_string().contains(&ds.images[0].file_name),
        "{e}"
    );
    let e = load_state(&ds, 1, true, MaskMode::Bitmap, true)
        .err()
        .unwrap();
    assert!(
        matches!(e, DatasetError::TruncatedImage(_))
            && e.to_string().contains(&ds.images[1].file_name),
        "{e}"
    );
    // Without skipping, the loader reports the error; with skip_missing it counts and goes on.
    let ds = Arc::new(ds);
    let n = ds.train_indices().len();
    let src = Arc::new(CocoTrain::new(ds.clone(), TrainPipeline::scaled(0.3)));
    let cfg = LoaderConfig {
        batch_size: 1,
        threads: 2,
        max_epochs: Some(1),
        ..Default::default()
    };
    let errs = Loader::new(src.clone(), cfg.clone(), 0, 0)
        .unwrap()
        .filter(|b| b.is_err())
        .count();
    assert_eq!(errs, 1, "the loader stops at the first error");
    let mut l = Loader::new(
        src,
        LoaderConfig {
            skip_missing: true,
            ..cfg
        },
        0,
        0,
    )
    .unwrap();
    let ok = l.by_ref().inspect(|b| assert!(b.is_ok())).count();
    assert_eq!(ok, n - 2);
    assert_eq!(l.skipped(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clipped_boxes_degenerate_polygons_and_size_mismatch() {
    let dir = synth_dir("ann");
    let p = edit_json(&dir, |v| {
        let anns = v["annotations"].as_array_mut().unwrap();
        let first_poly = anns.iter().position(|a| a["iscrowd"] == 0).unwrap();
        // A box running off the right edge.
        let a = &mut anns[first_poly];
        let w = 10000.0;
        a["bbox"][2] = Value::from(w);
        // Degenerate polygons: two points, odd length.
        a["segmentation"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!([1.0, 2.0, 3.0, 4.0]));
        a["segmentation"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]));
        // A zero-area annotation is dropped as mmdet does.
        let mut z = anns[first_poly].clone();
        z["area"] = Value::from(0.0);
        anns.push(z);
        // Wrong size in the JSON for image 2.
        v["images"][2]["width"] = Value::from(999);
    });
    let ds = CocoDataset::load(&p, dir.join("train")).unwrap();
    assert_eq!(ds.problems.boxes_clipped, 1);
    assert_eq!(ds.problems.degenerate_polygons, 4); // 2 in the edited annotation, 2 in its copy
    assert_eq!(ds.problems.anns_dropped, 1);
    assert!(ds.problems.examples.iter().any(|e| e.contains("clipped")));
    for t in &ds.targets {
        for b in &t.boxes {
            assert!(b[2] <= 512.0);
        }
    }
    let e = load_state(&ds, 2, false, MaskMode::Bitmap, true)
        .err()
        .unwrap();
    assert!(
        matches!(e, DatasetError::SizeMismatch { json_w: 999, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&ds.images[2].file_name));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grayscale_and_png_become_rgb() {
    let dir = std::env::temp_dir().join(format!("cnx-gray-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = image::GrayImage::from_fn(40, 30, |x, y| image::Luma([(x * 5 + y) as u8]));
    g.save(dir.join("g.png")).unwrap();
    g.save(dir.join("g.jpg")).unwrap();
    for f in ["g.png", "g.jpg"] {
        let img = image_io::read_rgb(&dir.join(f)).unwrap();
        assert_eq!((img.w, img.h, img.c), (40, 30, 3));
        let px = img.px(7, 3);
        assert!(px[0] == px[1] && px[1] == px[2]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
