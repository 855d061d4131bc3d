//! Official PyTorch `.pth` checkpoints, read without Python and without
//! copying the file: a `.pth` (torch >= 1.6) is a zip archive whose entries are
//! stored uncompressed, `<archive>/data.pkl` (a pickle of the state dict) and
//! one entry per tensor storage, `<archive>/data/<key>`. The zip directory is
//! parsed here, the pickle is *interpreted*, never executed: only the opcodes
//! a tensor state dict uses are accepted, and only four kinds of globals
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`, and the `torch.*Storage` classes). Anything else
//! (`os.system`, `builtins.eval`, ...) is refused with an error naming it.
//! The result is the byte range of every tensor inside the mapped file.
//!
//! Why not a crate: the zip crate reads entries through a decompressing
//! reader (we need offsets into the mapping), and the pickle crates either
//! execute nothing but also understand no torch tensors, or build values we
//! would convert again; the subset needed here is small and fully tested.

use std::collections::HashMap;

use crate::tensor::Dtype;

/// One tensor found in a `.pth`: its dtype (or the name of an unsupported
/// one), shape and byte range within the file.
#[derive(Debug, Clone)]
pub struct PthTensor {
    pub name: String,
    pub dtype: Result<Dtype, String>,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Whether `bytes` start like a zip archive (a `.pth` of torch >= 1.6).
pub fn is_zip(bytes: &[u8]) -> bool {
    // A local file header, or the end record of an empty archive.
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// The tensors of a `.pth` file's state dict. Errors are plain descriptions;
/// the loader adds the path.
pub fn index(bytes: &[u8]) -> Result<Vec<PthTensor>, String> {
    let zip = Zip::parse(bytes)?;
    let pkl = zip
        .entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .min_by_key(|n| (n.len(), n.as_str()))
        .ok_or("no data.pkl in the archive (not a torch.save checkpoint)")?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if let Some(order) = zip.entries.get(&format!("{prefix}byteorder")) {
        let order = &bytes[order.clone()];
        if order != b"little" {
            return Err(format!(
                "byte order {:?}: only little-endian checkpoints are supported",
                String::from_utf8_lossy(order)
            ));
        }
    }
    let root = Unpickler::new(&bytes[zip.entries[&pkl].clone()]).run()?;
    let items = match root {
        Value::Dict(items) => items,
        other => return Err(format!("the pickle holds {}, not a state dict", other.kind())),
    };
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items {
        let name = match key {
            Value::Str(s) => s,
            other => return Err(format!("a state dict key is {}, not a string", other.kind())),
        };
        let t = match value {
            Value::Tensor(t) => t,
            // Non-tensor entries (e.g. a saved step counter) are not weights.
            _ => continue,
        };
        let data = zip
            .entries
            .get(&format!("{prefix}data/{}", t.storage.key))
            .ok_or_else(|| format!("tensor `{name}`: storage {} is missing from the archive", t.storage.key))?;
        let elem = t.storage.elem;
        let too_big = || format!("tensor `{name}`: shape {:?} is too large", t.shape);
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
        // Row-major contiguous strides (dimensions of size 1 may have any stride).
        if t.stride.len() != t.shape.len() {
            return Err(format!("tensor `{name}`: {} strides for {} dimensions", t.stride.len(), t.shape.len()));
        }
        let mut expect = 1usize;
        for (&size, &stride) in t.shape.iter().zip(&t.stride).rev() {
            if size != 1 && stride != expect {
                return Err(format!("tensor `{name}` is not contiguous (shape {:?}, stride {:?})", t.shape, t.stride));
            }
            expect = expect.saturating_mul(size);
        }
        let start = t.offset.checked_mul(elem).and_then(|o| o.checked_add(data.start)).ok_or_else(too_big)?;
        let end = numel.checked_mul(elem).and_then(|n| n.checked_add(start)).ok_or_else(too_big)?;
        if end > data.end {
            return Err(format!(
                "tensor `{name}`: {numel} elements from offset {} run past its storage ({} bytes)",
                t.offset,
                data.len()
            ));
        }
        out.push(PthTensor { name, dtype: t.storage.dtype, shape: t.shape, start, end });
    }
    Ok(out)
}

// ---- zip ----------------------------------------------------------------

struct Zip {
    /// Entry name -> byte range of its (stored) data.
    entries: HashMap<String, std::ops::Range<usize>>,
}

/// The `N` bytes at `at`, or an error if they run past the end (`at` comes
/// from the file, so the sum is checked too).
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], String> {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .map(|s| s.try_into().unwrap())
        .ok_or_else(|| "zip: truncated (an offset points past the end of the file)".to_string())
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    bytes_at(b, at).map(u16::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    bytes_at(b, at).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    bytes_at(b, at).map(u64::from_le_bytes)
}

impl Zip {
    fn parse(b: &[u8]) -> Result<Self, String> {
        // End of central directory: 22 bytes plus a comment of up to 65535.
        let tail = b.len().saturating_sub(22 + 65535);
        let eocd = (tail..b.len().saturating_sub(21))
            .rev()
            .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .ok_or("zip: no end-of-central-directory record (truncated file?)")?;
        let mut count = u16_at(b, eocd + 10)? as u64;
        let mut cd_offset = u32_at(b, eocd + 16)? as u64;
        if count == 0xffff || cd_offset == 0xffff_ffff {
            // Zip64: the locator sits just before the end record.
            let loc = eocd.checked_sub(20).ok_or("zip: truncated zip64 locator")?;
            if u32_at(b, loc)? != 0x0706_4b50 {
                return Err("zip: missing zip64 locator".into());
            }
            let rec = usize::try_from(u64_at(b, loc + 8)?).map_err(|_| "zip: bad zip64 end record offset")?;
            if u32_at(b, rec)? != 0x0606_4b50 {
                return Err("zip: bad zip64 end record".into());
            }
            count = u64_at(b, rec + 32)?;
            cd_offset = u64_at(b, rec + 48)?;
        }
        let mut entries = HashMap::new();
        let mut at = usize::try_from(cd_offset).map_err(|_| "zip: bad central directory offset")?;
        for _ in 0..count {
            if u32_at(b, at)? != 0x0201_4b50 {
                return Err(format!("zip: bad central directory entry at byte {at}"));
            }
            let flags = u16_at(b, at + 8)?;
            let method = u16_at(b, at + 10)?;
            let mut size = u32_at(b, at + 20)? as u64;
            let mut uncompressed = u32_at(b, at + 24)? as u64;
            let name_len = u16_at(b, at + 28)? as usize;
            let extra_len = u16_at(b, at + 30)? as usize;
            let comment_len = u16_at(b, at + 32)? as usize;
            let mut local = u32_at(b, at + 42)? as u64;
            // Offsets below come from the file: `at` is bounded by the
            // checks above (it points at a 46-byte header inside the file).
            let name_bytes = b.get(at + 46..at + 46 + name_len).ok_or("zip: truncated entry name")?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            // Zip64 extra field: the 64-bit values of the fields set to all
            // ones, each inside the field's own length.
            let mut e = at + 46 + name_len;
            let extra_end = e + extra_len;
            while e + 4 <= extra_end {
                let (id, len) = (u16_at(b, e)?, u16_at(b, e + 2)? as usize);
                if id == 1 {
                    let mut f = e + 4;
                    for v in [&mut uncompressed, &mut size, &mut local] {
                        if *v == 0xffff_ffff {
                            if f + 8 > e + 4 + len {
                                return Err(format!("zip: entry `{name}` has a short zip64 field"));
                            }
                            *v = u64_at(b, f)?;
                            f += 8;
                        }
                    }
                }
                e += 4 + len;
            }
            if flags & 1 != 0 {
                return Err(format!("zip: entry `{name}` is encrypted"));
            }
            if entries.contains_key(&name) {
                return Err(format!("zip: entry `{name}` appears twice"));
            }
            if method != 0 || size != uncompressed {
                return Err(format!("zip: entry `{name}` is compressed (method {method}); torch.save stores entries"));
            }
            let local = usize::try_from(local).map_err(|_| format!("zip: bad offset for `{name}`"))?;
            if u32_at(b, local)? != 0x0403_4b50 {
                return Err(format!("zip: bad local header for `{name}`"));
            }
            // `local` is inside the file (the header was read), so these sums do not overflow.
            let data = local + 30 + u16_at(b, local + 26)? as usize + u16_at(b, local + 28)? as usize;
            let end = data.checked_add(size as usize).filter(|&end| end <= b.len());
            let end = end.ok_or_else(|| format!("zip: entry `{name}` runs past the end of the file"))?;
            entries.insert(name, data..end);
            at = extra_end + comment_len;
        }
        Ok(Self { entries })
    }
}

// ---- pickle -------------------------------------------------------------

#[derive(Debug, Clone)]
struct Storage {
    key: String,
    dtype: Result<Dtype, String>,
    /// Bytes per element (also of the dtypes not loaded, for the bounds check).
    elem: usize,
}

#[derive(Debug, Clone)]
struct TensorRef {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The values a tensor state dict's pickle builds.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// An allowed global: `module.name`.
    Global(&'static str),
    Storage(Storage),
    Tensor(TensorRef),
    Mark,
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Float => "a float",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a class",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
            Value::Mark => "a mark",
        }
    }
}

/// The globals a state dict may name; everything else is refused.
const ALLOWED_GLOBALS: [&str; 3] =
    ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"];

/// Storage classes and the dtype they hold (None: a dtype we do not load).
/// Storage classes, the dtype they hold (None: a dtype we do not load) and
/// their bytes per element.
const STORAGES: [(&str, Option<Dtype>, usize); 8] = [
    ("torch.FloatStorage", Some(Dtype::F32), 4),
    ("torch.HalfStorage", Some(Dtype::F16), 2),
    ("torch.BFloat16Storage", Some(Dtype::BF16), 2),
    ("torch.DoubleStorage", None, 8),
    ("torch.LongStorage", None, 8),
    ("torch.IntStorage", None, 4),
    ("torch.ByteStorage", None, 1),
    ("torch.BoolStorage", None, 1),
];

/// Deepest nesting of containers a state dict needs (a dict of tensors with
/// `_metadata` is about 5 deep); deeper pickles are refused, so dropping a
/// value never recurses far.
const MAX_DEPTH: u32 = 32;
/// Memory the unpickler may spend on the values it builds or copies (memo
/// gets copy), in bytes: PICKLE_BASE_BYTES plus PICKLE_BYTES_PER_BYTE per
/// byte of the pickle. A real state dict's pickle builds a few values per
/// tensor (a 7B checkpoint's is ~100 KB and needs a few MB); a pickle that
/// copies one string from the memo again and again, doubles a list through
/// the memo or pushes millions of `None`s is refused at that bound instead.
const PICKLE_BASE_BYTES: u64 = 16 << 20;
const PICKLE_BYTES_PER_BYTE: u64 = 8;

/// Bytes one value costs besides its string's bytes.
const VALUE_BYTES: u64 = std::mem::size_of::<Item>() as u64;

/// A value on the unpickler's stack or in its memo, with its nesting depth
/// and its size in bytes (what a copy of it costs).
#[derive(Debug, Clone)]
struct Item {
    v: Value,
    depth: u32,
    bytes: u64,
}

impl Item {
    fn leaf(v: Value) -> Self {
        let text = match &v {
            Value::Str(s) => s.len() as u64,
            _ => 0,
        };
        Item { v, depth: 0, bytes: VALUE_BYTES + text }
    }
}

struct Unpickler<'a> {
    b: &'a [u8],
    at: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Item>,
    /// Bytes of values built or copied so far, and the bound on them.
    spent: u64,
    budget: u64,
}

impl<'a> Unpickler<'a> {
    fn new(b: &'a [u8]) -> Self {
        let budget = PICKLE_BASE_BYTES.saturating_add(PICKLE_BYTES_PER_BYTE.saturating_mul(b.len() as u64));
        Self { b, at: 0, stack: Vec::new(), memo: HashMap::new(), spent: 0, budget }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).ok_or("pickle: truncated")?;
        let s = self.b.get(self.at..end).ok_or("pickle: truncated")?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.b[self.at..];
        let n = rest.iter().position(|&c| c == b'\n').ok_or("pickle: unterminated line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "pickle: a global name is not UTF-8")?;
        self.at += n + 1;
        Ok(s)
    }

    /// Counts `bytes` more against the budget.
    fn spend(&mut self, bytes: u64) -> Result<(), String> {
        self.spent = self.spent.saturating_add(bytes);
        if self.spent > self.budget {
            return Err(format!(
                "refused: the pickle builds more than {} MB of values from {} bytes (not a plain state dict)",
                self.budget >> 20,
                self.b.len()
            ));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        let item = Item::leaf(v);
        self.spend(item.bytes)?;
        self.stack.push(item);
        Ok(())
    }

    /// A container of `items` (moved in), one level deeper than the deepest of them.
    fn push_container(
        &mut self,
        items: Vec<Item>,
        make: impl FnOnce(Vec<Value>) -> Result<Value, String>,
    ) -> Result<(), String> {
        let depth = items.iter().map(|i| i.depth + 1).max().unwrap_or(1);
        if depth > MAX_DEPTH {
            return Err(format!("refused: containers nested more than {MAX_DEPTH} deep (not a plain state dict)"));
        }
        self.spend(VALUE_BYTES)?;
        let bytes = items.iter().map(|i| i.bytes).fold(VALUE_BYTES, u64::saturating_add);
        let v = make(items.into_iter().map(|i| i.v).collect())?;
        self.stack.push(Item { v, depth, bytes });
        Ok(())
    }

    fn pop(&mut self) -> Result<Item, String> {
        self.stack.pop().ok_or_else(|| "pickle: stack underflow".to_string())
    }

    /// Everything above the topmost mark, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Item>, String> {
        let m = self.stack.iter().rposition(|i| matches!(i.v, Value::Mark)).ok_or("pickle: no mark")?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items)
    }

    /// Adds `items` to the list or dict on top of the stack (`dict`: as
    /// key/value pairs), keeping its depth and size up to date.
    fn extend_top(&mut self, items: Vec<Item>, dict: bool) -> Result<(), String> {
        let depth = items.iter().map(|i| i.depth + 1).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(format!("refused: containers nested more than {MAX_DEPTH} deep (not a plain state dict)"));
        }
        let bytes = items.iter().map(|i| i.bytes).fold(0u64, u64::saturating_add);
        let top = self.stack.last_mut().ok_or("pickle: stack underflow")?;
        let values: Vec<Value> = items.into_iter().map(|i| i.v).collect();
        match (&mut top.v, dict) {
            (Value::List(l), false) => l.extend(values),
            (Value::Dict(d), true) => d.extend(pairs(values)?),
            _ => return Err(format!("pickle: adding items to {}", top.v.kind())),
        }
        top.depth = top.depth.max(depth);
        top.bytes = top.bytes.saturating_add(bytes);
        Ok(())
    }

    /// A copy of the top of the stack or of a memo entry, paid for in bytes.
    fn copy(&mut self, item: Item) -> Result<Item, String> {
        self.spend(item.bytes)?;
        Ok(item)
    }

    fn memo_put(&mut self, k: u32) -> Result<(), String> {
        let top = self.stack.last().ok_or("pickle: memo of an empty stack")?.clone();
        let top = self.copy(top)?;
        self.memo.insert(k, top);
        Ok(())
    }

    fn global(module: &str, name: &str) -> Result<Value, String> {
        let full = format!("{module}.{name}");
        if let Some(g) = ALLOWED_GLOBALS.iter().find(|g| **g == full) {
            return Ok(Value::Global(g));
        }
        if let Some((g, _, _)) = STORAGES.iter().find(|(g, _, _)| *g == full) {
            return Ok(Value::Global(g));
        }
        Err(format!(
            "refused: the pickle asks for `{full}`, which a tensor state dict never needs (a pickle is code; \
             only OrderedDict, torch tensors and storages are allowed)"
        ))
    }

    fn str_value(&mut self, n: usize) -> Result<Value, String> {
        let s = self.take(n)?;
        Ok(Value::Str(String::from_utf8(s.to_vec()).map_err(|_| "pickle: a string is not UTF-8")?))
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return Ok(self.pop()?.v), // STOP
                b'}' => self.push_container(Vec::new(), |_| Ok(Value::Dict(Vec::new())))?,
                b']' => self.push_container(Vec::new(), |_| Ok(Value::List(Vec::new())))?,
                b')' => self.push_container(Vec::new(), |_| Ok(Value::Tuple(Vec::new())))?,
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::None)?,
                0x88 | 0x89 => self.push(Value::Bool)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("pickle: a {n}-byte integer"));
                    }
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in bytes.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.str_value(n)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.str_value(n)?;
                    self.push(v)?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                    let v = self.memo.get(&k).ok_or_else(|| format!("pickle: memo {k} is unset"))?.clone();
                    let v = self.copy(v)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Self::global(module, name)?)?;
                }
                0x93 => {
                    let name = self.pop()?.v;
                    let module = self.pop()?.v;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Self::global(&m, &n)?)?,
                        _ => return Err("pickle: STACK_GLOBAL of non-strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_container(items, |v| Ok(Value::Tuple(v)))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle: stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_container(items, |v| Ok(Value::Tuple(v)))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_container(items, |v| Ok(Value::List(v)))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push_container(items, |v| Ok(Value::Dict(pairs(v)?)))?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v], false)?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, false)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend_top(vec![k, v], true)?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, true)?;
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (its `_metadata`) is
                    // not part of the weights; anything else is refused.
                    let _state = self.pop()?;
                    if !matches!(self.stack.last().map(|i| &i.v), Some(Value::Dict(_)) | Some(Value::Tensor(_))) {
                        return Err("pickle: BUILD on something other than a dict or tensor".into());
                    }
                }
                b'Q' => {
                    let pid = self.pop()?.v;
                    self.push(persistent_load(pid)?)?;
                }
                b'R' => {
                    let args = self.pop()?.v;
                    let f = self.pop()?.v;
                    self.push(reduce(f, args)?)?;
                }
                other => {
                    return Err(format!(
                        "refused: pickle opcode 0x{other:02x} at byte {} is not used by a tensor state dict",
                        self.at - 1
                    ))
                }
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("pickle: odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `('storage', torch.XStorage, key, location, numel)` -> the storage.
fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else { return Err("pickle: a persistent id that is not a tuple".into()) };
    match t.as_slice() {
        [Value::Str(kind), Value::Global(class), Value::Str(key), ..] if kind == "storage" => {
            let (dtype, elem) = match STORAGES.iter().find(|(g, _, _)| g == class) {
                Some((_, Some(d), e)) => (Ok(*d), *e),
                Some((g, None, e)) => (Err(g.trim_start_matches("torch.").trim_end_matches("Storage").to_string()), *e),
                None => return Err(format!("pickle: `{class}` is not a storage class")),
            };
            Ok(Value::Storage(Storage { key: key.clone(), dtype, elem }))
        }
        _ => Err("pickle: a persistent id other than a torch storage".into()),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    match v {
        Value::Tuple(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                _ => Err(format!("pickle: a tensor {what} holds a non-size")),
            })
            .collect(),
        _ => Err(format!("pickle: a tensor {what} is not a tuple")),
    }
}

/// Calls an allowed global by building its result; nothing is executed.
fn reduce(f: Value, args: Value) -> Result<Value, String> {
    let Value::Global(name) = f else { return Err(format!("pickle: REDUCE on {}", f.kind())) };
    let Value::Tuple(args) = args else { return Err("pickle: REDUCE arguments are not a tuple".into()) };
    match name {
        "collections.OrderedDict" if args.is_empty() => Ok(Value::Dict(Vec::new())),
        "torch._utils._rebuild_tensor_v2" => match args.as_slice() {
            [Value::Storage(s), Value::Int(offset), size, stride, ..] if *offset >= 0 => Ok(Value::Tensor(TensorRef {
                storage: s.clone(),
                offset: *offset as usize,
                shape: usizes(size, "size")?,
                stride: usizes(stride, "stride")?,
            })),
            _ => Err("pickle: unexpected arguments to _rebuild_tensor_v2".into()),
        },
        "torch._utils._rebuild_parameter" => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("pickle: unexpected arguments to _rebuild_parameter".into()),
        },
        other => Err(format!("refused: the pickle calls `{other}` in a way a state dict never does")),
    }
}
