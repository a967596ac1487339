//! UperNet + ConvNeXt against mmsegmentation 0.30's EncoderDecoder (fixtures from
//! tools/reference/gen_segmentation.py): the same random weights, loaded from an mmseg-layout
//! checkpoint, give the same logits on the real ADE20K sample images in whole, slide and
//! multi-scale + flip inference, and the same training losses.

mod common;

use cnx_heads::segmentor::Segmentor;
use common::segmentation_fixture::{check, check_forward_train, ints, json};
use std::collections::HashMap;
use tch::{nn::VarStore, Device};

#[test]
fn whole_inference_matches_mmseg() {
    check("whole");
}

#[test]
fn slide_inference_matches_mmseg() {
    check("slide");
}

#[test]
fn aug_test_matches_mmseg() {
    check("aug");
}

#[test]
fn forward_train_losses_match_mmseg() {
    check_forward_train();
}

#[test]
fn full_tiny_names_and_shapes_match_mmseg() {
    let r = json("names_tiny.json");
    let cfg = cnx::engine::presets::segmentor("upernet_convnext_tiny_512_160k").unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _seg = Segmentor::new_uninit(&vs.root(), &cfg).unwrap();
    let ours: HashMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect();
    let theirs = r["shapes"].as_object().unwrap();
    let mut n = 0;
    for (k, s) in theirs {
        if k.ends_with("num_batches_tracked") {
            continue;
        }
        let s: Vec<i64> = ints(s);
        assert_eq!(ours.get(k), Some(&s), "{k}");
        n += 1;
    }
    assert_eq!(n, ours.len(), "variables beyond mmseg's state dict");
    assert_eq!(
        cnx_backbone::nn::param_count(&vs),
        r["params"].as_i64().unwrap()
    );
}

/// The paper's params / FLOPs at 2048x512 (60M/939G, 82M/1027G, 122M/1170G). Slow on CPU (one
/// full-size forward per model): `cargo test --release -p cnx-heads --test segmentation -- --ignored`.
#[test]
#[ignore]
fn paper_flops_at_2048x512() {
    for (preset, params_m, gflops) in [
        ("upernet_convnext_tiny_512_160k", 60.0, 939.0),
        ("upernet_convnext_small_512_160k", 82.0, 1027.0),
        ("upernet_convnext_base_512_160k", 122.0, 1170.0),
    ] {
        let cfg = cnx::engine::presets::segmentor(preset).unwrap();
        let t = std::time::Instant::now();
        let (p, tally) = cnx_heads::segmentor::complexity(&cfg, [512, 2048]).unwrap();
        let (pm, g) = (p as f64 / 1e6, tally.total / 1e9);
        eprintln!(
            "{preset}: {pm:.2}M params, {g:.1}G FLOPs ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
        assert!((pm - params_m).abs() < 0.5, "{preset} params {pm}");
        assert!((g - gflops).abs() / gflops < 0.005, "{preset} FLOPs {g}");
    }
}
