//! Error types of the crate: every bad input is reported with what and where, never a panic.

use thiserror::Error;

/// Errors of the mask API ([`crate::mask`]).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MaskError {
    #[error("RLE counts sum to {sum} but the mask is {h}x{w} = {} pixels", h * w)]
    CountsMismatch { sum: u64, h: usize, w: usize },
    #[error("compressed RLE string has invalid character {0:?} at byte {1} (allowed: '0'..'o')")]
    BadRleChar(char, usize),
    #[error("malformed compressed RLE string: {0}")]
    BadRleString(&'static str),
    #[error("empty polygon list")]
    EmptyPolygonList,
    #[error("polygon with {0} coordinates (need an even number > 4, or exactly 4 for a box)")]
    BadPolygon(usize),
}

/// Errors of COCO evaluation ([`crate::coco`]) and mIoU ([`crate::miou`]).
#[derive(Debug, Error)]
pub enum EvalError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: invalid JSON: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: line {line} column {column}: non-finite number (NaN/Infinity); scores and coordinates must be finite")]
    NonFiniteJson {
        what: String,
        line: usize,
        column: usize,
    },
    #[error("{count} result(s) refer to image_id(s) not in the ground truth, first: image_id {first} (result #{index})")]
    UnknownImage {
        first: i64,
        index: usize,
        count: usize,
    },
    #[error("{count} result(s) refer to category_id(s) not in the ground truth, first: category_id {first} (result #{index})")]
    UnknownCategory {
        first: i64,
        index: usize,
        count: usize,
    },
    #[error("result #{index} (image_id {image_id}): score {score} is not finite")]
    NonFiniteScore {
        index: usize,
        image_id: i64,
        score: f64,
    },
    #[error("result #{index} (image_id {image_id}): {what}")]
    BadResult {
        index: usize,
        image_id: i64,
        what: String,
    },
    #[error("ground-truth annotation id {id} (image_id {image_id}): {what}")]
    BadAnnotation {
        id: i64,
        image_id: i64,
        what: String,
    },
    #[error("ground-truth annotation id {id} refers to image_id {image_id}, which has no entry in `images`")]
    AnnotationWithoutImage { id: i64, image_id: i64 },
    #[error("{0}")]
    Invalid(String),
    #[error("prediction {pred} is {pw}x{ph} but ground truth {gt} is {gw}x{gh}")]
    SizeMismatch {
        pred: String,
        pw: usize,
        ph: usize,
        gt: String,
        gw: usize,
        gh: usize,
    },
    #[error("{name}: predicted class {class} at pixel {pixel} is >= num_classes ({num_classes})")]
    PredClassOutOfRange {
        name: String,
        class: u8,
        pixel: usize,
        num_classes: usize,
    },
    #[error("prediction and label have different lengths ({pred} vs {label} pixels)")]
    LengthMismatch { pred: usize, label: usize },
}
