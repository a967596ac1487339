//! The backbone subcommands as a user runs them: `cnx flops`, `cnx classify`, `cnx convert`,
//! including their error messages for bad input (unknown model, unreadable image, a checkpoint
//! of another model).

mod common;
use common::{cnx, stderr, stdout};

use cnx_backbone::checkpoint::{self, StateDict};
use cnx_backbone::convnext::{ConvNeXt, ConvNeXtConfig};
use std::path::{Path, PathBuf};

use std::sync::{Mutex, OnceLock};
use tch::nn::VarStore;

fn tmp_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("cnx-cli-backbone-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// A randomly initialised checkpoint of a named variant (bf16 safetensors, to keep it small),
/// written once per test process.
fn variant_checkpoint(name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let path = tmp_dir().join(format!("{name}.safetensors"));
    if !path.exists() {
        let vs = VarStore::new(tch::Device::Cpu);
        let _m = ConvNeXt::new_uninit(vs.root(), &ConvNeXtConfig::by_name(name).unwrap());
        let mut sd = StateDict::new();
        for (k, v) in vs.variables() {
            // head scaled down so the random classifier's softmax is not degenerate
            let v = if k.starts_with("head.") {
                v.detach() * 0.01
            } else {
                v.detach()
            };
            sd.insert(k, v.to_kind(tch::Kind::BFloat16));
        }
        sd.write_safetensors(&path).unwrap();
    }
    path
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn flops_json_for_convnext_tiny() {
    let o = cnx(&["flops", "convnext_tiny", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["model"], "convnext_tiny");
    assert_eq!(v["input"], serde_json::json!([224, 224]));
    assert_eq!(v["params"], 28_589_128);
    let f = v["flops"].as_f64().unwrap();
    assert!((f / 1e9 - 4.5).abs() < 0.05, "{f}");
    let o = cnx(&["flops", "convnext_tiny", "--input", "256x320"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("256x320"), "{}", stdout(&o));
}

#[test]
fn unknown_model_lists_the_valid_ones() {
    for args in [
        vec!["flops", "convnext_giant"],
        vec![
            "classify",
            "--model",
            "convnext_giant",
            "--weights",
            "x.pth",
            "Cargo.toml",
        ],
    ] {
        let o = cnx(&args);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("convnext_giant"), "{e}");
        for v in [
            "convnext_tiny",
            "convnext_small",
            "convnext_base",
            "convnext_large",
            "convnext_xlarge",
        ] {
            assert!(e.contains(v), "{e}");
        }
    }
}

#[test]
fn unreadable_images_are_named() {
    let o = cnx(&[
        "classify",
        "--model",
        "convnext_tiny",
        "--weights",
        "x.pth",
        "/nonexistent/cat.jpg",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/cat.jpg"),
        "{}",
        stderr(&o)
    );
    let bogus = tmp_dir().join("not_an_image.jpg");
    std::fs::write(&bogus, b"plain text").unwrap();
    let w = variant_checkpoint("convnext_tiny");
    let o = cnx(&[
        "classify",
        "--model",
        "convnext_tiny",
        "--weights",
        w.to_str().unwrap(),
        bogus.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not_an_image.jpg"), "{}", stderr(&o));
}

#[test]
fn classify_json_and_text() {
    let w = variant_checkpoint("convnext_tiny");
    let png = repo("tests/fixtures/classify/synthetic.png");
    let jpg = repo("tests/data/coco-tiny/train2017/000000008193.jpg");
    let imgs = vec![
        png.to_str().unwrap().to_string(),
        png.to_str().unwrap().to_string(),
        jpg.to_str().unwrap().to_string(),
    ];
    let mut args = vec![
        "classify",
        "--model",
        "convnext_tiny",
        "--weights",
        w.to_str().unwrap(),
        "--topk",
        "3",
        "--json",
    ];
    args.extend(imgs.iter().map(String::as_str));
    let o = cnx(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), imgs.len());
    for (entry, img) in list.iter().zip(&imgs) {
        assert_eq!(entry["image"].as_str().unwrap(), img);
        let top = entry["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
        assert!(probs.windows(2).all(|p| p[0] >= p[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-6);
        assert!(top
            .iter()
            .all(|t| (0..1000).contains(&t["class"].as_i64().unwrap())));
    }
    assert_eq!(list[0]["top"], list[1]["top"], "same image, same answer");
    // text output names ImageNet classes; crop-pct 1.0 path
    let o = cnx(&[
        "classify",
        "--model",
        "convnext_tiny",
        "--weights",
        w.to_str().unwrap(),
        "--crop-pct",
        "1.0",
        "--size",
        "160",
        &imgs[0],
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 1 + 5, "{text}");
    assert!(text.lines().nth(1).unwrap().contains('%'));
}

#[test]
fn small_checkpoint_into_tiny_fails_listing_tensors() {
    let w = variant_checkpoint("convnext_small");
    let png = repo("tests/fixtures/classify/synthetic.png");
    let o = cnx(&[
        "classify",
        "--model",
        "convnext_tiny",
        "--weights",
        w.to_str().unwrap(),
        png.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("162 unexpected"), "{e}");
    assert!(e.contains("stages.2.9.dwconv.weight [384, 1, 7, 7]"), "{e}");
    assert!(e.contains("stages.2.26.pwconv2.bias [384]"), "{e}");
}

#[test]
fn convert_timm_and_mmdet_checkpoints() {
    let fx = repo("backbone/tests/fixtures/convnext");
    let out = tmp_dir().join("mini_official.safetensors");
    let o = cnx(&[
        "convert",
        fx.join("timm.pth").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("timm names mapped"), "{}", stdout(&o));
    let a = checkpoint::read_state_dict(&out).unwrap();
    let b = checkpoint::read_state_dict(fx.join("official.pth")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.iter().all(|(k, t)| t.equal(b.get(k).unwrap())));

    // whole mmdet model: every key kept (num_batches_tracked dropped)
    let out = tmp_dir().join("mini_det.safetensors");
    let o = cnx(&[
        "convert",
        fx.join("dense_mmdet.pth").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = checkpoint::read_state_dict(&out).unwrap();
    assert!(d.get("neck.lateral_convs.0.conv.weight").is_some());
    assert!(d.get("backbone.norm0.weight").is_some());
    assert!(!d.keys().any(|k| k.ends_with("num_batches_tracked")));

    // the backbone out of it, and ImageNet weights made detector-ready
    let out = tmp_dir().join("mini_bb.safetensors");
    let o = cnx(&[
        "convert",
        fx.join("dense_mmdet.pth").to_str().unwrap(),
        out.to_str().unwrap(),
        "--strip-prefix",
        "backbone.",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bb = checkpoint::read_state_dict(&out).unwrap();
    assert!(bb
        .keys()
        .all(|k| !k.starts_with("backbone.") && !k.starts_with("neck.")));
    assert!(bb.get("norm3.bias").is_some());
    let out = tmp_dir().join("mini_prefixed.safetensors");
    let o = cnx(&[
        "convert",
        fx.join("timm.safetensors").to_str().unwrap(),
        out.to_str().unwrap(),
        "--prefix",
        "backbone.",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = checkpoint::read_state_dict(&out).unwrap();
    assert!(p.get("backbone.stages.0.0.dwconv.weight").is_some());
    assert!(p.keys().all(|k| k.starts_with("backbone.")));
}

/// A random classifier of any family saved as safetensors in its own layout, with `rename`
/// applied to every key (to write the layouts other tools use).
fn classifier_checkpoint(model: &str, file: &str, rename: impl Fn(&str) -> String) -> PathBuf {
    let path = tmp_dir().join(file);
    tch::manual_seed(7);
    let vs = VarStore::new(tch::Device::Cpu);
    let _m = cnx_backbone::config::build_classifier(&vs.root(), model, 1000).unwrap();
    let mut sd = StateDict::new();
    for (k, v) in vs.variables() {
        sd.insert(rename(&k), v.detach());
    }
    sd.write_safetensors(&path).unwrap();
    path
}

/// `cnx classify` takes every backbone family, not only ConvNeXt: Swin-T and ResNet-50 (the
/// latter from a torchvision-style checkpoint with a `module.` prefix and BN step counters, which
/// must give the same predictions as plain names).
#[test]
fn classify_swin_and_resnet_checkpoints() {
    let img = repo("tests/data/coco-tiny/train2017/000000008193.jpg");
    let img = img.to_str().unwrap();
    let run = |model: &str, w: &Path| {
        let o = cnx(&[
            "classify",
            "--model",
            model,
            "--weights",
            w.to_str().unwrap(),
            "--device",
            "cpu",
            "--topk",
            "3",
            "--json",
            img,
        ]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let top = v[0]["top"].as_array().unwrap().clone();
        assert_eq!(top.len(), 3, "{model}");
        top
    };
    let swin = classifier_checkpoint("swin_tiny", "swin_tiny.safetensors", |k| k.to_string());
    let top = run("swin_tiny", &swin);
    let p0 = top[0]["prob"].as_f64().unwrap();
    assert!(p0 > 0.0 && p0 <= 1.0);

    let plain = classifier_checkpoint("resnet50", "r50.safetensors", |k| k.to_string());
    let torchvision = classifier_checkpoint("resnet50", "r50_module.safetensors", |k| {
        format!("module.{k}")
    });
    assert_eq!(run("resnet50", &plain), run("resnet50", &torchvision));

    // A ConvNeXt name with a ResNet file is refused naming the missing head.
    let o = cnx(&[
        "classify",
        "--model",
        "swin_tiny",
        "--weights",
        plain.to_str().unwrap(),
        img,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("head.weight"), "{}", stderr(&o));
}
