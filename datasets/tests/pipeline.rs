//! Properties of the COCO pipelines and the loader on real files (coco-tiny and synthetic data):
//! boxes inside the image after every transform, masks agreeing with boxes, determinism per
//! seed, resumption, batch layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cnx_datasets::loader::{group_sampler_order, keyed_rng};
use cnx_datasets::mask::{InstanceMask, MaskMode};
use cnx_datasets::pipeline::{load_state, State};
use cnx_datasets::*;

fn coco_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/coco-tiny")
}
fn tiny() -> Arc<CocoDataset> {
    Arc::new(
        CocoDataset::load(
            coco_dir().join("annotations/instances_train2017.json"),
            coco_dir().join("train2017"),
        )
        .unwrap(),
    )
}

/// Boxes inside the image, each mask's foreground inside its (slightly grown) box, canvas sizes.
fn check(st: &State, what: &str) {
    let (w, h) = (st.img.w as f32, st.img.h as f32);
    assert_eq!(st.boxes.len(), st.labels.len(), "{what}");
    for b in st.boxes.iter().chain(&st.ignore) {
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= w && b[3] <= h && b[0] <= b[2] && b[1] <= b[3],
            "{what}: {b:?} in {w}x{h}"
        );
    }
    if let Some(m) = &st.masks {
        assert_eq!((m.width, m.height), (st.img.w, st.img.h), "{what}");
        assert_eq!(m.len(), st.boxes.len(), "{what}");
        for (k, im) in m.masks.iter().enumerate() {
            if let InstanceMask::Bitmap(b) = im {
                if let Some(mb) = b.bbox() {
                    let bb = st.boxes[k];
                    // COCO boxes are tight around polygons; nearest resizing moves edges by < 1 px
                    // of the source grid per resize step.
                    let tol = 3.0
                        * (1.0f32)
                            .max(1.0 / st.scale_factor.0.min(st.scale_factor.1))
                            .max(2.0);
                    assert!(
                        mb[0] >= bb[0] - tol
                            && mb[1] >= bb[1] - tol
                            && mb[2] <= bb[2] + tol
                            && mb[3] <= bb[3] + tol,
                        "{what}: mask {mb:?} box {bb:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn properties_after_every_transform() {
    let ds = tiny();
    let p = TrainPipeline::default();
    let mut n_crop = 0;
    for i in ds.train_indices() {
        for trial in 0..2u64 {
            let mut rng = keyed_rng(5, trial, i as u64, 0);
            let mut st = load_state(&ds, i, true, MaskMode::Bitmap, true).unwrap();
            check(&st, "load");
            st.flip();
            check(&st, "flip");
            st.resize_keep_ratio((600, 1333));
            check(&st, "resize");
            let before = st.boxes.len();
            st.random_crop_abs(&mut rng, 384, 600);
            assert!(st.img.w >= 384.min(st.img.w) && st.img.w <= 600 && st.img.h <= 600);
            check(&st, "crop");
            n_crop += before - st.boxes.len();
            st.resize_keep_ratio((800, 1333));
            check(&st, "resize2");
            let s = p.run(&ds, i, &mut rng).unwrap();
            assert!(s.meta.pad_shape.0.is_multiple_of(32));
            assert!(s.meta.pad_shape.1.is_multiple_of(32));
            assert!(s.img.h.min(s.img.w) <= 800 && s.img.h.max(s.img.w) <= 1333);
        }
    }
    assert!(n_crop > 0, "crops should drop some boxes");
}

#[test]
fn contiguous_labels_and_filters() {
    let ds = tiny();
    assert_eq!(ds.num_classes(), 80);
    assert_eq!(ds.label_to_cat(0), 1);
    assert_eq!(ds.label_to_cat(79), 90);
    assert_eq!(ds.cat_to_label[&90], 79);
    let n_ignore: usize = ds.targets.iter().map(|t| t.ignore.len()).sum();
    assert_eq!(n_ignore, 6);
    let n_boxes: usize = ds.targets.iter().map(|t| t.boxes.len()).sum();
    assert_eq!(n_boxes + n_ignore + ds.problems.anns_dropped, 705);
    assert_eq!(ds.train_indices().len(), 80);
}

#[test]
fn test_pipeline_shapes() {
    let ds = tiny();
    let mut it = TestIter::new(ds.clone(), TestPipeline::default(), 2);
    let b = it.next().unwrap().unwrap();
    assert_eq!(b.shape[0], 2);
    for m in &b.metas {
        let (h, w) = m.img_shape;
        assert!(h.min(w) == 800 || h.max(w) == 1333, "{m:?}");
        assert!(!m.flip);
        assert!(
            b.shape[2] >= h
                && b.shape[3] >= w
                && b.shape[2].is_multiple_of(32)
                && b.shape[3].is_multiple_of(32)
        );
    }
    assert_eq!(it.count(), 39);
}

type Fingerprint = (Vec<usize>, Vec<(usize, usize)>, Vec<bool>, f64);

fn fingerprint(b: &DetBatch) -> Fingerprint {
    (
        b.metas.iter().map(|m| m.index).collect(),
        b.metas.iter().map(|m| m.img_shape).collect(),
        b.metas.iter().map(|m| m.flip).collect(),
        b.images.iter().map(|&v| v as f64).sum(),
    )
}

#[test]
fn loader_deterministic_resumable_and_grouped() {
    let ds = tiny();
    let src = Arc::new(CocoTrain::new(ds.clone(), TrainPipeline::scaled(0.4)));
    let cfg = |threads| LoaderConfig {
        batch_size: 2,
        seed: 42,
        threads,
        prefetch: 2,
        skip_missing: false,
        max_epochs: Some(2),
        ..Default::default()
    };
    let a: Vec<_> = Loader::new(src.clone(), cfg(1), 0, 0)
        .unwrap()
        .take(45)
        .map(|b| b.unwrap())
        .collect();
    let b: Vec<_> = Loader::new(src.clone(), cfg(2), 0, 0)
        .unwrap()
        .take(45)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(a.len(), 45);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(fingerprint(x), fingerprint(y));
    }
    // Epoch 0 has 40 iterations; resume at epoch 0 iteration 37.
    let l = Loader::new(src.clone(), cfg(2), 0, 37).unwrap();
    assert_eq!(l.iters_per_epoch(), 40);
    let c: Vec<_> = l.take(8).map(|b| b.unwrap()).collect();
    for (x, y) in c.iter().zip(&a[37..]) {
        assert_eq!((x.epoch, x.iter), (y.epoch, y.iter));
        assert_eq!(fingerprint(x), fingerprint(y));
    }
    // Aspect grouping: both images of a batch on the same side of w/h = 1.
    for bt in &a {
        let g: Vec<bool> = bt
            .metas
            .iter()
            .map(|m| ds.images[m.index].width > ds.images[m.index].height)
            .collect();
        assert!(g.iter().all(|&x| x == g[0]));
        assert_eq!(bt.shape[1], 3);
        assert_eq!(bt.images.len(), bt.shape.iter().product::<usize>());
        for (t, m) in bt.targets.iter().zip(&bt.metas) {
            assert_eq!(t.boxes.len(), 4 * t.labels.len());
            assert_eq!((t.masks.height, t.masks.width), m.pad_shape);
            assert!(t.labels.iter().all(|&l| (0..80).contains(&l)));
            // Mask targets on the GT boxes themselves are mostly foreground.
            let boxes: Vec<[f32; 4]> = t
                .boxes
                .chunks(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect();
            let inds: Vec<usize> = (0..boxes.len()).collect();
            let tg = t.masks.crop_and_resize(&boxes, &inds, 28);
            assert_eq!(tg.len(), boxes.len() * 784);
        }
        // Each image's own size, zero padding beyond it.
        let [_, _, h, w] = bt.shape;
        let m0 = &bt.metas[0];
        assert_eq!(bt.sizes[0], m0.img_shape);
        if m0.img_shape.1 < w {
            assert_eq!(bt.images[h * w - 1], 0);
        }
    }
    assert_ne!(a[0].epoch, a[44].epoch);
    // Different epochs shuffle differently.
    let flags = [0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0];
    let o0 = group_sampler_order(&flags, 2, 1, 0);
    let o1 = group_sampler_order(&flags, 2, 1, 1);
    assert_ne!(o0, o1);
    let mut s = o0.clone();
    s.sort();
    assert_eq!(s, (0..12).collect::<Vec<_>>());
    // Odd group sizes are padded with repeats to a multiple of the batch size (mmdet).
    let o = group_sampler_order(&flags[..10], 2, 1, 0);
    assert_eq!(o.len(), 12);
    for c in o.chunks(2) {
        assert_eq!(flags[c[0]], flags[c[1]]);
    }
}

#[test]
fn polygon_mode_agrees_with_bitmap_mode() {
    let ds = tiny();
    let i = ds.train_indices()[3];
    let mut a = load_state(&ds, i, true, MaskMode::Bitmap, true).unwrap();
    let mut b = load_state(&ds, i, true, MaskMode::Polygon, true).unwrap();
    for st in [&mut a, &mut b] {
        st.flip();
        st.resize_keep_ratio((500, 1333));
    }
    let (ma, mb) = (a.masks.unwrap(), b.masks.unwrap());
    for k in 0..ma.len() {
        let (da, db) = (ma.to_dense(k), mb.to_dense(k));
        let inter = da
            .iter()
            .zip(&db)
            .filter(|(x, y)| **x == 1 && **y == 1)
            .count() as f64;
        let uni = da
            .iter()
            .zip(&db)
            .filter(|(x, y)| **x == 1 || **y == 1)
            .count() as f64;
        if uni > 400.0 {
            assert!(inter / uni > 0.8, "mask {k}: IoU {}", inter / uni);
        }
    }
}
