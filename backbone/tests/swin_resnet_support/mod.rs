//! Shared by the Swin / ResNet parity tests: rebuilds the hashed weights and inputs that
//! tools/reference/gen_swin_resnet.py fed the reference models (recipe in the fixture JSON),
//! loads them into a VarStore by name, and compares outputs.

use std::collections::{BTreeMap, HashSet};
use tch::{nn::VarStore, Tensor};

pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/swin_resnet");

/// splitmix64 of (stream << 40 | i) → 24-bit uniform → value with the given mean and std;
/// identical to `hashed` in gen_swin_resnet.py.
pub fn hashed(shape: &[i64], stream: u64, mean: f64, std: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let s3 = 3f64.sqrt();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z = (stream << 40) | i;
            z = z.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            (mean + (std * s3) * (2.0 * u - 1.0)) as f32
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

fn spec(v: &serde_json::Value) -> Tensor {
    let shape: Vec<i64> = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    hashed(
        &shape,
        v["stream"].as_u64().unwrap(),
        v["mean"].as_f64().unwrap(),
        v["std"].as_f64().unwrap(),
    )
}

/// A reference case: the state dict in the reference's names, the input, the outputs.
pub struct Case {
    pub state: Vec<(String, Tensor)>,
    pub input: Tensor,
    pub outputs: BTreeMap<String, Tensor>,
}

pub fn load_case(case: &str) -> Case {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/{case}.json")).unwrap())
            .unwrap();
    let state = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), spec(p)))
        .collect();
    let outputs = Tensor::read_safetensors(format!("{DIR}/{case}.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    Case {
        state,
        input: spec(&meta["input"]),
        outputs,
    }
}

/// Copy `state` into `vs` by name; every variable must be covered and every entry used, with
/// matching shapes (a strict load).
pub fn load_strict(vs: &VarStore, state: &[(String, Tensor)]) {
    let vars = vs.variables();
    let mut seen = HashSet::new();
    tch::no_grad(|| {
        for (k, v) in state {
            let dst = vars.get(k).unwrap_or_else(|| panic!("unexpected key {k}"));
            assert_eq!(dst.size(), v.size(), "shape of {k}");
            dst.shallow_clone().copy_(v);
            seen.insert(k.clone());
        }
    });
    let missing: Vec<&String> = vars.keys().filter(|k| !seen.contains(*k)).collect();
    assert!(missing.is_empty(), "missing {missing:?}");
}

/// Largest absolute difference.
pub fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}
