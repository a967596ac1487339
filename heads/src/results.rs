//! Detections → COCO results entries (`bbox` as x,y,w,h in original pixels, original category
//! ids, compressed-RLE `segmentation` via `cnx_eval::mask`), plus the image's `file_name`.

use crate::detector::Detections;
use cnx_eval::Rle;
use serde::{Deserialize, Serialize};

/// Compressed RLE in COCO JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RleJson {
    pub size: [usize; 2],
    pub counts: String,
}

/// One COCO results entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoResult {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<RleJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
}

/// Convert one image's detections; `label_to_cat` maps contiguous labels to COCO ids.
pub fn to_coco(
    det: &Detections,
    image_id: i64,
    file_name: Option<&str>,
    label_to_cat: &dyn Fn(i64) -> i64,
) -> Vec<CocoResult> {
    let b = crate::boxes::to_vec_f32(&det.boxes);
    let s = crate::boxes::to_vec_f32(&det.scores);
    let l = crate::boxes::to_vec_i64(&det.labels);
    let masks = det.masks.as_ref().map(|m| {
        let sz = m.size();
        let (h, w) = (sz[1] as usize, sz[2] as usize);
        let bytes = Vec::<u8>::try_from(
            &m.to_device(tch::Device::Cpu)
                .to_kind(tch::Kind::Uint8)
                .contiguous()
                .view([-1]),
        )
        .expect("u8 masks");
        (h, w, bytes)
    });
    (0..s.len())
        .map(|i| {
            let (x1, y1, x2, y2) = (
                b[4 * i] as f64,
                b[4 * i + 1] as f64,
                b[4 * i + 2] as f64,
                b[4 * i + 3] as f64,
            );
            let segmentation = masks.as_ref().map(|(h, w, bytes)| {
                let rle = Rle::encode_row_major(&bytes[i * h * w..(i + 1) * h * w], *h, *w);
                RleJson {
                    size: [*h, *w],
                    counts: rle.to_compressed_string(),
                }
            });
            CocoResult {
                image_id,
                category_id: label_to_cat(l[i]),
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: s[i] as f64,
                segmentation,
                file_name: file_name.map(str::to_string),
            }
        })
        .collect()
}
