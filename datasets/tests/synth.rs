//! Synthetic data: outlines rasterize back exactly, generated datasets load with the real loader.

use cnx_datasets::{raster, synth, CocoDataset};
use rand::{Rng, SeedableRng};

#[test]
fn outline_polygon_rasterizes_exactly() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        let (w, h) = (rng.gen_range(5..40), rng.gen_range(5..40));
        // Random blobs with holes and several components.
        let mut m = vec![0u8; w * h];
        for _ in 0..rng.gen_range(1..6) {
            let (cx, cy, r) = (
                rng.gen_range(0..w) as i64,
                rng.gen_range(0..h) as i64,
                rng.gen_range(1..8) as i64,
            );
            let hole = rng.gen_bool(0.3);
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let d = (x - cx).pow(2) + (y - cy).pow(2);
                    if d <= r * r {
                        m[(y as usize) * w + x as usize] =
                            if hole && d < r * r / 4 { 0 } else { 1 };
                    }
                }
            }
        }
        if m.iter().all(|&v| v == 0) {
            continue;
        }
        let poly = synth::mask_outline_polygon(&m, w, h);
        let r = raster::polygons_to_mask(&[poly], h, w);
        assert_eq!(r, m);
    }
}

#[test]
fn synth_coco_loads() {
    let dir = std::env::temp_dir().join(format!("cnx-synth-coco-{}", std::process::id()));
    let s = synth::coco(&dir, 20, 7).unwrap();
    assert_eq!(s.train_images, 16);
    assert_eq!(s.val_images, 4);
    assert!(s.annotations > 40);
    let ds = CocoDataset::load(
        dir.join("annotations/instances_train.json"),
        dir.join("train"),
    )
    .unwrap();
    assert_eq!(ds.num_classes(), 6);
    assert_eq!(ds.images.len(), 16);
    assert_eq!(ds.problems.total(), 0, "{:?}", ds.problems);
    // Every non-crowd polygon rasterizes to the annotated area.
    for a in &ds.anns {
        if let cnx_datasets::coco::Segmentation::Polygons(ps) = &a.segmentation {
            let im = ds.images.iter().find(|i| i.id == a.image_id).unwrap();
            let m = raster::polygons_to_mask(ps, im.height as usize, im.width as usize);
            let area: usize = m.iter().map(|&v| v as usize).sum();
            assert_eq!(area as f64, a.area);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
