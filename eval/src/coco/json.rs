//! Typed serde structures for COCO ground-truth and results JSON.
//!
//! Parsing goes straight into typed structs (no `serde_json::Value`), and compressed RLE strings
//! are decoded while parsing so a val2017-sized results file never exists twice in memory.
//! Malformed segmentations are kept as [`Segmentation::Invalid`] so the error can later name
//! the annotation or result it belongs to.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::mask::{decode_counts, Rle};

/// A `segmentation` field: polygons, an RLE (compressed or uncompressed), or something that
/// could not be decoded (with the reason).
#[derive(Clone, Debug, PartialEq)]
pub enum Segmentation {
    /// `[[x0, y0, x1, y1, ...], ...]` (the parts of one object).
    Polygons(Vec<Vec<f64>>),
    /// `{"size": [h, w], "counts": "..."}` or `{"size": [h, w], "counts": [..]}`.
    Rle(Rle),
    /// A malformed value, with the reason.
    Invalid(String),
}

/// Writes polygons as lists and RLEs in the compressed form pycocotools writes
/// (`{"size": [h, w], "counts": "..."}`); an invalid value is written as `null`.
impl Serialize for Segmentation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Segmentation::Polygons(p) => p.serialize(s),
            Segmentation::Rle(r) => r.serialize(s),
            Segmentation::Invalid(_) => s.serialize_none(),
        }
    }
}

/// The compressed JSON form, `{"size": [h, w], "counts": "..."}`.
impl Serialize for Rle {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Rle", 2)?;
        st.serialize_field("size", &[self.h, self.w])?;
        st.serialize_field("counts", &self.to_compressed_string())?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Segmentation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SegVisitor)
    }
}

struct SegVisitor;

enum CountsField {
    Decoded(Vec<u32>),
    Bad(String),
}

impl<'de> Deserialize<'de> for CountsField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CountsField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("RLE counts (string or list of integers)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<CountsField, E> {
                Ok(match decode_counts(s.as_bytes()) {
                    Ok(c) => CountsField::Decoded(c),
                    Err(e) => CountsField::Bad(e.to_string()),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CountsField, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(x) = seq.next_element::<f64>()? {
                    if !(x >= 0.0 && x <= u32::MAX as f64 && x.fract() == 0.0) {
                        return Ok(CountsField::Bad(format!(
                            "uncompressed RLE count {x} is not a non-negative integer"
                        )));
                    }
                    v.push(x as u32);
                }
                Ok(CountsField::Decoded(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Visitor<'de> for SegVisitor {
    type Value = Segmentation;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a segmentation (list of polygons or RLE object)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Segmentation, A::Error> {
        let mut polys = Vec::new();
        while let Some(p) = seq.next_element::<PolyOrJunk>()? {
            match p {
                PolyOrJunk::Poly(p) => polys.push(p),
                PolyOrJunk::Junk(msg) => return Ok(Segmentation::Invalid(msg)),
            }
        }
        Ok(Segmentation::Polygons(polys))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Segmentation, A::Error> {
        let mut size: Option<[f64; 2]> = None;
        let mut counts: Option<CountsField> = None;
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "size" => size = Some(map.next_value()?),
                "counts" => counts = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let Some([h, w]) = size else {
            return Ok(Segmentation::Invalid("RLE without `size`".into()));
        };
        if !(h >= 0.0 && w >= 0.0 && h.fract() == 0.0 && w.fract() == 0.0) {
            return Ok(Segmentation::Invalid(format!(
                "RLE size [{h}, {w}] is not two integers"
            )));
        }
        match counts {
            None => Ok(Segmentation::Invalid("RLE without `counts`".into())),
            Some(CountsField::Bad(m)) => Ok(Segmentation::Invalid(m)),
            Some(CountsField::Decoded(c)) => {
                let r = Rle {
                    h: h as usize,
                    w: w as usize,
                    counts: c,
                };
                match r.validate() {
                    Ok(()) => Ok(Segmentation::Rle(r)),
                    Err(e) => Ok(Segmentation::Invalid(e.to_string())),
                }
            }
        }
    }
}

/// One polygon, or a note why it is not one (e.g. a nested list or a string).
enum PolyOrJunk {
    Poly(Vec<f64>),
    Junk(String),
}

impl<'de> Deserialize<'de> for PolyOrJunk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PolyOrJunk;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a polygon (list of numbers)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PolyOrJunk, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(x) = seq.next_element::<NumOrJunk>()? {
                    match x {
                        NumOrJunk::Num(x) => v.push(x),
                        NumOrJunk::Junk => {
                            // Drain the rest so parsing can go on.
                            while seq.next_element::<IgnoredAny>()?.is_some() {}
                            return Ok(PolyOrJunk::Junk(
                                "polygon holds something that is not a number".into(),
                            ));
                        }
                    }
                }
                Ok(PolyOrJunk::Poly(v))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PolyOrJunk, E> {
                Ok(PolyOrJunk::Junk(
                    "segmentation is a flat list of numbers, expected a list of polygons".into(),
                ))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PolyOrJunk, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PolyOrJunk, E> {
                self.visit_f64(v as f64)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PolyOrJunk, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(PolyOrJunk::Junk(
                    "a list of RLE objects is not a valid segmentation".into(),
                ))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<PolyOrJunk, E> {
                Ok(PolyOrJunk::Junk("polygon is a string".into()))
            }
        }
        d.deserialize_any(V)
    }
}

enum NumOrJunk {
    Num(f64),
    Junk,
}

impl<'de> Deserialize<'de> for NumOrJunk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NumOrJunk;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Num(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Num(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Num(v as f64))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NumOrJunk, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(NumOrJunk::Junk)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NumOrJunk, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(NumOrJunk::Junk)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Junk)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Junk)
            }
            fn visit_unit<E: de::Error>(self) -> Result<NumOrJunk, E> {
                Ok(NumOrJunk::Junk)
            }
        }
        d.deserialize_any(V)
    }
}

/// A `bbox` field: `[x, y, w, h]`, or `[]` (read as absent, as pycocotools' `loadRes` does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaybeBox(pub Option<[f64; 4]>);

impl<'de> Deserialize<'de> for MaybeBox {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeBox;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a box [x, y, w, h]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeBox, A::Error> {
                let mut b = [0.0; 4];
                let mut n = 0;
                while let Some(x) = seq.next_element::<f64>()? {
                    if n < 4 {
                        b[n] = x;
                    }
                    n += 1;
                }
                match n {
                    0 => Ok(MaybeBox(None)),
                    4 => Ok(MaybeBox(Some(b))),
                    _ => Err(de::Error::custom(format!(
                        "bbox has {n} numbers, expected 4 [x, y, w, h]"
                    ))),
                }
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeBox, E> {
                Ok(MaybeBox(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("0/1 or a boolean")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
            Ok(v != 0)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
            Ok(v != 0.0)
        }
        fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    d.deserialize_any(V)
}

/// An entry of `images` (only what evaluation needs).
#[derive(Clone, Debug, Deserialize)]
pub struct GtImage {
    pub id: i64,
    pub height: usize,
    pub width: usize,
    #[serde(default)]
    pub file_name: Option<String>,
}

/// An entry of `categories`.
#[derive(Clone, Debug, Deserialize)]
pub struct GtCategory {
    pub id: i64,
    #[serde(default)]
    pub name: String,
}

/// An entry of `annotations`.
#[derive(Clone, Debug, Deserialize)]
pub struct GtAnnotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    #[serde(default)]
    pub bbox: Option<MaybeBox>,
    /// Used for the area ranges in both bbox and segm mode, as pycocotools does.
    pub area: f64,
    #[serde(default, deserialize_with = "flag")]
    pub iscrowd: bool,
    #[serde(default)]
    pub segmentation: Option<Segmentation>,
}

/// The ground-truth file (`instances_*.json`); other top-level keys are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct GtFile {
    pub images: Vec<GtImage>,
    #[serde(default)]
    pub annotations: Vec<GtAnnotation>,
    pub categories: Vec<GtCategory>,
}

/// An annotation read without its `segmentation`, which bbox evaluation never uses: polygons
/// are most of a ground-truth file, and skipping them unparsed halves its parse time.
#[derive(Deserialize)]
struct GtAnnotationBoxes {
    id: i64,
    image_id: i64,
    category_id: i64,
    #[serde(default)]
    bbox: Option<MaybeBox>,
    area: f64,
    #[serde(default, deserialize_with = "flag")]
    iscrowd: bool,
}

/// [`GtFile`] with annotations read as [`GtAnnotationBoxes`].
#[derive(Deserialize)]
pub(crate) struct GtFileBoxes {
    images: Vec<GtImage>,
    #[serde(default)]
    annotations: Vec<GtAnnotationBoxes>,
    categories: Vec<GtCategory>,
}

impl From<GtFileBoxes> for GtFile {
    fn from(f: GtFileBoxes) -> GtFile {
        GtFile {
            images: f.images,
            annotations: f
                .annotations
                .into_iter()
                .map(|a| GtAnnotation {
                    id: a.id,
                    image_id: a.image_id,
                    category_id: a.category_id,
                    bbox: a.bbox,
                    area: a.area,
                    iscrowd: a.iscrowd,
                    segmentation: None,
                })
                .collect(),
            categories: f.categories,
        }
    }
}

/// `bbox` of a result: `[]` and `null` read as absent.
pub(crate) fn opt_box<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[f64; 4]>, D::Error> {
    Ok(MaybeBox::deserialize(d)?.0)
}
