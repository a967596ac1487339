//! ADE20K pipeline on the real sample (`tests/data/ade-sample` at the repository root) and the synthetic ADE set.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cnx_datasets::ade::*;
use cnx_datasets::loader::keyed_rng;
use cnx_datasets::*;

fn ade_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/ade-sample")
}

#[test]
fn ade_sample_train_and_test() {
    let ds = Arc::new(AdeDataset::load(ade_dir(), "validation").unwrap());
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.class_names.len(), 150);
    let p = SegTrainPipeline::default();
    for i in 0..ds.len() {
        let (_, raw) = ds.load_item(i, false).unwrap();
        for t in 0..3 {
            let s = p.run(&ds, i, &mut keyed_rng(1, t, i as u64, 0)).unwrap();
            assert!(s.img.w <= 512 && s.img.h <= 512);
            assert_eq!((s.label.w, s.label.h), (s.img.w, s.img.h));
            // reduce_zero_label: no 0-from-"other", values < 150 or 255.
            assert!(s.label.data.iter().all(|&v| v < 150 || v == 255));
        }
        assert!(raw.data.iter().all(|&v| v <= 150));
    }
    let src = Arc::new(AdeTrain {
        ds: ds.clone(),
        pipeline: p,
    });
    let cfg = LoaderConfig {
        batch_size: 2,
        threads: 2,
        max_epochs: Some(1),
        ..Default::default()
    };
    let batches: Vec<_> = Loader::new(src, cfg, 0, 0)
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(batches.len(), 2);
    for b in &batches {
        assert_eq!(&b.shape[1..], &[3, 512, 512]);
        assert_eq!(b.labels.len(), b.shape[0] * 512 * 512);
    }
    let items: Vec<_> = AdeTestIter::new(ds.clone(), (2048, 512))
        .map(|x| x.unwrap())
        .collect();
    for it in &items {
        let (h, w) = it.meta.img_shape;
        assert!(h.min(w) == 512 || h.max(w) == 2048);
        assert_eq!((it.label.h, it.label.w), it.meta.ori_shape);
        assert_eq!(it.image.len(), 3 * h * w);
    }
}

#[test]
fn cat_max_ratio_rule() {
    let mut lab = image_io::Image8::new(10, 10, 1);
    // All one class: never OK; 255 ignored.
    assert!(!crop_ok(&lab, 0, 0, 10, 10, 0.75));
    for v in lab.data.iter_mut().take(30) {
        *v = 3;
    }
    assert!(crop_ok(&lab, 0, 0, 10, 10, 0.75)); // 70% / 30%
    for v in lab.data.iter_mut().take(20) {
        *v = 255;
    }
    assert!(!crop_ok(&lab, 0, 0, 10, 10, 0.75)); // 10 vs 70 of 80 counted: 87.5%
}

#[test]
fn synth_ade_loads() {
    let dir = std::env::temp_dir().join(format!("cnx-synth-ade-{}", std::process::id()));
    let s = synth::ade(&dir, 10, 3).unwrap();
    assert_eq!((s.train_images, s.val_images), (8, 2));
    let ds = AdeDataset::load(&dir, "training").unwrap();
    assert_eq!(ds.len(), 8);
    assert_eq!(ds.class_names.len(), 8);
    let (img, lab) = ds.load_item(0, false).unwrap();
    assert_eq!((img.w, img.h), (lab.w, lab.h));
    assert!(lab.data.iter().all(|&v| v <= 8));
    assert!(lab.data.iter().any(|&v| v >= 3));
    let _ = std::fs::remove_dir_all(&dir);
}
