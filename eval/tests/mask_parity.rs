//! Mask API parity with pycocotools: counts, compressed strings, areas, boxes, IoUs and merges
//! must be bit-identical (fixtures from tools/reference/gen_eval.py).

use cnx_eval::mask::{self, Rle};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/eval/mask.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn bbox(v: &Value) -> [f64; 4] {
    let b = f64s(v);
    [b[0], b[1], b[2], b[3]]
}

fn us(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

fn coco_gt() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/coco-tiny/annotations/instances_train2017.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn random_masks_encode_string_area_bbox() {
    let fx = fixture();
    let mut rles = Vec::new();
    for r in fx["random"].as_array().unwrap() {
        let (h, w) = (us(&r["h"]), us(&r["w"]));
        let m: Vec<u8> = r["mask_rowmajor"]
            .as_str()
            .unwrap()
            .bytes()
            .map(|b| b - b'0')
            .collect();
        let rle = Rle::encode_row_major(&m, h, w);
        let counts: Vec<u32> = r["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(rle.counts, counts);
        assert_eq!(rle.to_compressed_string(), r["string"].as_str().unwrap());
        let back = Rle::from_compressed_string(r["string"].as_str().unwrap(), h, w).unwrap();
        assert_eq!(back, rle);
        assert_eq!(rle.area() as u64, r["area"].as_u64().unwrap());
        assert_eq!(rle.to_bbox(), bbox(&r["bbox"]));
        assert_eq!(rle.decode_row_major().unwrap(), m);
        // Column-major encode agrees with the row-major helper.
        let col = rle.decode().unwrap();
        assert_eq!(Rle::encode(&col, h, w), rle);
        rles.push(rle);
    }
    for case in fx["iou"].as_array().unwrap() {
        let idx: Vec<usize> = case["idx"].as_array().unwrap().iter().map(us).collect();
        let crowd: Vec<bool> = case["crowd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap() == 1)
            .collect();
        let set: Vec<Rle> = idx.iter().map(|&i| rles[i].clone()).collect();
        let got = mask::iou(&set, &set, &crowd);
        let want: Vec<f64> = case["iou"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(f64s)
            .collect();
        assert_eq!(got, want, "iou of masks {idx:?}");
        assert_eq!(
            Rle::merge(&set, false).to_compressed_string(),
            case["union"].as_str().unwrap()
        );
        assert_eq!(
            Rle::merge(&set, true).to_compressed_string(),
            case["intersection"].as_str().unwrap()
        );
    }
}

#[test]
fn boxes_iou_and_from_bbox() {
    let fx = fixture();
    let b = &fx["bbox_iou"];
    let boxes: Vec<[f64; 4]> = b["boxes"].as_array().unwrap().iter().map(bbox).collect();
    let crowd: Vec<bool> = b["crowd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() == 1)
        .collect();
    let want: Vec<f64> = b["iou"].as_array().unwrap().iter().flat_map(f64s).collect();
    assert_eq!(mask::iou_bbox(&boxes, &boxes, &crowd), want);
    for r in fx["from_bbox"].as_array().unwrap() {
        let rle = Rle::from_bbox(bbox(&r["bbox"]), us(&r["h"]), us(&r["w"]));
        assert_eq!(rle.to_compressed_string(), r["string"].as_str().unwrap());
    }
}

#[test]
fn random_polygons() {
    let fx = fixture();
    for r in fx["random_polygons"].as_array().unwrap() {
        let (h, w) = (us(&r["h"]), us(&r["w"]));
        let poly = f64s(&r["poly"]);
        let rle = Rle::from_polygon(&poly, h, w);
        assert_eq!(
            rle.to_compressed_string(),
            r["string"].as_str().unwrap(),
            "polygon {poly:?} on {h}x{w}"
        );
        assert_eq!(rle.area() as u64, r["area"].as_u64().unwrap());
        assert_eq!(rle.to_bbox(), bbox(&r["bbox"]));
        rle.validate().unwrap();
    }
}

#[test]
fn coco_tiny_polygons_and_crowd_rles() {
    let fx = fixture();
    let gt = coco_gt();
    let anns: std::collections::HashMap<i64, &Value> = gt["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_i64().unwrap(), a))
        .collect();
    let mut n_poly = 0;
    for r in fx["polygons"].as_array().unwrap() {
        let a = anns[&r["id"].as_i64().unwrap()];
        let (h, w) = (us(&r["h"]), us(&r["w"]));
        let polys: Vec<Vec<f64>> = a["segmentation"]
            .as_array()
            .unwrap()
            .iter()
            .map(f64s)
            .collect();
        for (p, want) in polys.iter().zip(r["parts"].as_array().unwrap()) {
            let rle = Rle::from_polygon(p, h, w);
            assert_eq!(rle.to_compressed_string(), want.as_str().unwrap());
            n_poly += 1;
        }
        let rle = Rle::from_segm_list(&polys, h, w).unwrap();
        assert_eq!(Rle::from_polygons(&polys, h, w), rle);
        assert_eq!(rle.to_compressed_string(), r["string"].as_str().unwrap());
        assert_eq!(rle.area() as u64, r["area"].as_u64().unwrap());
        assert_eq!(rle.to_bbox(), bbox(&r["bbox"]));
    }
    assert!(n_poly >= 699);
    let crowd = fx["crowd"].as_array().unwrap();
    assert_eq!(crowd.len(), 6);
    for r in crowd {
        let a = anns[&r["id"].as_i64().unwrap()];
        let seg = &a["segmentation"];
        let size = f64s(&seg["size"]);
        let counts: Vec<u32> = seg["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let rle = Rle::new(size[0] as usize, size[1] as usize, counts).unwrap();
        assert_eq!(rle.to_compressed_string(), r["string"].as_str().unwrap());
        assert_eq!(rle.area() as u64, r["area"].as_u64().unwrap());
        assert_eq!(rle.to_bbox(), bbox(&r["bbox"]));
    }
}

#[test]
fn coco_tiny_pairwise_iou() {
    let fx = fixture();
    let gt = coco_gt();
    let imgs: std::collections::HashMap<i64, (usize, usize)> = gt["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_i64().unwrap(),
                (us(&i["height"]), us(&i["width"])),
            )
        })
        .collect();
    let anns: std::collections::HashMap<i64, &Value> = gt["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_i64().unwrap(), a))
        .collect();
    for case in fx["ann_iou"].as_array().unwrap() {
        let (h, w) = imgs[&case["image_id"].as_i64().unwrap()];
        let mut rles = Vec::new();
        let mut boxes = Vec::new();
        let mut crowd = Vec::new();
        for id in case["ids"].as_array().unwrap() {
            let a = anns[&id.as_i64().unwrap()];
            let seg = &a["segmentation"];
            let rle = if let Some(list) = seg.as_array() {
                let polys: Vec<Vec<f64>> = list.iter().map(f64s).collect();
                Rle::from_segm_list(&polys, h, w).unwrap()
            } else {
                let size = f64s(&seg["size"]);
                let counts = seg["counts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                Rle::new(size[0] as usize, size[1] as usize, counts).unwrap()
            };
            rles.push(rle);
            boxes.push(bbox(&a["bbox"]));
            crowd.push(a["iscrowd"].as_u64().unwrap() == 1);
        }
        let want: Vec<f64> = case["iou"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(f64s)
            .collect();
        assert_eq!(mask::iou(&rles, &rles, &crowd), want);
        let want: Vec<f64> = case["bbox_iou"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(f64s)
            .collect();
        assert_eq!(mask::iou_bbox(&boxes, &boxes, &crowd), want);
    }
}
