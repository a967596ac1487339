//! mIoU parity with mmsegmentation's formula (torch.histc + float64 accumulation + nanmean),
//! on the ADE20K sample labels with perturbed predictions and on random data.

use std::io::Read;

use cnx_eval::miou::{self, Accumulator};
use serde_json::Value;

fn fixture_dir() -> String {
    format!("{}/tests/fixtures/eval", env!("CARGO_MANIFEST_DIR"))
}

fn gz(name: &str) -> Vec<u8> {
    let f = std::fs::File::open(format!("{}/{name}", fixture_dir())).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn expected() -> Value {
    let t = std::fs::read_to_string(format!("{}/miou_expected.json", fixture_dir())).unwrap();
    serde_json::from_str(&t).unwrap()
}

const ADE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/ade-sample");

fn check(acc: &Accumulator, names: &[String], want: &Value, what: &str) -> f64 {
    let u = |k: &str| -> Vec<u64> {
        want[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    assert_eq!(acc.intersect, u("intersect"), "{what}: intersect");
    assert_eq!(acc.union, u("union"), "{what}: union");
    assert_eq!(acc.pred_area, u("pred_area"), "{what}: pred");
    assert_eq!(acc.label_area, u("label_area"), "{what}: label");
    let s = acc.summary(names);
    let mut worst = 0.0f64;
    for (got, key) in [(s.aacc, "aAcc"), (s.miou, "mIoU"), (s.macc, "mAcc")] {
        let w = want[key].as_f64().unwrap();
        worst = worst.max((got - w).abs());
        assert!((got - w).abs() <= 1e-9, "{what}: {key} {got} vs {w}");
    }
    for (c, r) in s.per_class.iter().enumerate() {
        for (got, key) in [(r.iou, "IoU"), (r.acc, "Acc")] {
            let w = want[key][c].as_f64();
            match (got, w) {
                (None, None) => {}
                (Some(g), Some(w)) => {
                    worst = worst.max((g - w).abs());
                    assert!((g - w).abs() <= 1e-9, "{what}: class {c} {key} {g} vs {w}")
                }
                _ => panic!("{what}: class {c} {key}: {got:?} vs {w:?}"),
            }
        }
    }
    worst
}

#[test]
fn ade_sample_reduce_zero_label() {
    let ex = expected();
    let names = miou::load_class_names(format!("{ADE}/objectInfo150.txt")).unwrap();
    assert_eq!(names.len(), 150);
    assert_eq!(names[0], "wall");
    assert_eq!(names[1], "building");
    assert_eq!(names[149], "flag");
    let preds = gz("miou_ade_preds.u8.gz");
    let mut acc = Accumulator::new(150, true);
    let mut off = 0;
    for n in ex["ade"]["names"].as_array().unwrap() {
        let n = n.as_str().unwrap();
        let img = image::open(format!("{ADE}/annotations/validation/{n}.png"))
            .unwrap()
            .to_luma8();
        let label = img.as_raw();
        let p = &preds[off..off + label.len()];
        off += label.len();
        acc.add_named(p, label, n).unwrap();
    }
    assert_eq!(off, preds.len());
    let worst = check(&acc, &names, &ex["ade"]["reduce"], "ade");
    eprintln!("ade: max |ours - mmseg| = {worst:e}");
}

#[test]
fn random_labels() {
    let ex = expected();
    let raw = gz("miou_random.u8.gz");
    let mut plain = Accumulator::new(19, false);
    let mut reduce = Accumulator::new(18, true);
    let mut off = 0;
    for shp in ex["random"]["shapes"].as_array().unwrap() {
        let n = (shp[0].as_u64().unwrap() * shp[1].as_u64().unwrap()) as usize;
        let p = &raw[off..off + n];
        let l = &raw[off + n..off + 2 * n];
        off += 2 * n;
        plain.add(p, l).unwrap();
        let p2: Vec<u8> = p.iter().map(|&v| if v >= 18 { 0 } else { v }).collect();
        reduce.add(&p2, l).unwrap();
    }
    let w1 = check(&plain, &[], &ex["random"]["plain"], "random plain");
    let w2 = check(&reduce, &[], &ex["random"]["reduce"], "random reduce");
    eprintln!("random: max |ours - mmseg| = {:e}", w1.max(w2));
    // Merging two halves gives the same result as one pass.
    let mut a = Accumulator::new(19, false);
    let mut b = Accumulator::new(19, false);
    let mut off = 0;
    for (i, shp) in ex["random"]["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let n = (shp[0].as_u64().unwrap() * shp[1].as_u64().unwrap()) as usize;
        let (p, l) = (&raw[off..off + n], &raw[off + n..off + 2 * n]);
        off += 2 * n;
        if i % 2 == 0 {
            a.add(p, l).unwrap()
        } else {
            b.add(p, l).unwrap()
        }
    }
    a.merge(&b);
    assert_eq!(a.summary(&[]), plain.summary(&[]));
}

#[test]
fn bad_inputs() {
    let mut acc = Accumulator::new(150, true);
    let e = acc
        .add_named(&[150], &[1], "x.png")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.png") && e.contains("150"), "{e}");
    assert!(acc.add(&[1, 2], &[1]).is_err());
}
