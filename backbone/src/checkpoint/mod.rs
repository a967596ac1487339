//! Loading the checkpoints people have: official ConvNeXt `.pth` files (`torch.save` zip archives
//! with the state dict bare or under `model` / `state_dict`), timm-named weights (renamed to the
//! official names on the fly), mmdet / mmseg whole-model checkpoints, safetensors files, and
//! `.pth` files in the legacy pre-1.6 `torch.save` format (open-mmlab's and torchvision's older
//! ImageNet weights), told apart by their first bytes.
//!
//! [`read_state_dict`] turns any of them into a [`StateDict`]; [`load_into`] copies it into a
//! [`VarStore`], strict by default, and reports missing, unexpected and mis-shaped tensors by name
//! and shape. Prefix handling ([`LoadOptions::strip_prefix`], [`LoadOptions::add_prefix`],
//! [`LoadOptions::target_prefix`]) covers "the `backbone.` part of a detector checkpoint" and
//! "ImageNet weights into the backbone of a detector".

pub mod pickle;

use pickle::{TensorRef, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Everything that can go wrong reading or loading a checkpoint. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid torch.save zip archive: {msg}")]
    Zip { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Pickle {
        path: PathBuf,
        source: pickle::PickleError,
    },
    /// A file in the legacy (pre-1.6, non-zip) `torch.save` format that cannot be read.
    #[error("{path}: legacy torch.save format (torch < 1.6): {msg}")]
    Legacy { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{0}")]
    Mismatch(Box<LoadReport>),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Named tensors from a checkpoint, sorted by name.
#[derive(Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// Keys under `prefix`, with the prefix removed; other keys are dropped.
    pub fn select_prefix(&self, prefix: &str) -> StateDict {
        let tensors = self
            .tensors
            .iter()
            .filter_map(|(k, t)| {
                k.strip_prefix(prefix)
                    .map(|s| (s.to_string(), t.shallow_clone()))
            })
            .collect();
        StateDict { tensors }
    }

    /// Every key with `prefix` prepended.
    pub fn add_prefix(&self, prefix: &str) -> StateDict {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone()))
            .collect();
        StateDict { tensors }
    }

    /// True when the keys look like timm's ConvNeXt layout (`stem.0`, `stages.S.blocks.B`).
    pub fn is_timm_convnext(&self) -> bool {
        self.tensors.keys().any(|k| is_timm_convnext_key(k))
    }

    /// Renames timm ConvNeXt keys to the official ones (a no-op on official names); any prefix
    /// before `stem.` / `stages.` / `head.` is kept. Drops `num_batches_tracked` buffers.
    pub fn to_official(&self) -> StateDict {
        let timm = self.is_timm_convnext();
        let tensors = self
            .tensors
            .iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .map(|(k, t)| {
                (
                    if timm { timm_to_official(k) } else { k.clone() },
                    t.shallow_clone(),
                )
            })
            .collect();
        StateDict { tensors }
    }

    /// Writes all tensors (made contiguous, on CPU) to a safetensors file.
    pub fn write_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.write_safetensors_with(path, &BTreeMap::new())
    }

    /// [`StateDict::write_safetensors`] with string `metadata` in the file's header
    /// (`__metadata__`, read back by [`read_safetensors_metadata`]).
    pub fn write_safetensors_with(
        &self,
        path: impl AsRef<Path>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let path = path.as_ref();
        let st_err = |msg: String| CheckpointError::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        let mut bufs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, t) in &self.tensors {
            let t = t.to_device(tch::Device::Cpu).contiguous();
            let kind = t.kind();
            let dtype = kind_to_dtype(kind)
                .ok_or_else(|| st_err(format!("{k}: dtype {kind:?} not supported")))?;
            let numel = t.numel();
            let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
            t.f_copy_data_u8(&mut data, numel)?;
            bufs.push((
                k.clone(),
                dtype,
                t.size().iter().map(|&d| d as usize).collect(),
                data,
            ));
        }
        let views = bufs
            .iter()
            .map(|(k, dt, shape, data)| {
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| st_err(format!("{k}: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let info: Option<HashMap<String, String>> = (!metadata.is_empty()).then(|| {
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        safetensors::serialize_to_file(views, &info, path).map_err(|e| st_err(format!("{e:?}")))
    }
}

/// The string metadata (`__metadata__`) of a safetensors file, read from its header alone;
/// empty when the file has none. Errors name the file.
pub fn read_safetensors_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
    let path = path.as_ref();
    let st_err = |msg: String| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(st_err(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| st_err(format!("header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            let v = v
                .as_str()
                .ok_or_else(|| st_err(format!("metadata {k:?} is not a string")))?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
}

fn kind_to_dtype(k: Kind) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Some(match k {
        Kind::Float => D::F32,
        Kind::Half => D::F16,
        Kind::BFloat16 => D::BF16,
        Kind::Double => D::F64,
        Kind::Int64 => D::I64,
        Kind::Int => D::I32,
        Kind::Int16 => D::I16,
        Kind::Int8 => D::I8,
        Kind::Uint8 => D::U8,
        Kind::Bool => D::BOOL,
        _ => return None,
    })
}

fn dtype_to_kind(d: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match d {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Index of the segment where a ConvNeXt key proper starts (`stem`, `stages`, `head`, ...).
fn body_start(parts: &[&str]) -> Option<usize> {
    parts
        .iter()
        .position(|p| matches!(*p, "stem" | "stages" | "head" | "downsample_layers"))
}

fn is_timm_convnext_key(k: &str) -> bool {
    let parts: Vec<&str> = k.split('.').collect();
    let Some(i) = body_start(&parts) else {
        return false;
    };
    match &parts[i..] {
        ["stem", n, ..] => n.parse::<u32>().is_ok(),
        ["stages", _, "blocks", ..] | ["stages", _, "downsample", ..] => true,
        _ => false,
    }
}

/// One timm ConvNeXt key → the official name (unchanged when it is not a timm key).
pub fn timm_to_official(k: &str) -> String {
    let parts: Vec<&str> = k.split('.').collect();
    let Some(i) = body_start(&parts) else {
        return k.to_string();
    };
    let (pre, body) = parts.split_at(i);
    let mapped: Vec<String> = match body {
        ["stem", n, rest @ ..] => [
            vec!["downsample_layers".into(), "0".into(), n.to_string()],
            strs(rest),
        ]
        .concat(),
        ["stages", s, "downsample", n, rest @ ..] => [
            vec!["downsample_layers".into(), s.to_string(), n.to_string()],
            strs(rest),
        ]
        .concat(),
        ["stages", s, "blocks", b, layer @ ..] => {
            let tail: Vec<String> = match layer {
                ["conv_dw", r @ ..] => [vec!["dwconv".into()], strs(r)].concat(),
                ["mlp", "fc1", r @ ..] => [vec!["pwconv1".into()], strs(r)].concat(),
                ["mlp", "fc2", r @ ..] => [vec!["pwconv2".into()], strs(r)].concat(),
                other => strs(other),
            };
            [vec!["stages".into(), s.to_string(), b.to_string()], tail].concat()
        }
        ["head", "norm", r @ ..] => [vec!["norm".into()], strs(r)].concat(),
        ["head", "fc", r @ ..] => [vec!["head".into()], strs(r)].concat(),
        other => strs(other),
    };
    let mut out = strs(pre);
    out.extend(mapped);
    out.join(".")
}

fn strs(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// Reads a checkpoint file into a state dict (names as stored; see [`StateDict::to_official`]).
/// Accepts `torch.save` files, zip archives (torch >= 1.6) and the legacy format (torch < 1.6, or
/// `_use_new_zipfile_serialization=False`), holding a bare state dict or one under `model` /
/// `state_dict` (other entries such as `optimizer` and `meta` ignored), and safetensors files.
pub fn read_state_dict(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 9];
    let n = read_up_to(&mut f, &mut head).map_err(io)?;
    drop(f);
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return read_torch_zip(path);
    }
    if head.len() >= 9 && head[8] == b'{' {
        return read_safetensors(path);
    }
    if head.first() == Some(&0x80) {
        // A pickle (PROTO opcode): the legacy format, which starts with torch's magic number;
        // read_torch_legacy checks that.
        return read_torch_legacy(path);
    }
    Err(CheckpointError::Format {
        path: path.to_path_buf(),
        msg:
            "neither a torch.save file (zip archive or legacy pickle stream) nor a safetensors file"
                .into(),
    })
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn read_safetensors(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st_err = |msg: String| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(format!("{e:?}")))?;
    let mut sd = StateDict::new();
    for (name, view) in st.tensors() {
        let kind = dtype_to_kind(view.dtype())
            .ok_or_else(|| st_err(format!("{name}: dtype {:?} not supported", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        sd.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok(sd)
}

fn read_torch_zip(path: &Path) -> Result<StateDict> {
    let zerr = |msg: String| CheckpointError::Zip {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| zerr(e.to_string()))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| zerr("no <archive>/data.pkl entry".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut e) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        if s.trim() == "big" {
            return Err(CheckpointError::Format {
                path: path.to_path_buf(),
                msg: "big-endian checkpoints are not supported".into(),
            });
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut e| e.read_to_end(&mut pkl).map_err(Into::into))
        .map_err(|e| zerr(format!("{pkl_name}: {e}")))?;
    let top = pickle::unpickle(&pkl).map_err(|source| CheckpointError::Pickle {
        path: path.to_path_buf(),
        source,
    })?;
    let fmt_err = |msg: String| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let entries = state_dict_entries(&top).map_err(fmt_err)?;
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut sd = StateDict::new();
    for (name, tref) in &entries {
        let t = materialize(&mut zip, &prefix, tref, &mut storages)
            .map_err(|m| fmt_err(format!("'{name}': {m}")))?;
        sd.insert(name.clone(), t);
    }
    Ok(sd)
}

/// The tensors of the state dict in an unpickled checkpoint (see [`find_state_dict`]), in file
/// order; anything but string keys and tensor values is refused, naming the entry and what it is.
fn state_dict_entries(top: &Value) -> std::result::Result<Vec<(String, TensorRef)>, String> {
    let dict = find_state_dict(top).ok_or_else(|| {
        format!(
            "top-level object is a {}; expected a state dict (or a dict with one under 'model' / 'state_dict')",
            top.describe()
        )
    })?;
    let Value::Dict(entries) = dict else {
        unreachable!()
    };
    let mut out = Vec::new();
    for (k, v) in entries.borrow().iter() {
        let Some(name) = k.as_str() else {
            return Err(format!(
                "state dict key is a {}, expected a string",
                k.describe()
            ));
        };
        match v {
            Value::Tensor(t) => out.push((name.to_string(), t.clone())),
            other => {
                return Err(format!(
                    "state dict entry '{name}' is a {}, expected a tensor (torch._utils._rebuild_tensor_v2)",
                    other.describe()
                ))
            }
        }
    }
    Ok(out)
}

/// The state dict inside a checkpoint: under `state_dict` or `model` if those hold dicts,
/// otherwise the top-level dict itself.
fn find_state_dict(top: &Value) -> Option<Value> {
    if !matches!(top, Value::Dict(_)) {
        return None;
    }
    for key in ["state_dict", "model"] {
        if let Some(v @ Value::Dict(_)) = top.get(key) {
            return Some(v);
        }
    }
    Some(top.clone())
}

/// Reads the storage (once per key) and cuts the tensor's view out of it.
fn materialize<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    prefix: &str,
    t: &TensorRef,
    storages: &mut HashMap<String, Tensor>,
) -> std::result::Result<Tensor, String> {
    if !storages.contains_key(&t.storage_key) {
        let entry_name = format!("{prefix}data/{}", t.storage_key);
        let mut e = zip
            .by_name(&entry_name)
            .map_err(|e| format!("storage {entry_name}: {e}"))?;
        let elt = t.kind.elt_size_in_bytes();
        let nbytes = t.storage_numel as usize * elt;
        if e.size() as usize != nbytes {
            return Err(format!(
                "storage {entry_name} has {} bytes, expected {} elements of {:?}",
                e.size(),
                t.storage_numel,
                t.kind
            ));
        }
        let s = Tensor::empty([t.storage_numel], (t.kind, tch::Device::Cpu));
        if nbytes > 0 {
            // SAFETY: `s` is a freshly allocated contiguous CPU tensor of exactly `nbytes` bytes,
            // and nothing else references it yet.
            let dst = unsafe { std::slice::from_raw_parts_mut(s.data_ptr() as *mut u8, nbytes) };
            e.read_exact(dst)
                .map_err(|e| format!("reading {entry_name}: {e}"))?;
        }
        storages.insert(t.storage_key.clone(), s);
    }
    cut_view(&storages[&t.storage_key], t)
}

/// The tensor `t` describes, out of its storage `s` (a 1-d tensor of the storage's elements).
fn cut_view(s: &Tensor, t: &TensorRef) -> std::result::Result<Tensor, String> {
    if s.kind() != t.kind || s.numel() as i64 != t.storage_numel {
        return Err(format!(
            "storage {} holds {} elements of {:?}, the tensor expects {} of {:?}",
            t.storage_key,
            s.numel(),
            s.kind(),
            t.storage_numel,
            t.kind
        ));
    }
    // A legacy storage view shifts the origin and narrows the bounds.
    let (base, extent) = match t.view {
        Some(v) => (v.offset, v.numel),
        None => (0, t.storage_numel),
    };
    // Bounds check before as_strided (libtorch would check too, but with a less useful message).
    let numel: i64 = t.size.iter().product();
    if numel > 0 {
        if t.stride.iter().any(|&s| s < 0) || t.size.iter().any(|&n| n < 0) {
            return Err("negative sizes or strides".into());
        }
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (n, s)| {
                (n - 1).checked_mul(*s).and_then(|d| acc.checked_add(d))
            });
        if t.offset < 0 || last.is_none_or(|l| l >= extent) {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) exceeds its storage{} of {} elements",
                t.offset,
                t.size,
                t.stride,
                if t.view.is_some() { " view" } else { "" },
                extent
            ));
        }
    }
    let whole =
        base == 0 && t.offset == 0 && numel == t.storage_numel && is_contiguous(&t.size, &t.stride);
    if whole {
        return Ok(s.view(t.size.as_slice()));
    }
    // A view into a shared storage: copy it out so each tensor owns just its elements.
    Ok(
        s.as_strided(t.size.as_slice(), t.stride.as_slice(), base + t.offset)
            .contiguous(),
    )
}

/// `torch.serialization.MAGIC_NUMBER` (0x1950a86a20f9469cfc6c) as pickle's LONG1 stores it.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const LEGACY_PROTOCOL: i64 = 1001;

/// The pickles at the head of a legacy file, checked.
struct LegacyHead {
    top: Value,
    storages: BTreeMap<String, pickle::StorageDecl>,
    /// Storage keys in the order their bytes follow the pickles.
    keys: Vec<String>,
    /// Where the first storage starts.
    data_start: u64,
}

enum LegacyHeadError {
    /// The pickle named `which` is malformed, or the bytes read so far end inside it.
    Pickle {
        which: &'static str,
        err: pickle::PickleError,
    },
    Bad(String),
    /// A pickle, but not one `torch.save` wrote (no magic number).
    NotTorch(String),
}

/// Reads the five pickles `torch.serialization._legacy_save` writes: the magic number, the
/// protocol version, `sys_info`, the object itself (storages as persistent ids) and the list of
/// storage keys in the order of the storage bytes that follow.
fn parse_legacy_head(buf: &[u8]) -> std::result::Result<LegacyHead, LegacyHeadError> {
    use LegacyHeadError::{Bad, NotTorch, Pickle};
    let read = |which: &'static str, at: usize| {
        pickle::unpickle_at(buf, at).map_err(|err| Pickle { which, err })
    };
    let magic = read("the magic number", 0)?;
    match &magic.value {
        Value::BigInt(b) if b.as_slice() == LEGACY_MAGIC => {}
        other => {
            return Err(NotTorch(format!(
                "not a torch.save file: a pickle that starts with a {} instead of torch's magic number 0x1950a86a20f9469cfc6c",
                other.describe()
            )))
        }
    }
    let proto = read("the protocol version", magic.end)?;
    if proto.value.as_int() != Some(LEGACY_PROTOCOL) {
        let got = match &proto.value {
            Value::Int(i) => i.to_string(),
            other => format!("a {}", other.describe()),
        };
        return Err(Bad(format!(
            "protocol version {got}, expected {LEGACY_PROTOCOL}"
        )));
    }
    let sys_info = read("sys_info", proto.end)?;
    match sys_info.value.get("little_endian") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            return Err(Bad(
                "big-endian checkpoint (sys_info little_endian=False) is not supported".into(),
            ))
        }
        _ => {
            return Err(Bad(format!(
                "sys_info is a {} without a little_endian flag",
                sys_info.value.describe()
            )))
        }
    }
    let obj = read("the checkpoint object", sys_info.end)?;
    let keys_pkl = read("the storage key list", obj.end)?;
    let Value::List(list) = &keys_pkl.value else {
        return Err(Bad(format!(
            "storage key list is a {}, expected a list",
            keys_pkl.value.describe()
        )));
    };
    let mut keys = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for k in list.borrow().iter() {
        let Some(k) = k.as_str() else {
            return Err(Bad(format!(
                "storage key list holds a {}, expected strings",
                k.describe()
            )));
        };
        if !obj.storages.contains_key(k) {
            return Err(Bad(format!(
                "storage key list names '{k}', which no tensor or storage in the checkpoint uses"
            )));
        }
        if !seen.insert(k.to_string()) {
            return Err(Bad(format!("storage key list names '{k}' twice")));
        }
        keys.push(k.to_string());
    }
    if let Some(k) = obj.storages.keys().find(|k| !seen.contains(k.as_str())) {
        return Err(Bad(format!(
            "storage '{k}' is used but its data is not in the file (not in the storage key list)"
        )));
    }
    Ok(LegacyHead {
        top: obj.value,
        storages: obj.storages,
        keys,
        data_start: keys_pkl.end as u64,
    })
}

/// Reads a legacy-format `torch.save` file: the pickles first (from a prefix of the file that
/// grows until they parse, so the storage bytes are read once, straight into tensors), then the
/// storages in the listed order, each an 8-byte little-endian element count and the raw
/// little-endian elements (`storage._write_file` / `_set_from_file`).
fn read_torch_legacy(path: &Path) -> Result<StateDict> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |msg: String| CheckpointError::Legacy {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut buf: Vec<u8> = Vec::new();
    let mut want = len.min(1 << 20);
    let head = loop {
        let have = buf.len();
        buf.resize(want as usize, 0);
        let n = read_up_to(&mut file, &mut buf[have..]).map_err(io)?;
        buf.truncate(have + n);
        match parse_legacy_head(&buf) {
            Ok(h) => break h,
            // torch's magic number is a 15-byte pickle: a first pickle this long is something else
            // (no need to read all of it to say so).
            Err(LegacyHeadError::Pickle {
                which: "the magic number",
                err,
            }) if err.truncated && buf.len() >= 4096 => return Err(CheckpointError::Format {
                path: path.to_path_buf(),
                msg:
                    "not a torch.save file: a pickle that does not start with torch's magic number"
                        .into(),
            }),
            Err(LegacyHeadError::Pickle { err, .. })
                if err.truncated && (buf.len() as u64) < len && n > 0 =>
            {
                want = len.min(want.saturating_mul(4));
            }
            Err(LegacyHeadError::Pickle { which, err }) if err.truncated => {
                return Err(bad(format!(
                    "truncated file: it ends at byte {} inside the pickle of {which}",
                    buf.len()
                )))
            }
            Err(LegacyHeadError::Pickle { which, err }) => {
                return Err(CheckpointError::Pickle {
                    path: path.to_path_buf(),
                    source: pickle::PickleError {
                        msg: format!("{} (in the pickle of {which})", err.msg),
                        ..err
                    },
                })
            }
            Err(LegacyHeadError::Bad(msg)) => return Err(bad(msg)),
            Err(LegacyHeadError::NotTorch(msg)) => {
                return Err(CheckpointError::Format {
                    path: path.to_path_buf(),
                    msg,
                })
            }
        }
    };
    drop(buf);
    let entries = state_dict_entries(&head.top).map_err(|msg| CheckpointError::Format {
        path: path.to_path_buf(),
        msg,
    })?;
    let needed: std::collections::HashSet<&str> = entries
        .iter()
        .map(|(_, t)| t.storage_key.as_str())
        .collect();

    // Walk every storage (checking counts and the file length even for the ones no state-dict
    // tensor uses, e.g. optimizer state), reading the needed ones.
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut pos = head.data_start;
    let total = head.keys.len();
    for (i, key) in head.keys.iter().enumerate() {
        let decl = head.storages[key];
        let which = format!("storage '{key}' ({} of {total}, {:?})", i + 1, decl.kind);
        if len.saturating_sub(pos) < 8 {
            return Err(bad(format!(
                "truncated file: {which} needs an 8-byte element count at byte {pos}, only {} bytes available",
                len.saturating_sub(pos)
            )));
        }
        let mut count = [0u8; 8];
        file.seek(SeekFrom::Start(pos)).map_err(io)?;
        file.read_exact(&mut count).map_err(io)?;
        let count = i64::from_le_bytes(count);
        if count != decl.numel {
            return Err(bad(format!(
                "{which}: the file says {count} elements, its persistent id says {}",
                decl.numel
            )));
        }
        let elt = decl.kind.elt_size_in_bytes() as u64;
        let nbytes = (decl.numel as u64)
            .checked_mul(elt)
            .ok_or_else(|| bad(format!("{which}: {} elements overflow", decl.numel)))?;
        pos += 8;
        let available = len - pos;
        if available < nbytes {
            return Err(bad(format!(
                "truncated file: {which} needs {nbytes} bytes ({} elements) at byte {pos}, only {available} available",
                decl.numel
            )));
        }
        if needed.contains(key.as_str()) {
            let s = Tensor::empty([decl.numel], (decl.kind, tch::Device::Cpu));
            if nbytes > 0 {
                // SAFETY: `s` is a freshly allocated contiguous CPU tensor of exactly `nbytes`
                // bytes, and nothing else references it yet.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(s.data_ptr() as *mut u8, nbytes as usize)
                };
                file.read_exact(dst)
                    .map_err(|e| bad(format!("reading {which}: {e}")))?;
            }
            storages.insert(key.clone(), s);
        }
        pos += nbytes;
    }
    // Bytes after the last storage are ignored, as torch.load ignores them.
    let mut sd = StateDict::new();
    for (name, tref) in &entries {
        let t =
            cut_view(&storages[&tref.storage_key], tref).map_err(|m| CheckpointError::Format {
                path: path.to_path_buf(),
                msg: format!("'{name}': {m}"),
            })?;
        sd.insert(name.clone(), t);
    }
    Ok(sd)
}

fn is_contiguous(size: &[i64], stride: &[i64]) -> bool {
    let mut expect = 1;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect *= n;
    }
    true
}

/// How [`load_into`] matches checkpoint names to VarStore names.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Fail (loading nothing) on any missing, unexpected or mis-shaped tensor. Default true.
    pub strict: bool,
    /// Keep only checkpoint keys under this prefix, with it removed (`"backbone."` takes the
    /// backbone out of an mmdet / mmseg checkpoint); keys outside it are skipped silently.
    pub strip_prefix: Option<String>,
    /// Prepend this to every (remaining) checkpoint key (`"backbone."` puts ImageNet weights into
    /// the backbone of a detector VarStore).
    pub add_prefix: Option<String>,
    /// Only VarStore variables under this prefix are expected (others never count as missing).
    pub target_prefix: Option<String>,
    /// Rename timm ConvNeXt keys to the official ones when the checkpoint uses them. Default true.
    pub map_timm: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            strict: true,
            strip_prefix: None,
            add_prefix: None,
            target_prefix: None,
            map_timm: true,
        }
    }
}

impl LoadOptions {
    /// Strict, names as they are (timm names renamed).
    pub fn strict() -> Self {
        Self::default()
    }
    /// Load whatever matches by name and shape; report the rest.
    pub fn partial() -> Self {
        Self {
            strict: false,
            ..Self::default()
        }
    }
    /// The `backbone.` part of an mmdet / mmseg checkpoint into a bare backbone VarStore.
    pub fn backbone_of(strict: bool) -> Self {
        Self {
            strict,
            strip_prefix: Some("backbone.".into()),
            ..Self::default()
        }
    }
    /// An ImageNet classifier checkpoint into `backbone.` of a detector / segmentor VarStore, as
    /// mmdet's `init_cfg=Pretrained` does: non-strict (the classifier's `norm` / `head` are
    /// unexpected and the dense `norm{i}` stay initialised), only `backbone.*` variables expected.
    pub fn pretrained_backbone() -> Self {
        Self {
            strict: false,
            add_prefix: Some("backbone.".into()),
            target_prefix: Some("backbone.".into()),
            ..Self::default()
        }
    }
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
    pub fn with_strip_prefix(mut self, p: impl Into<String>) -> Self {
        self.strip_prefix = Some(p.into());
        self
    }
    pub fn with_add_prefix(mut self, p: impl Into<String>) -> Self {
        self.add_prefix = Some(p.into());
        self
    }
    pub fn with_target_prefix(mut self, p: impl Into<String>) -> Self {
        self.target_prefix = Some(p.into());
        self
    }
}

/// A tensor whose shape differs between model and checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    pub name: String,
    pub model: Vec<i64>,
    pub checkpoint: Vec<i64>,
}

/// What [`load_into`] did. Names are VarStore names (after prefix handling and timm renaming).
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub strict: bool,
    /// Tensors copied into the VarStore.
    pub loaded: Vec<String>,
    /// Model variables the checkpoint lacks (name, model shape).
    pub missing: Vec<(String, Vec<i64>)>,
    /// Checkpoint tensors the model lacks (name, checkpoint shape).
    pub unexpected: Vec<(String, Vec<i64>)>,
    pub mismatched: Vec<ShapeMismatch>,
    /// Checkpoint keys outside `strip_prefix` plus `num_batches_tracked` buffers.
    pub skipped: usize,
    /// The checkpoint used timm names.
    pub renamed_from_timm: bool,
}

impl LoadReport {
    /// Nothing missing, unexpected or mis-shaped.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }

    /// One line: counts only.
    pub fn summary(&self) -> String {
        format!(
            "loaded {} tensors; {} missing, {} unexpected, {} mis-shaped{}",
            self.loaded.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            if self.renamed_from_timm {
                " (timm names mapped to official)"
            } else {
                ""
            }
        )
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.strict && !self.is_clean() {
            writeln!(
                f,
                "checkpoint does not match the model (strict load, nothing loaded):"
            )?;
        }
        write!(f, "{}", self.summary())?;
        if !self.mismatched.is_empty() {
            write!(f, "\n  mis-shaped (model vs checkpoint):")?;
            for m in &self.mismatched {
                write!(f, "\n    {} {:?} vs {:?}", m.name, m.model, m.checkpoint)?;
            }
        }
        if !self.missing.is_empty() {
            write!(f, "\n  missing in checkpoint:")?;
            for (n, s) in &self.missing {
                write!(f, "\n    {n} {s:?}")?;
            }
        }
        if !self.unexpected.is_empty() {
            write!(f, "\n  unexpected in checkpoint:")?;
            for (n, s) in &self.unexpected {
                write!(f, "\n    {n} {s:?}")?;
            }
        }
        Ok(())
    }
}

/// Applies the name handling of `opts` to a state dict (timm renaming, strip, add), returning
/// the renamed dict and how many keys were skipped.
pub fn prepare(sd: &StateDict, opts: &LoadOptions) -> (StateDict, usize, bool) {
    let mut skipped = 0;
    let mut cur = match &opts.strip_prefix {
        Some(p) => {
            let s = sd.select_prefix(p);
            skipped += sd.len() - s.len();
            s
        }
        None => sd.select_prefix(""),
    };
    let before = cur.len();
    cur.tensors
        .retain(|k, _| !k.ends_with("num_batches_tracked"));
    skipped += before - cur.len();
    let timm = opts.map_timm && cur.is_timm_convnext();
    if timm {
        cur = cur.to_official();
    }
    if let Some(p) = &opts.add_prefix {
        cur = cur.add_prefix(p);
    }
    (cur, skipped, timm)
}

/// Copies a state dict into the VarStore's variables (converting dtype and device as needed;
/// `requires_grad` of every variable is left as it is, so frozen parts stay frozen).
///
/// Strict (the default): any missing, unexpected or mis-shaped tensor is an error
/// ([`CheckpointError::Mismatch`], whose message lists them with shapes) and nothing is loaded.
/// Non-strict: everything that matches by name and shape is loaded and the rest reported.
pub fn load_into(vs: &mut VarStore, sd: &StateDict, opts: &LoadOptions) -> Result<LoadReport> {
    let (sd, skipped, timm) = prepare(sd, opts);
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| match opts.target_prefix.as_deref() {
            Some(p) => k.starts_with(p),
            None => true,
        })
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut report = LoadReport {
        strict: opts.strict,
        skipped,
        renamed_from_timm: timm,
        ..Default::default()
    };
    let mut pairs = Vec::new();
    let var_names: std::collections::HashSet<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    for (name, var) in &vars {
        match sd.get(name) {
            None => report.missing.push((name.clone(), var.size())),
            Some(t) if t.size() != var.size() => report.mismatched.push(ShapeMismatch {
                name: name.clone(),
                model: var.size(),
                checkpoint: t.size(),
            }),
            Some(t) => pairs.push((name.clone(), var.shallow_clone(), t)),
        }
    }
    for (k, t) in sd.iter() {
        if !var_names.contains(k.as_str()) {
            report.unexpected.push((k.clone(), t.size()));
        }
    }
    if opts.strict && !report.is_clean() {
        return Err(CheckpointError::Mismatch(Box::new(report)));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut var, src) in pairs {
            var.f_copy_(src)?;
            report.loaded.push(name);
        }
        Ok(())
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names() {
        let cases = [
            ("stem.0.weight", "downsample_layers.0.0.weight"),
            ("stem.1.bias", "downsample_layers.0.1.bias"),
            (
                "stages.2.downsample.0.weight",
                "downsample_layers.2.0.weight",
            ),
            ("stages.2.downsample.1.bias", "downsample_layers.2.1.bias"),
            (
                "stages.1.blocks.4.conv_dw.weight",
                "stages.1.4.dwconv.weight",
            ),
            ("stages.1.blocks.4.norm.weight", "stages.1.4.norm.weight"),
            (
                "stages.1.blocks.4.mlp.fc1.weight",
                "stages.1.4.pwconv1.weight",
            ),
            ("stages.1.blocks.4.mlp.fc2.bias", "stages.1.4.pwconv2.bias"),
            ("stages.3.blocks.0.gamma", "stages.3.0.gamma"),
            ("head.norm.weight", "norm.weight"),
            ("head.fc.bias", "head.bias"),
            (
                "backbone.stem.0.weight",
                "backbone.downsample_layers.0.0.weight",
            ),
            (
                "neck.lateral_convs.0.conv.weight",
                "neck.lateral_convs.0.conv.weight",
            ),
        ];
        for (a, b) in cases {
            assert_eq!(timm_to_official(a), b, "{a}");
        }
        assert!(is_timm_convnext_key("stem.0.weight"));
        assert!(!is_timm_convnext_key("stages.0.0.dwconv.weight"));
        assert!(!is_timm_convnext_key("downsample_layers.0.0.weight"));
    }

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
    }
}
