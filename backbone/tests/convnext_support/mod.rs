//! Shared helpers for the ConvNeXt tests: the fixture layout written by
//! tools/reference/gen_backbone.py and the closed-form input pattern it uses.

#![allow(dead_code)]

use cnx_backbone::checkpoint::{self, LoadOptions};
use cnx_backbone::convnext::{ConvNeXt, ConvNeXtConfig};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Tensor};

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/convnext"
    ))
}

/// `x[b,c,y,x] = sin(0.37*y + 0.11*(c+1)*x + 1.3*b + 0.5*c)` in f64, cast to f32 (as the script).
pub fn input_pattern(n: i64, h: i64, w: i64) -> Tensor {
    let mut v = Vec::with_capacity((n * 3 * h * w) as usize);
    for b in 0..n {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let a = 0.37 * y as f64
                        + 0.11 * (c + 1) as f64 * x as f64
                        + 1.3 * b as f64
                        + 0.5 * c as f64;
                    v.push(a.sin() as f32);
                }
            }
        }
    }
    Tensor::from_slice(&v).view([n, 3, h, w])
}

pub struct Case {
    pub name: String,
    pub batch: i64,
    pub h: i64,
    pub w: i64,
}

pub struct Fixture {
    pub dir: PathBuf,
    pub meta: serde_json::Value,
    pub config: ConvNeXtConfig,
    pub cases: Vec<Case>,
    pub outputs: Vec<(String, Tensor)>,
}

impl Fixture {
    pub fn open(dir: &Path) -> Self {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("meta.json")).expect("meta.json"),
        )
        .unwrap();
        let ints = |k: &str| {
            meta[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect::<Vec<_>>()
        };
        let mut config = ConvNeXtConfig::tiny();
        config.depths = ints("depths");
        config.dims = ints("dims");
        config.num_classes = meta["num_classes"].as_i64().unwrap();
        let cases = meta["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Case {
                name: c["name"].as_str().unwrap().to_string(),
                batch: c["batch"].as_i64().unwrap(),
                h: c["h"].as_i64().unwrap(),
                w: c["w"].as_i64().unwrap(),
            })
            .collect();
        let outputs = Tensor::read_safetensors(dir.join("outputs.safetensors")).unwrap();
        Self {
            dir: dir.to_path_buf(),
            meta,
            config,
            cases,
            outputs,
        }
    }

    pub fn output(&self, key: &str) -> &Tensor {
        &self
            .outputs
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no output {key}"))
            .1
    }

    /// A classifier VarStore loaded strictly from one of the fixture's weight files.
    pub fn classifier(&self, file: &str) -> (VarStore, ConvNeXt) {
        let mut vs = VarStore::new(Device::Cpu);
        let m = ConvNeXt::new(vs.root(), &self.config);
        let sd = checkpoint::read_state_dict(self.dir.join(file)).unwrap();
        let r = checkpoint::load_into(&mut vs, &sd, &LoadOptions::strict()).unwrap();
        assert!(r.is_clean(), "{r}");
        (vs, m)
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    (a - b).abs().max().double_value(&[])
}
