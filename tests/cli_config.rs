//! `cnx config` as a user runs it: the precision each preset's config shows, and the optimizer
//! groups of `cnx config groups` (text and `--json`), with its error for an unknown preset.

mod common;
use common::{cnx, stdout};

#[test]
fn config_show_says_fp32_for_large_and_xlarge_and_fp16_otherwise() {
    for (preset, amp) in [
        ("cascade_mask_rcnn_convnext_large_3x_in22k", "fp32"),
        ("upernet_convnext_xlarge_640_160k_in22k", "fp32"),
        ("cascade_mask_rcnn_convnext_base_3x_in22k", "fp16"),
        ("upernet_convnext_small_512_160k", "fp16"),
    ] {
        let o = cnx(&["config", "show", preset]);
        assert!(o.status.success(), "{preset}");
        let s = stdout(&o);
        assert!(s.contains(&format!("amp = \"{amp}\"")), "{preset}:\n{s}");
    }
}

#[test]
fn config_groups_prints_every_parameter_as_text_and_json() {
    let preset = "demo_upernet_convnext_nano";
    let o = cnx(&["config", "groups", preset, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["preset"], preset);
    assert_eq!(j["base_lr"].as_f64(), Some(2e-3));
    let params = j["params"].as_object().unwrap();
    // Stage-wise: the stem's LayerNorm is in layer 0 (no decay), a head conv in the last layer.
    let stem = &params["backbone.downsample_layers.0.1.weight"];
    assert_eq!(stem["weight_decay"].as_f64(), Some(0.0));
    let head = &params["decode_head.fpn_bottleneck.conv.weight"];
    assert_eq!(head["lr_scale"].as_f64(), Some(1.0));
    assert_eq!(head["weight_decay"].as_f64(), Some(0.05));

    let o = cnx(&["config", "groups", preset]);
    let text = stdout(&o);
    assert!(o.status.success());
    assert!(
        text.contains(&format!("{} trainable parameters", params.len())),
        "{text}"
    );

    let o = cnx(&["config", "groups", "upernet_convnext_huge"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset"));
}
