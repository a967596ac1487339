//! The legacy (pre-1.6, non-zip) `torch.save` format, against files written by PyTorch
//! (tools/reference/gen_legacy_checkpoint.py): a module state dict with views sharing a storage,
//! 0-d and int64 tensors; the mmcv-style nested layout; storage views with CUDA locations as
//! torch <= 0.3 wrote them; truncated, foreign-class, big-endian and wrong-magic files refused with
//! the file and the reason named.

use cnx_backbone::checkpoint::{self, CheckpointError, LoadOptions, StateDict};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/legacy"
    ))
}

fn meta() -> serde_json::Value {
    let s = std::fs::read_to_string(dir().join("meta.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

/// A scratch directory for byte-edited copies of the fixtures.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnx-legacy-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Names, dtypes, shapes and values of `sd` equal the safetensors file's.
fn assert_same(sd: &StateDict, expected: &Path) {
    let want = Tensor::read_safetensors(expected).unwrap();
    let mut got_keys: Vec<&String> = sd.keys().collect();
    let mut want_keys: Vec<&String> = want.iter().map(|(k, _)| k).collect();
    got_keys.sort();
    want_keys.sort();
    assert_eq!(got_keys, want_keys);
    for (k, w) in &want {
        let g = sd.get(k).unwrap();
        assert_eq!(g.kind(), w.kind(), "{k}");
        assert_eq!(g.size(), w.size(), "{k}");
        assert!(g.equal(w), "{k}: values differ\n{g}\nvs\n{w}");
    }
}

fn refusal(path: &Path) -> (CheckpointError, String) {
    let err = checkpoint::read_state_dict(path).unwrap_err();
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn state_dict_matches_pytorch() {
    let sd = checkpoint::read_state_dict(dir().join("state_dict.pth")).unwrap();
    assert_same(&sd, &dir().join("expected.safetensors"));
    // The views were cut from their shared storage with offset and strides honoured.
    let base = sd.get("extra.base").unwrap();
    assert!(sd.get("extra.rows").unwrap().equal(&base.narrow(0, 1, 2)));
    let cols = base.slice(1, 1, 6, 2);
    assert!(sd.get("extra.cols").unwrap().equal(&cols));
    assert!(sd.get("extra.t").unwrap().equal(&base.tr()));
    // 0-d tensors (a float and the int64 BatchNorm counter), int64 beyond i32, float16.
    let scalar = sd.get("extra.scalar").unwrap();
    assert_eq!(scalar.size(), Vec::<i64>::new());
    assert_eq!(scalar.double_value(&[]), 2.5);
    let nbt = sd.get("1.num_batches_tracked").unwrap();
    assert_eq!((nbt.kind(), nbt.size()), (Kind::Int64, vec![]));
    assert_eq!(nbt.int64_value(&[]), 7);
    let i = sd.get("extra.int64").unwrap();
    assert_eq!(i.kind(), Kind::Int64);
    assert_eq!(i.int64_value(&[2]), 3_000_000_000);
    assert_eq!(sd.get("extra.half").unwrap().kind(), Kind::Half);
    assert_eq!(sd.get("0.weight").unwrap().size(), vec![3, 2, 3, 3]);
}

#[test]
fn nested_checkpoint_with_meta_and_optimizer_gives_its_state_dict() {
    // {'meta': {...}, 'state_dict': ..., 'optimizer': {... tensors ...}, 'args': Namespace}: the
    // optimizer's storages are skipped, the Namespace tolerated as metadata.
    let sd = checkpoint::read_state_dict(dir().join("nested.pth")).unwrap();
    assert_same(&sd, &dir().join("expected.safetensors"));
}

#[test]
fn storage_views_and_cuda_locations_match_torch_load() {
    let sd = checkpoint::read_state_dict(dir().join("storage_views.pth")).unwrap();
    assert_same(&sd, &dir().join("storage_views.safetensors"));
    assert_eq!(sd.get("view_scalar").unwrap().double_value(&[]), 6.5);
    assert_eq!(sd.get("in_view").unwrap().device(), Device::Cpu);
}

#[test]
fn truncated_file_is_refused_naming_the_storage_and_the_bytes() {
    let path = dir().join("truncated.pth");
    let (err, msg) = refusal(&path);
    assert!(matches!(err, CheckpointError::Legacy { .. }), "{err:?}");
    let m = &meta()["truncated"];
    let key = m["storage"].as_str().unwrap();
    let at = m["count_at"].as_u64().unwrap() + 8;
    for part in [
        "truncated.pth".to_string(),
        "truncated file".to_string(),
        format!("storage '{key}'"),
        format!("needs {} bytes", m["needs"]),
        format!("at byte {at}"),
        format!("only {} available", m["available"]),
    ] {
        assert!(msg.contains(&part), "{part:?} not in {msg}");
    }
}

#[test]
fn a_cut_anywhere_is_refused_as_truncated() {
    let bytes = std::fs::read(dir().join("state_dict.pth")).unwrap();
    let d = scratch("cut");
    let p = d.join("cut_here.pth");
    for n in 1..bytes.len() {
        std::fs::write(&p, &bytes[..n]).unwrap();
        let (err, msg) = refusal(&p);
        assert!(
            matches!(err, CheckpointError::Legacy { .. })
                && msg.contains("cut_here.pth")
                && msg.contains("truncated file"),
            "cut at {n}: {msg}"
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn foreign_class_is_refused_by_name() {
    let path = dir().join("foreign_class.pth");
    let (_, msg) = refusal(&path);
    assert!(msg.contains("foreign_class.pth"), "{msg}");
    assert!(msg.contains("collections.Counter"), "{msg}");
    assert!(msg.contains("'counts'"), "{msg}");
}

#[test]
fn big_endian_file_is_refused() {
    let (err, msg) = refusal(&dir().join("big_endian.pth"));
    assert!(matches!(err, CheckpointError::Legacy { .. }), "{err:?}");
    assert!(
        msg.contains("big_endian.pth") && msg.contains("big-endian"),
        "{msg}"
    );
}

#[test]
fn wrong_magic_protocol_and_plain_pickles_are_refused() {
    let bytes = std::fs::read(dir().join("state_dict.pth")).unwrap();
    let d = scratch("magic");
    // The magic number: PROTO 2, LONG1 of 10 bytes, then the bytes; flip one.
    assert_eq!(&bytes[..4], &[0x80, 2, 0x8a, 10]);
    let mut b = bytes.clone();
    b[6] ^= 0x01;
    let p = d.join("bad_magic.pth");
    std::fs::write(&p, &b).unwrap();
    let (_, msg) = refusal(&p);
    assert!(
        msg.contains("bad_magic.pth") && msg.contains("magic number"),
        "{msg}"
    );
    // The protocol version: PROTO 2, BININT2 1001, STOP right after the magic's STOP.
    assert_eq!(&bytes[15..21], &[0x80, 2, b'M', 0xe9, 0x03, b'.']);
    let mut b = bytes.clone();
    b[18] = 0xe8;
    let p = d.join("bad_protocol.pth");
    std::fs::write(&p, &b).unwrap();
    let (_, msg) = refusal(&p);
    assert!(
        msg.contains("bad_protocol.pth") && msg.contains("protocol version 1000, expected 1001"),
        "{msg}"
    );
    // A plain pickle of a dict (pickle.dump, not torch.save).
    let p = d.join("plain.pkl");
    std::fs::write(&p, [0x80, 2, b'}', b'q', 0, b'.']).unwrap();
    let (_, msg) = refusal(&p);
    assert!(
        msg.contains("plain.pkl") && msg.contains("magic number"),
        "{msg}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn classify_and_convert_paths_accept_legacy_files() {
    // `cnx convert`: read_state_dict + prepare + write_safetensors.
    let sd = checkpoint::read_state_dict(dir().join("nested.pth")).unwrap();
    let opts = LoadOptions::default().with_strip_prefix("extra.");
    let (out, skipped, timm) = checkpoint::prepare(&sd, &opts);
    assert!(!timm);
    assert_eq!(skipped, sd.len() - out.len());
    let d = scratch("convert");
    let st = d.join("converted.safetensors");
    out.write_safetensors(&st).unwrap();
    let back = checkpoint::read_state_dict(&st).unwrap();
    assert_eq!(back.len(), 7);
    assert!(back
        .get("cols")
        .unwrap()
        .equal(sd.get("extra.cols").unwrap()));
    std::fs::remove_dir_all(&d).ok();

    // `cnx classify --weights`: read_state_dict + to_official + load_into (strict) into a model.
    let sd = checkpoint::read_state_dict(dir().join("state_dict.pth"))
        .unwrap()
        .to_official()
        .select_prefix("2.");
    let mut vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let _w = root.zeros("weight", &[2, 4]);
    let _b = root.zeros("bias", &[2]);
    let report = checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.loaded.len(), 2);
    let vars = vs.variables();
    assert!(vars["weight"].equal(sd.get("weight").unwrap()));
    assert!(vars["bias"].equal(sd.get("bias").unwrap()));
}
