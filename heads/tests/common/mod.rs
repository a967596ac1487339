//! Helpers shared by the heads' integration tests.

use cnx_heads::structures::InstanceMasks;

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
