//! COCOeval parity with pycocotools on coco-tiny plus generated results (jittered boxes,
//! duplicates, false positives, crowd hits, > 100 detections, images without detections,
//! categories without GT, compressed-RLE masks). Fixtures: tools/reference/gen_eval.py.

use std::io::Read;

use cnx_eval::coco::{self, CocoGt, Detection, GtFile, IouType};
use serde_json::Value;

fn gz(name: &str) -> Vec<u8> {
    let p = format!("{}/tests/fixtures/eval/{name}", env!("CARGO_MANIFEST_DIR"));
    let f = std::fs::File::open(&p).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gt_path() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/coco-tiny/annotations/instances_train2017.json"
    )
    .to_string()
}

fn gt_dropped(drop: &[i64]) -> CocoGt {
    let bytes = std::fs::read(gt_path()).unwrap();
    let mut f: GtFile = serde_json::from_slice(&bytes).unwrap();
    f.annotations.retain(|a| !drop.contains(&a.category_id));
    CocoGt::new(f).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-12
}

#[test]
fn cocoeval_matches_pycocotools() {
    let expected: Value = serde_json::from_slice(&gz("coco_expected.json.gz")).unwrap();
    let drop: Vec<i64> = expected["drop_categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let gt = gt_dropped(&drop);
    let full = coco::parse_results(&gz("coco_results_full.json.gz"), "fixture").unwrap();
    let bbox_only: Vec<Detection> = full
        .iter()
        .cloned()
        .map(|mut d| {
            d.segmentation = None;
            d
        })
        .collect();
    let segm_only: Vec<Detection> = full
        .iter()
        .cloned()
        .map(|mut d| {
            d.bbox = None;
            d
        })
        .collect();
    let mut worst = 0.0f64;
    for (name, case) in expected["cases"].as_object().unwrap() {
        let dets = match case["results"].as_str().unwrap() {
            "bbox" => &bbox_only,
            "segm" => &segm_only,
            _ => &full,
        };
        let iou_type = match case["iou_type"].as_str().unwrap() {
            "bbox" => IouType::Bbox,
            _ => IouType::Segm,
        };
        let ev = coco::evaluate(&gt, dets, iou_type).unwrap();
        // Parameters.
        assert_eq!(coco::iou_thrs().to_vec(), f64s(&case["iou_thrs"]));
        assert_eq!(coco::rec_thrs().to_vec(), f64s(&case["rec_thrs"]));
        let cat_ids: Vec<i64> = case["cat_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(ev.cat_ids, cat_ids);
        // The 12 stats.
        let want = f64s(&case["stats"]);
        let got = ev.summary.to_array();
        for i in 0..12 {
            worst = worst.max((got[i] - want[i]).abs());
            assert!(
                close(got[i], want[i]),
                "{name}: stat {i}: {} vs {}",
                got[i],
                want[i]
            );
        }
        assert_eq!(
            ev.summary.format_pycocotools(),
            case["summary_text"].as_str().unwrap(),
            "{name}: printed summary"
        );
        // Precision [T,R,K,A,M] (run-length coded rows in the fixture).
        let rle = f64s(&case["precision_rle"]);
        let (t_, r_, k_, a_, m_) = (10, 101, ev.k(), 4, 3);
        let mut it = rle.chunks(2);
        for t in 0..t_ {
            for k in 0..k_ {
                for a in 0..a_ {
                    for m in 0..m_ {
                        let mut r = 0;
                        while r < r_ {
                            let c = it.next().unwrap();
                            for _ in 0..c[1] as usize {
                                let g = ev.precision_at(t, r, k, a, m);
                                worst = worst.max((g - c[0]).abs());
                                assert!(
                                    close(g, c[0]),
                                    "{name}: precision[{t},{r},{k},{a},{m}] {g} vs {}",
                                    c[0]
                                );
                                r += 1;
                            }
                        }
                    }
                }
            }
        }
        let rec = f64s(&case["recall"]);
        assert_eq!(rec.len(), ev.recall.len());
        for (i, (g, w)) in ev.recall.iter().zip(&rec).enumerate() {
            assert!(close(*g, *w), "{name}: recall[{i}] {g} vs {w}");
        }
        // Per-category AP.
        let pc = ev.per_category_ap();
        for (k, w) in case["per_category_ap"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            match (pc[k].2, w.as_f64()) {
                (None, None) => {}
                (Some(g), Some(w)) => assert!(close(g, w), "{name}: cat {k} AP {g} vs {w}"),
                (g, w) => panic!("{name}: cat {k} AP {g:?} vs {w:?}"),
            }
        }
    }
    eprintln!("max |ours - pycocotools| over stats and precision: {worst:e}");
}
