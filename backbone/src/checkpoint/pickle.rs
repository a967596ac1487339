//! A small pickle reader for `torch.save` checkpoints (pickle protocol 2 as torch writes it, plus
//! the protocol-4 framing opcodes for files re-pickled elsewhere and the byte-string opcodes of
//! files written under Python 2). It serves both the zip format (one `data.pkl`) and the legacy
//! pre-1.6 format (several pickles back to back on one stream, see [`unpickle_at`]).
//!
//! libtorch's own loaders do not read Python pickles, and serde-pickle lacks the persistent-id
//! opcodes torch uses for tensor storages, hence this module. It evaluates the opcode stream into
//! [`Value`]s, resolving only the globals a state dict needs (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the `torch.*Storage` types). Any other
//! class becomes an opaque [`Value::Object`], which is harmless in metadata (mmcv's `meta`,
//! optimizer state) but refused — with the file and the global named — where a tensor is needed.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use tch::Kind;

/// A failure while reading a pickle, with the byte position and what was found there.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pickle error at byte {pos}: {msg}")]
pub struct PickleError {
    pub pos: usize,
    pub msg: String,
    /// The data ended inside the pickle: more bytes might complete it. The legacy reader reads a
    /// file's pickles from a growing prefix of it and uses this to know when to read more.
    pub truncated: bool,
}

/// A tensor as the pickle describes it: a view (`offset`, `size`, `stride` in elements) into a
/// storage whose bytes live in the archive under `data/<key>` (zip format) or after the pickles
/// (legacy format).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage_key: String,
    pub kind: Kind,
    /// Elements in the storage (from the persistent id).
    pub storage_numel: i64,
    /// Elements, relative to the start of `view` when there is one.
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
    /// Legacy files only: the tensor lives in a view (a slice) of the storage.
    pub view: Option<StorageView>,
}

/// A slice of a storage (legacy format's `view_metadata`): `numel` elements from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageView {
    pub offset: i64,
    pub numel: i64,
}

/// A storage as a persistent id declared it: element type and number of elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StorageDecl {
    pub kind: Kind,
    pub numel: i64,
}

/// A pickled value. Lists and dicts are shared (`Rc<RefCell<..>>`) as in Python, because the
/// memo may hold a reference to a container that later opcodes fill in.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64 (little-endian two's complement bytes, as LONG1 stores them).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Keys keep their insertion order (an OrderedDict stays ordered).
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A class or function reference (`GLOBAL` / `STACK_GLOBAL`).
    Global {
        module: String,
        name: String,
    },
    /// A storage from a persistent id: `('storage', torch.FloatStorage, key, location, numel)`,
    /// in legacy files with a sixth entry `view_metadata` (`None` or `(view_key, offset, numel)`).
    Storage {
        kind: Kind,
        key: String,
        numel: i64,
        view: Option<StorageView>,
    },
    Tensor(TensorRef),
    /// Any other object: its class, constructor arguments and `BUILD` state, kept opaque.
    Object {
        module: String,
        name: String,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    fn int_list(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(v) => v.iter().map(Value::as_int).collect(),
            Value::List(v) => v.borrow().iter().map(Value::as_int).collect(),
            _ => None,
        }
    }

    /// Looks up a string key in a dict value.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global { module, name } => format!("global {module}.{name}"),
            Value::Storage { .. } => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Object { module, name, .. } => format!("object of {module}.{name}"),
        }
    }
}

/// Storage class name (`FloatStorage`...) to tensor kind.
pub fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Stack entries: values, or the MARK sentinel.
enum Item {
    Mark,
    V(Value),
}

/// Evaluates a pickle byte stream and returns the unpickled top value.
pub fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    unpickle_at(data, 0).map(|u| u.value)
}

/// One pickle read from `data[start..]` (a stream may hold several back to back, as legacy
/// `torch.save` files do).
#[derive(Debug)]
pub struct Unpickled {
    pub value: Value,
    /// Byte position just after the pickle's STOP opcode.
    pub end: usize,
    /// Every storage a persistent id declared, by key.
    pub storages: BTreeMap<String, StorageDecl>,
}

/// Evaluates the pickle starting at `data[start]`. Error positions are positions in `data`.
pub fn unpickle_at(data: &[u8], start: usize) -> Result<Unpickled, PickleError> {
    Machine {
        data,
        pos: start,
        stack: Vec::new(),
        memo: HashMap::new(),
        storages: BTreeMap::new(),
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
    storages: BTreeMap<String, StorageDecl>,
}

impl Machine<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            pos: self.pos,
            msg: msg.into(),
            truncated: false,
        })
    }

    /// The data ends before the pickle does.
    fn eof<T>(&self, msg: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError {
            pos: self.pos,
            msg: msg.into(),
            truncated: true,
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        if n > self.data.len() - self.pos {
            return self.eof(format!(
                "truncated: needed {n} bytes, {} left",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let start = self.pos;
        let Some(n) = self.data[start..].iter().position(|&b| b == b'\n') else {
            return self.eof("unterminated text line");
        };
        self.pos = start + n + 1;
        Ok(String::from_utf8_lossy(&self.data[start..start + n]).into_owned())
    }

    fn utf8(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?.to_vec();
        match String::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s)),
            Err(_) => self.err("invalid UTF-8 in string"),
        }
    }

    /// A Python 2 `str` (SHORT_BINSTRING / BINSTRING): decoded as UTF-8, as `torch.load` does by
    /// default (`encoding='utf-8'`).
    fn py2_str(&mut self, n: usize) -> Result<Value, PickleError> {
        let b = self.take(n)?.to_vec();
        match String::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s)),
            Err(_) => self.err("Python 2 string is not valid UTF-8"),
        }
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Item::V(v));
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(Item::V(v)) => Ok(v),
            Some(Item::Mark) => self.err("unexpected MARK on the stack"),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let pos = self.pos;
        match self.stack.last_mut() {
            Some(Item::V(v)) => Ok(v),
            _ => Err(PickleError {
                pos,
                msg: "stack underflow".into(),
                truncated: false,
            }),
        }
    }

    /// Pops everything down to the most recent MARK (and the mark itself).
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(m) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return self.err("MARK not found");
        };
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::V(v) => v,
                Item::Mark => unreachable!(),
            })
            .collect())
    }

    fn memo_get(&self, k: u32) -> Result<Value, PickleError> {
        match self.memo.get(&k) {
            Some(v) => Ok(v.clone()),
            None => self.err(format!("memo key {k} not found")),
        }
    }

    fn memo_put(&mut self, k: u32) -> Result<(), PickleError> {
        let v = match self.stack.last() {
            Some(Item::V(v)) => v.clone(),
            _ => return self.err("PUT with an empty stack"),
        };
        self.memo.insert(k, v);
        Ok(())
    }

    fn run(mut self) -> Result<Unpickled, PickleError> {
        loop {
            let op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("unsupported pickle protocol {p}"));
                    }
                }
                0x95 => {
                    // FRAME: only a hint for buffered readers.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let value = self.pop()?;
                    return Ok(Unpickled {
                        value,
                        end: self.pos,
                        storages: self.storages,
                    });
                }
                b'}' => self.push(Value::Dict(Rc::default())),
                b']' => self.push(Value::List(Rc::default())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Item::Mark),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.utf8(n)?;
                    self.push(v)
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.py2_str(n)?;
                    self.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.py2_str(n)?;
                    self.push(v)
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(long_value(&b))
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(long_value(&b))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))
                }
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'N' => self.push(Value::None),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                0x85 => {
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Value::Tuple(vec![a, b, c]))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items);
                    self.push(Value::Dict(Rc::new(RefCell::new(d))))
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    // MEMOIZE
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global { module, name })
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.push(Value::Global { module, name })
                        }
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args, op_pos)?;
                    self.push(v)
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); treated like a call.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args, op_pos)?;
                    self.push(v)
                }
                b'b' => {
                    // BUILD: attach state. Dicts (OrderedDict `_metadata`) and tensors ignore it.
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object { state: s, .. } => *s = Some(Box::new(state)),
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => {}
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        other => {
                            let what = other.describe();
                            return self.err(format!("SETITEM on a {what}"));
                        }
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().extend(pairs(items)),
                        other => {
                            let what = other.describe();
                            return self.err(format!("SETITEMS on a {what}"));
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => {
                            let what = other.describe();
                            return self.err(format!("APPEND on a {what}"));
                        }
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => {
                            let what = other.describe();
                            return self.err(format!("APPENDS on a {what}"));
                        }
                    }
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    // DUP
                    let v = self.top()?.clone();
                    self.push(v)
                }
                _ => {
                    self.pos = op_pos;
                    return self.err(format!("unsupported opcode 0x{op:02x} ('{}')", op as char));
                }
            }
        }
    }

    /// `('storage', <StorageType>, key, location, numel)` (zip format) or the same with a sixth
    /// entry `view_metadata` (legacy format) → [`Value::Storage`], recorded in `self.storages`.
    fn persistent(&mut self, pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(t) = pid else {
            return self.err(format!(
                "persistent id is a {}, expected a tuple",
                pid.describe()
            ));
        };
        if t.first().and_then(Value::as_str) == Some("module") {
            // torch.save(model) of a whole nn.Module (legacy format) records the class sources.
            let class = t.get(1).map(Value::describe).unwrap_or_default();
            return self.err(format!(
                "persistent id ('module', {class}, ...): a pickled nn.Module, not a state dict; \
                 save model.state_dict() instead"
            ));
        }
        if !(t.len() == 5 || t.len() == 6) || t[0].as_str() != Some("storage") {
            return self.err(
                "persistent id is not a ('storage', type, key, location, numel[, view]) tuple",
            );
        }
        let kind = match &t[1] {
            Value::Global { module, name } if module == "torch" => match storage_kind(name) {
                Some(k) => k,
                None => return self.err(format!("unsupported storage type torch.{name}")),
            },
            other => return self.err(format!("unsupported storage type {}", other.describe())),
        };
        let key = match &t[2] {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            other => return self.err(format!("storage key is a {}", other.describe())),
        };
        if !matches!(t[3], Value::Str(_)) {
            return self.err(format!(
                "storage {key}: location is a {}, expected a string",
                t[3].describe()
            ));
        }
        let numel = match t[4] {
            Value::Int(n) if n >= 0 => n,
            _ => return self.err(format!("storage {key}: size is not a non-negative int")),
        };
        let view = match t.get(5) {
            None | Some(Value::None) => None,
            Some(Value::Tuple(v)) if v.len() == 3 => match (v[1].as_int(), v[2].as_int()) {
                (Some(offset), Some(n))
                    if offset >= 0
                        && n >= 0
                        && offset.checked_add(n).is_some_and(|e| e <= numel) =>
                {
                    Some(StorageView { offset, numel: n })
                }
                _ => {
                    return self.err(format!(
                    "storage {key}: view (offset, size) outside its {numel} elements or malformed"
                ))
                }
            },
            Some(other) => {
                return self.err(format!(
                    "storage {key}: view metadata is a {}, expected None or (key, offset, size)",
                    other.describe()
                ))
            }
        };
        let decl = StorageDecl { kind, numel };
        match self.storages.get(&key) {
            Some(d) if *d != decl => {
                return self.err(format!(
                    "storage {key} declared twice: {:?} x {} and {:?} x {}",
                    d.kind, d.numel, kind, numel
                ))
            }
            Some(_) => {}
            None => {
                self.storages.insert(key.clone(), decl);
            }
        }
        Ok(Value::Storage {
            kind,
            key,
            numel,
            view,
        })
    }

    /// REDUCE / NEWOBJ: the torch rebuild functions and OrderedDict are understood; anything else
    /// becomes an opaque object.
    fn call(&self, func: Value, args: Value, op_pos: usize) -> Result<Value, PickleError> {
        let Value::Global { module, name } = func else {
            return Err(PickleError {
                pos: op_pos,
                msg: format!("REDUCE on a {}", func.describe()),
                truncated: false,
            });
        };
        let fail = |msg: String| {
            Err(PickleError {
                pos: op_pos,
                msg,
                truncated: false,
            })
        };
        let args_vec = match &args {
            Value::Tuple(v) => v.clone(),
            _ => Vec::new(),
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") | ("builtins", "dict") => {
                let mut d = Vec::new();
                if let Some(Value::List(l)) = args_vec.first() {
                    for item in l.borrow().iter() {
                        if let Value::Tuple(kv) = item {
                            if kv.len() == 2 {
                                d.push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(d))))
            }
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                if args_vec.len() < 4 {
                    return fail(format!("{module}.{name} with {} arguments", args_vec.len()));
                }
                let Value::Storage {
                    kind,
                    key,
                    numel,
                    view,
                } = &args_vec[0]
                else {
                    return fail(format!(
                        "{module}.{name}: first argument is a {}, expected a storage",
                        args_vec[0].describe()
                    ));
                };
                let (Some(offset), Some(size), Some(stride)) = (
                    args_vec[1].as_int(),
                    args_vec[2].int_list(),
                    args_vec[3].int_list(),
                ) else {
                    return fail(format!("{module}.{name}: malformed offset / size / stride"));
                };
                if size.len() != stride.len() {
                    return fail(format!(
                        "{module}.{name}: size {size:?} and stride {stride:?} differ in rank"
                    ));
                }
                Ok(Value::Tensor(TensorRef {
                    storage_key: key.clone(),
                    kind: *kind,
                    storage_numel: *numel,
                    offset,
                    size,
                    stride,
                    view: *view,
                }))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match args_vec.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                Some(other) => fail(format!(
                    "{module}.{name}: first argument is a {}, expected a tensor",
                    other.describe()
                )),
                None => fail(format!("{module}.{name} without arguments")),
            },
            _ => Ok(Value::Object {
                module,
                name,
                args: Box::new(args),
                state: None,
            }),
        }
    }
}

fn pairs(items: Vec<Value>) -> Vec<(Value, Value)> {
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

fn long_value(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(b);
        return Value::Int(i64::from_le_bytes(buf));
    }
    Value::BigInt(b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol-2 bytes of `{'a': 1, 'b': [True, None, 2.5], 'c': (300, -2, 70000)}` as
    /// pickle.dumps writes them (hand-checked against CPython's output).
    #[test]
    fn basic_values() {
        let mut p: Vec<u8> = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([b'X', 1, 0, 0, 0, b'a', b'K', 1]);
        p.extend([
            b'X', 1, 0, 0, 0, b'b', b']', b'q', 1, b'(', 0x88, b'N', b'G',
        ]);
        p.extend(2.5f64.to_be_bytes());
        p.extend([b'e', b'X', 1, 0, 0, 0, b'c', b'M']);
        p.extend(300u16.to_le_bytes());
        p.extend([b'J']);
        p.extend((-2i32).to_le_bytes());
        p.extend([b'J']);
        p.extend(70000i32.to_le_bytes());
        p.extend([0x87, b'q', 2, b'u', b'.']);
        let v = unpickle(&p).unwrap();
        assert_eq!(v.get("a").unwrap().as_int(), Some(1));
        let Value::List(l) = v.get("b").unwrap() else {
            panic!()
        };
        let l = l.borrow();
        assert!(matches!(l[0], Value::Bool(true)));
        assert!(matches!(l[1], Value::None));
        assert!(matches!(l[2], Value::Float(f) if f == 2.5));
        assert_eq!(v.get("c").unwrap().int_list(), Some(vec![300, -2, 70000]));
    }

    #[test]
    fn long1_and_memo_sharing() {
        // [x, x] where x = [] then appended 5 after both refs exist: the memo shares the list.
        let p: Vec<u8> = vec![
            0x80, 2, b']', b'q', 0, b'h', 0, 0x86, // ([], memo[0]) tuple -- wait, build below
            b'q', 1, b'0', b'h', 0, 0x8a, 2, 0xfe, 0xff, b'a', b'0', b'h', 1, b'.',
        ];
        let v = unpickle(&p).unwrap();
        let Value::Tuple(t) = v else { panic!("{v:?}") };
        let (Value::List(a), Value::List(b)) = (&t[0], &t[1]) else {
            panic!()
        };
        assert!(Rc::ptr_eq(a, b));
        assert_eq!(a.borrow()[0].as_int(), Some(-2));
    }

    #[test]
    fn unknown_opcode_is_named() {
        let e = unpickle(&[0x80, 2, 0xff]).unwrap_err();
        assert!(e.msg.contains("0xff"), "{e}");
    }

    #[test]
    fn python2_strings_and_pickles_back_to_back() {
        // Python 2's protocol 2: ('ab', 'é') as SHORT_BINSTRING and BINSTRING, then a second
        // pickle (BININT2 1001) on the same stream.
        let mut p: Vec<u8> = vec![0x80, 2, b'U', 2, b'a', b'b', b'T', 2, 0, 0, 0, 0xc3, 0xa9];
        p.extend([0x86, b'.', 0x80, 2, b'M', 0xe9, 0x03, b'.']);
        let first = unpickle_at(&p, 0).unwrap();
        let Value::Tuple(t) = &first.value else {
            panic!("{:?}", first.value)
        };
        assert_eq!((t[0].as_str(), t[1].as_str()), (Some("ab"), Some("é")));
        assert_eq!(first.end, 15);
        let second = unpickle_at(&p, first.end).unwrap();
        assert_eq!(second.value.as_int(), Some(1001));
        assert_eq!(second.end, p.len());
    }

    #[test]
    fn running_out_of_data_is_flagged_as_truncation() {
        let p = [0x80, 2, b'X', 5, 0, 0, 0, b'a', b'b'];
        let e = unpickle(&p).unwrap_err();
        assert!(e.truncated, "{e}");
        assert!(unpickle(&[0x80, 2, b'K']).unwrap_err().truncated);
        assert!(unpickle(&[0x80, 2, b'N']).unwrap_err().truncated); // no STOP
        assert!(!unpickle(&[0x80, 2, 0xff]).unwrap_err().truncated);
    }

    /// `('storage', torch.<ty>, key, 'cpu', numel[, view])` wrapped in BINPERSID.
    fn storage_pid(ty: &str, key: &str, numel: u8, view: Option<(u8, u8)>) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'(', b'X', 7, 0, 0, 0];
        p.extend(b"storage");
        p.extend(format!("ctorch\n{ty}\n").bytes());
        p.extend([b'X', key.len() as u8, 0, 0, 0]);
        p.extend(key.bytes());
        p.extend([b'X', 3, 0, 0, 0, b'c', b'p', b'u', b'K', numel]);
        match view {
            Some((o, n)) => p.extend([b'X', 1, 0, 0, 0, b'v', b'K', o, b'K', n, 0x87]),
            None => p.push(b'N'),
        }
        p.extend([b't', b'Q', b'.']);
        p
    }

    #[test]
    fn storage_persistent_ids_and_views() {
        let u = unpickle_at(&storage_pid("FloatStorage", "7", 10, Some((2, 5))), 0).unwrap();
        let Value::Storage {
            kind, numel, view, ..
        } = u.value
        else {
            panic!("{:?}", u.value)
        };
        assert_eq!((kind, numel), (Kind::Float, 10));
        assert_eq!(
            view,
            Some(StorageView {
                offset: 2,
                numel: 5
            })
        );
        assert_eq!(
            u.storages["7"],
            StorageDecl {
                kind: Kind::Float,
                numel: 10
            }
        );
        let e = unpickle(&storage_pid("FloatStorage", "7", 10, Some((8, 5)))).unwrap_err();
        assert!(e.msg.contains("view"), "{e}");
        let e = unpickle(&storage_pid("ComplexFloatStorage", "7", 1, None)).unwrap_err();
        assert!(e.msg.contains("torch.ComplexFloatStorage"), "{e}");
    }

    #[test]
    fn long_values() {
        assert_eq!(long_value(&[0xff]).as_int(), Some(-1));
        assert_eq!(long_value(&[0x00, 0x01]).as_int(), Some(256));
        assert!(matches!(long_value(&[1; 9]), Value::BigInt(_)));
    }
}
