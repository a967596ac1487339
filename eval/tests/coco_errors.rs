//! Bad input to COCO evaluation: each case is a clear error naming what and where, and an
//! empty results list evaluates to zeros (pycocotools raises on it).

use cnx_eval::coco::{self, CocoGt, Detection, IouType, Segmentation};
use cnx_eval::{EvalError, Rle};

fn gt() -> CocoGt {
    CocoGt::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/coco-tiny/annotations/instances_train2017.json"
    ))
    .unwrap()
}

fn det(image_id: i64, category_id: i64, score: f64) -> Detection {
    Detection {
        image_id,
        category_id,
        score,
        bbox: Some([10.0, 10.0, 50.0, 40.0]),
        segmentation: None,
    }
}

#[test]
fn unknown_image_is_named_with_count() {
    let g = gt();
    let dets = vec![det(262145, 1, 0.9), det(42, 1, 0.5), det(43, 1, 0.5)];
    let e = coco::evaluate(&g, &dets, IouType::Bbox).unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::UnknownImage {
                first: 42,
                count: 2,
                index: 1
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains("42") && msg.contains('2'), "{msg}");
}

#[test]
fn unknown_category() {
    let g = gt();
    let e = coco::evaluate(&g, &[det(262145, 12, 0.9)], IouType::Bbox).unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::UnknownCategory {
                first: 12,
                count: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn non_finite_scores() {
    let g = gt();
    let e = coco::evaluate(&g, &[det(262145, 1, f64::NAN)], IouType::Bbox).unwrap_err();
    assert!(
        matches!(e, EvalError::NonFiniteScore { index: 0, .. }),
        "{e}"
    );
    let e = coco::evaluate(&g, &[det(262145, 1, f64::INFINITY)], IouType::Bbox).unwrap_err();
    assert!(matches!(e, EvalError::NonFiniteScore { .. }), "{e}");
    // Python's json.dump writes NaN / Infinity literals, which are not JSON.
    for lit in ["NaN", "Infinity", "-Infinity"] {
        let text = format!(
            r#"[{{"image_id": 262145, "category_id": 1, "bbox": [1, 2, 3, 4], "score": {lit}}}]"#
        );
        let e = coco::parse_results(text.as_bytes(), "res.json").unwrap_err();
        assert!(matches!(e, EvalError::NonFiniteJson { .. }), "{lit}: {e}");
        assert!(e.to_string().contains("res.json"));
    }
}

#[test]
fn malformed_rle_in_results_names_the_result() {
    let g = gt();
    let bad_chars = r#"[{"image_id": 262145, "category_id": 1, "score": 0.5,
        "segmentation": {"size": [427, 640], "counts": "ab~~"}}]"#;
    let dets = coco::parse_results(bad_chars.as_bytes(), "res").unwrap();
    let e = coco::evaluate(&g, &dets, IouType::Segm).unwrap_err();
    assert!(
        matches!(
            e,
            EvalError::BadResult {
                index: 0,
                image_id: 262145,
                ..
            }
        ),
        "{e}"
    );
    // Counts not covering h*w.
    let short = Rle {
        h: 427,
        w: 640,
        counts: vec![10, 5],
    }
    .to_compressed_string();
    let text = format!(
        r#"[{{"image_id": 262145, "category_id": 1, "score": 0.5,
        "segmentation": {{"size": [427, 640], "counts": "{short}"}}}}]"#
    );
    let dets = coco::parse_results(text.as_bytes(), "res").unwrap();
    let e = coco::evaluate(&g, &dets, IouType::Segm).unwrap_err();
    assert!(e.to_string().contains("427x640"), "{e}");
    // A segmentation that is a flat list of numbers.
    let mut d = det(262145, 1, 0.5);
    d.segmentation = Some(Segmentation::Polygons(vec![vec![1.0, 2.0]]));
    let e = coco::evaluate(&g, &[d], IouType::Segm).unwrap_err();
    assert!(e.to_string().contains("polygon"), "{e}");
}

#[test]
fn malformed_polygon_in_gt_names_the_annotation() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/coco-tiny/annotations/instances_train2017.json"
    ))
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ann = &mut v["annotations"][3];
    let id = ann["id"].as_i64().unwrap();
    ann["segmentation"] = serde_json::json!([[1.0, 2.0, 3.0]]);
    let g = CocoGt::from_slice(v.to_string().as_bytes(), "gt").unwrap();
    let e = coco::evaluate(&g, &[], IouType::Segm).unwrap_err();
    assert!(
        matches!(e, EvalError::BadAnnotation { id: x, .. } if x == id),
        "{e}"
    );
    // bbox mode does not rasterize, so it still works.
    coco::evaluate(&g, &[], IouType::Bbox).unwrap();
}

#[test]
fn empty_results_give_zeros() {
    let g = gt();
    for t in [IouType::Bbox, IouType::Segm] {
        let ev = coco::evaluate(&g, &[], t).unwrap();
        assert_eq!(ev.num_detections, 0);
        assert_eq!(ev.summary.to_array(), [0.0; 12]);
    }
    let dets = coco::parse_results(b"[]", "empty").unwrap();
    assert!(dets.is_empty());
}

#[test]
fn results_without_box_or_mask() {
    let g = gt();
    let mut d = det(262145, 1, 0.5);
    d.bbox = None;
    let e = coco::evaluate(&g, &[d], IouType::Bbox).unwrap_err();
    assert!(e.to_string().contains("neither"), "{e}");
    // First result has a box: later ones need one too.
    let mut d2 = det(262145, 1, 0.5);
    d2.bbox = None;
    d2.segmentation = Some(Segmentation::Rle(Rle::zeros(427, 640)));
    let e = coco::evaluate(&g, &[det(262145, 1, 0.9), d2], IouType::Bbox).unwrap_err();
    assert!(matches!(e, EvalError::BadResult { index: 1, .. }), "{e}");
}

#[test]
fn detections_roundtrip_through_json() {
    let mut m = vec![0u8; 20 * 30];
    for (i, v) in m.iter_mut().enumerate() {
        *v = (i % 7 < 3) as u8;
    }
    let dets = vec![
        Detection {
            segmentation: Some(Segmentation::Rle(Rle::encode_row_major(&m, 20, 30))),
            ..det(262145, 1, 0.25)
        },
        Detection {
            bbox: None,
            segmentation: Some(Segmentation::Polygons(vec![vec![
                1.0, 2.0, 5.5, 2.0, 3.0, 7.0,
            ]])),
            ..det(262145, 2, 0.5)
        },
    ];
    let text = serde_json::to_string(&dets).unwrap();
    assert!(text.contains("\"counts\":\""), "{text}");
    let back = coco::parse_results(text.as_bytes(), "roundtrip").unwrap();
    assert_eq!(back, dets);
}
