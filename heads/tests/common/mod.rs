//! Helpers shared by the heads' integration tests (each test binary uses some of them).
#![allow(dead_code)]

use cnx_heads::structures::{GtInstances, InstanceMasks};
use std::collections::HashMap;
use std::sync::Arc;
use tch::Tensor;

/// The torchvision.ops fixture (tools/reference/gen_detection.py): NMS and RoIAlign cases.
pub fn ops_fixtures() -> HashMap<String, Tensor> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detection/ops.safetensors"
    );
    Tensor::read_safetensors(p)
        .expect("fixture")
        .into_iter()
        .collect()
}

/// One image's ground truth: `boxes` with `labels`, masks shaped like the boxes ([`BoxMasks`]
/// with `inset`).
pub fn box_gt(boxes: &[[f32; 4]], labels: &[i64], inset: f32) -> GtInstances {
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    GtInstances {
        boxes: Tensor::from_slice(&flat).view([boxes.len() as i64, 4]),
        labels: Tensor::from_slice(labels),
        masks: Some(Arc::new(BoxMasks {
            boxes: boxes.to_vec(),
            inset,
        }) as Arc<dyn InstanceMasks>),
    }
}

/// Ground-truth masks shaped like boxes, for mask targets without a dataset: instance g's mask
/// is its box inset by `inset` of its width / height on each side (0: the whole box), sampled at
/// the centre of each target cell of the proposal box.
#[derive(Debug)]
pub struct BoxMasks {
    pub boxes: Vec<[f32; 4]>,
    pub inset: f32,
}

impl InstanceMasks for BoxMasks {
    fn crop_and_resize(&self, boxes: &[[f32; 4]], gt_inds: &[usize], out: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(boxes.len() * out * out);
        for (b, &g) in boxes.iter().zip(gt_inds) {
            let m = self.boxes[g];
            let (mw, mh) = (m[2] - m[0], m[3] - m[1]);
            let inner = [
                m[0] + mw * self.inset,
                m[1] + mh * self.inset,
                m[2] - mw * self.inset,
                m[3] - mh * self.inset,
            ];
            for y in 0..out {
                for x in 0..out {
                    let px = b[0] + (x as f32 + 0.5) / out as f32 * (b[2] - b[0]);
                    let py = b[1] + (y as f32 + 0.5) / out as f32 * (b[3] - b[1]);
                    let inside =
                        px >= inner[0] && px <= inner[2] && py >= inner[1] && py <= inner[3];
                    v.push(inside as u8);
                }
            }
        }
        v
    }
}
