//! `cnx benchmark` as a user runs it: the demo presets' inference and training steps on the
//! CPU, small inputs, and the documented `--json` keys with their types and consistency (the
//! phase times fit in the iteration, positive speed and memory). Speed itself is measured in
//! bench/, never asserted here.

mod common;
use common::{cnx, stderr, stdout};
use serde_json::Value;

/// Run `cnx benchmark PRESET --iters 2 --warmup 1 --batch 2 --device cpu --json EXTRA...` and
/// check everything the README documents for it.
fn bench(preset: &str, extra: &[&str], train: bool) -> Value {
    let mut args = vec![
        "benchmark",
        preset,
        "--iters",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--device",
        "cpu",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = cnx(&args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let out = stdout(&o);
    let j: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let num = |k: &str| {
        j[k].as_f64()
            .unwrap_or_else(|| panic!("{k} is not a number: {j}"))
    };
    assert_eq!(j["preset"].as_str(), Some(preset), "{j}");
    assert_eq!(j["device"].as_str(), Some("cpu"), "{j}");
    assert_eq!(j["batch"].as_i64(), Some(2), "{j}");
    assert_eq!(j["train"].as_bool(), Some(train), "{j}");
    assert_eq!(j["amp"].as_str(), Some("fp32"), "{j}");
    assert_eq!(j["iters"].as_i64(), Some(2), "{j}");
    let input: Vec<i64> = j["input"]
        .as_array()
        .unwrap_or_else(|| panic!("input: {j}"))
        .iter()
        .map(|v| v.as_i64().expect("input entries are integers"))
        .collect();
    assert_eq!(input.len(), 2, "{j}");
    assert!(input.iter().all(|&v| v > 0), "{j}");
    let ms = num("ms_per_iter");
    assert!(ms > 0.0, "{j}");
    let ips = num("images_per_s");
    assert!(ips > 0.0, "{j}");
    // images/s is the batch over the mean iteration time.
    assert!((ips - 2e3 / ms).abs() <= 1e-6 * ips, "{j}");
    assert!(num("peak_mem_mb") > 0.0, "{j}");
    let phases = ["forward_ms", "backward_ms", "optimizer_ms"];
    if train {
        let sum: f64 = phases.iter().map(|k| num(k)).sum();
        assert!(phases.iter().all(|k| num(k) > 0.0), "{j}");
        assert!(
            sum <= ms * 1.05 + 1.0,
            "phases {sum} ms > iteration {ms} ms: {j}"
        );
    } else {
        for k in phases {
            assert!(j.get(k).is_none(), "{k} without --train: {j}");
        }
    }
    // Progress goes to stderr, never into the JSON on stdout.
    assert!(stderr(&o).contains("benchmark: iter 2/2"), "{}", stderr(&o));
    j
}

#[test]
fn detector_inference_and_training_step() {
    let j = bench(
        "demo_mask_rcnn_convnext_nano",
        &["--input", "256x256"],
        false,
    );
    assert_eq!(j["input"], serde_json::json!([256, 256]));
    assert!(j["detections_per_image"].as_f64().is_some(), "{j}");
    // The heads' host reads per iteration are counted (NMS, proposals, the extractor's plan:
    // a few per image, far below one per detection) and reported.
    let reads = j["host_reads_per_iter"]
        .as_f64()
        .expect("host_reads_per_iter");
    assert!(reads > 0.0 && reads < 60.0, "{j}");
    assert!(j["uploads_per_iter"].as_f64().is_some(), "{j}");
    // 250x250 is padded up to the size divisor 32, as the test pipeline pads.
    let j = bench(
        "demo_mask_rcnn_convnext_nano",
        &["--input", "250x250", "--train"],
        true,
    );
    assert_eq!(j["input"], serde_json::json!([256, 256]));
    assert_eq!(j["img_shape"], serde_json::json!([250, 250]));
    let reads = j["host_reads_per_iter"]
        .as_f64()
        .expect("host_reads_per_iter");
    assert!(reads > 0.0 && reads < 60.0, "{j}");
}

#[test]
fn segmentor_inference_at_the_crop_size() {
    let j = bench("demo_upernet_convnext_nano", &[], false);
    // The demo preset's crop.
    assert_eq!(j["input"], serde_json::json!([128, 128]));
}

#[test]
fn unknown_preset_and_cpu_fp16_are_errors() {
    let o = cnx(&["benchmark", "no_such_preset", "--device", "cpu"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("no_such_preset") && e.contains("demo_mask_rcnn_convnext_nano"),
        "{e}"
    );
    let o = cnx(&[
        "benchmark",
        "demo_upernet_convnext_nano",
        "--device",
        "cpu",
        "--amp",
        "fp16",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--amp fp16 needs a CUDA device"),
        "{}",
        stderr(&o)
    );
}
