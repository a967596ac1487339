//! The torch.save pickle reader and the other checkpoint formats, against files written by
//! PyTorch (tools/reference/gen_backbone.py): views with offsets and strides, every storage dtype,
//! metadata objects tolerated, unknown objects in tensor positions refused, legacy files read.

mod convnext_support;

use cnx_backbone::checkpoint::{self, StateDict};
use convnext_support::fixture_dir;
use tch::{Kind, Tensor};

#[test]
fn views_dtypes_and_shared_storages_match_pytorch() {
    let dir = fixture_dir().join("pickle");
    let sd = checkpoint::read_state_dict(dir.join("views.pth")).unwrap();
    let expected = Tensor::read_safetensors(dir.join("expected.safetensors")).unwrap();
    assert_eq!(sd.len(), expected.len());
    for (k, want) in &expected {
        let got = sd.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(got.kind(), want.kind(), "{k}");
        assert_eq!(got.size(), want.size(), "{k}");
        assert!(got.equal(want), "{k}: values differ");
    }
    assert_eq!(sd.get("int64").unwrap().int64_value(&[2]), 3_000_000_000);
    assert_eq!(sd.get("scalar").unwrap().size(), Vec::<i64>::new());
    assert_eq!(sd.get("bool").unwrap().kind(), Kind::Bool);
}

#[test]
fn metadata_objects_are_tolerated() {
    // official.pth carries an argparse.Namespace beside 'model'; dense_mmdet.pth a 'meta' dict
    // with tuples, nested dicts and a Namespace, plus optimizer state.
    let sd = checkpoint::read_state_dict(fixture_dir().join("official.pth")).unwrap();
    assert!(sd.get("stages.0.0.gamma").is_some());
    let sd = checkpoint::read_state_dict(fixture_dir().join("dense_mmdet.pth")).unwrap();
    assert!(sd.get("backbone.norm3.weight").is_some());
    assert!(sd.get("neck.lateral_convs.0.conv.weight").is_some());
}

#[test]
fn unknown_object_in_a_tensor_position_is_refused_by_name() {
    let path = fixture_dir().join("pickle/bad_entry.pth");
    let err = checkpoint::read_state_dict(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad_entry.pth"), "{msg}");
    assert!(msg.contains("argparse.Namespace"), "{msg}");
    assert!(msg.contains("'bad'"), "{msg}");
}

#[test]
fn legacy_format_is_read() {
    // torch.save(..., _use_new_zipfile_serialization=False); the format's own tests are in
    // legacy_checkpoint.rs.
    let sd = checkpoint::read_state_dict(fixture_dir().join("pickle/legacy.pth")).unwrap();
    assert_eq!(sd.len(), 1);
    assert!(sd
        .get("w")
        .unwrap()
        .equal(&Tensor::ones([2], (Kind::Float, tch::Device::Cpu))));
}

#[test]
fn garbage_and_missing_files_name_the_file() {
    let dir = std::env::temp_dir().join(format!("cnx-ckpt-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"hello, this is not a checkpoint").unwrap();
    let msg = checkpoint::read_state_dict(&junk).unwrap_err().to_string();
    assert!(msg.contains("junk.bin"), "{msg}");
    // a truncated zip archive
    let bytes = std::fs::read(fixture_dir().join("official.pth")).unwrap();
    let cut = dir.join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = checkpoint::read_state_dict(&cut).unwrap_err().to_string();
    assert!(msg.contains("cut.pth"), "{msg}");
    let msg = checkpoint::read_state_dict(dir.join("nope.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope.pth"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn safetensors_round_trip_keeps_names_and_dtypes() {
    let dir = std::env::temp_dir().join(format!("cnx-st-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut sd = StateDict::new();
    sd.insert(
        "a.weight",
        Tensor::arange(12, (Kind::Float, tch::Device::Cpu))
            .view([3, 4])
            .tr(),
    );
    sd.insert(
        "b",
        Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::BFloat16),
    );
    sd.insert("c", Tensor::from_slice(&[7i64]));
    let p = dir.join("x.safetensors");
    sd.write_safetensors(&p).unwrap();
    let back = checkpoint::read_state_dict(&p).unwrap();
    assert_eq!(back.len(), 3);
    for (k, t) in sd.iter() {
        let b = back.get(k).unwrap();
        assert_eq!(b.kind(), t.kind());
        assert!(b.equal(t), "{k}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn timm_and_official_files_agree() {
    let a = checkpoint::read_state_dict(fixture_dir().join("official.pth")).unwrap();
    let b = checkpoint::read_state_dict(fixture_dir().join("timm.pth")).unwrap();
    let c = checkpoint::read_state_dict(fixture_dir().join("timm.safetensors")).unwrap();
    assert!(b.is_timm_convnext() && !a.is_timm_convnext());
    let (b, c) = (b.to_official(), c.to_official());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
    for (k, t) in a.iter() {
        assert!(
            t.equal(b.get(k).unwrap()) && t.equal(c.get(k).unwrap()),
            "{k}"
        );
    }
}
