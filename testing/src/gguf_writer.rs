//! A minimal, dependency-free GGUF v3 writer.
//!
//! Only the subset of the format needed by the test suite is implemented:
//! scalar metadata (`u32`, `i32`, `f32`, `bool`, `string`), arrays of
//! strings / `f32` / `i32`, and tensors stored as `F32` or `F16`.
//!
//! File layout (all integers little-endian), as described in llama.cpp's
//! `ggml/include/gguf.h`:
//!
//! 1. header: magic `"GGUF"`, `u32` version (3), `u64` tensor count,
//!    `u64` key/value count;
//! 2. key/value pairs: `gguf string` key, `u32` value type, value;
//! 3. tensor infos: `gguf string` name, `u32` number of dimensions,
//!    `u64` per dimension (`ne0` first), `u32` ggml type, `u64` offset of the
//!    tensor data relative to the start of the data section;
//! 4. zero padding up to `general.alignment` (default 32);
//! 5. tensor data, each tensor padded to the alignment.
//!
//! A `gguf string` is a `u64` byte length followed by UTF-8 bytes (no NUL).

use std::io::{self, Write};
use std::path::Path;

/// The GGUF magic bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF format version written by [`GgufWriter`].
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section used when `general.alignment` is not set.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// GGUF metadata value type ids (`enum gguf_type` in `gguf.h`).
pub mod value_type {
    /// `GGUF_TYPE_UINT32`.
    pub const U32: u32 = 4;
    /// `GGUF_TYPE_INT32`.
    pub const I32: u32 = 5;
    /// `GGUF_TYPE_FLOAT32`.
    pub const F32: u32 = 6;
    /// `GGUF_TYPE_BOOL`.
    pub const BOOL: u32 = 7;
    /// `GGUF_TYPE_STRING`.
    pub const STRING: u32 = 8;
    /// `GGUF_TYPE_ARRAY`.
    pub const ARRAY: u32 = 9;
}

/// ggml tensor type ids (`enum ggml_type` in `ggml.h`) supported by the writer.
pub mod tensor_type {
    /// `GGML_TYPE_F32`.
    pub const F32: u32 = 0;
    /// `GGML_TYPE_F16`.
    pub const F16: u32 = 1;
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file in memory and writes it out.
///
/// Keys and tensors are written in insertion order, so the same sequence of
/// calls always produces byte-identical output. Adding a key that already
/// exists replaces its value in place.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl GgufWriter {
    /// Creates an empty writer (no metadata, no tensors).
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, key: &str, value: Value) {
        if let Some(slot) = self.kvs.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.kvs.push((key.to_owned(), value));
        }
    }

    /// Adds a `u32` metadata value.
    pub fn add_u32(&mut self, key: &str, value: u32) {
        self.add(key, Value::U32(value));
    }

    /// Adds an `i32` metadata value.
    pub fn add_i32(&mut self, key: &str, value: i32) {
        self.add(key, Value::I32(value));
    }

    /// Adds an `f32` metadata value.
    pub fn add_f32(&mut self, key: &str, value: f32) {
        self.add(key, Value::F32(value));
    }

    /// Adds a `bool` metadata value.
    pub fn add_bool(&mut self, key: &str, value: bool) {
        self.add(key, Value::Bool(value));
    }

    /// Adds a string metadata value.
    pub fn add_string(&mut self, key: &str, value: &str) {
        self.add(key, Value::String(value.to_owned()));
    }

    /// Adds an array-of-strings metadata value.
    pub fn add_string_array<S: AsRef<str>>(&mut self, key: &str, values: &[S]) {
        let values = values.iter().map(|s| s.as_ref().to_owned()).collect();
        self.add(key, Value::StringArray(values));
    }

    /// Adds an array-of-`f32` metadata value.
    pub fn add_f32_array(&mut self, key: &str, values: &[f32]) {
        self.add(key, Value::F32Array(values.to_vec()));
    }

    /// Adds an array-of-`i32` metadata value.
    pub fn add_i32_array(&mut self, key: &str, values: &[i32]) {
        self.add(key, Value::I32Array(values.to_vec()));
    }

    /// Number of metadata key/value pairs added so far.
    pub fn kv_count(&self) -> usize {
        self.kvs.len()
    }

    /// Number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The data-section alignment: `general.alignment` if set as a `u32`,
    /// otherwise [`GGUF_DEFAULT_ALIGNMENT`].
    pub fn alignment(&self) -> u64 {
        self.kvs
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", Value::U32(a)) if *a > 0 => Some(u64::from(*a)),
                _ => None,
            })
            .unwrap_or(GGUF_DEFAULT_ALIGNMENT)
    }

    fn push_tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) {
        assert!(
            !dims.is_empty() && dims.len() <= 4,
            "tensor '{name}': GGUF tensors have 1..=4 dimensions, got {}",
            dims.len()
        );
        assert!(
            self.tensors.iter().all(|t| t.name != name),
            "duplicate tensor name '{name}'"
        );
        self.tensors.push(Tensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ggml_type,
            data,
        });
    }

    /// Adds an `F32` tensor. `dims` are in ggml order (`ne0` first, i.e. the
    /// contiguous dimension first); `data.len()` must equal their product.
    ///
    /// # Panics
    /// If the element count does not match `dims`, if `dims` has more than 4
    /// or zero entries, or if the name is already used.
    pub fn add_tensor_f32(&mut self, name: &str, dims: &[u64], data: &[f32]) {
        check_len(name, dims, data.len());
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push_tensor(name, dims, tensor_type::F32, bytes);
    }

    /// Adds an `F16` tensor, converting `data` from `f32` (round to nearest
    /// even). `dims` are in ggml order (`ne0` first).
    ///
    /// # Panics
    /// Same conditions as [`GgufWriter::add_tensor_f32`].
    pub fn add_tensor_f16(&mut self, name: &str, dims: &[u64], data: &[f32]) {
        check_len(name, dims, data.len());
        let bytes = data.iter().flat_map(|&x| f32_to_f16_bits(x).to_le_bytes()).collect();
        self.push_tensor(name, dims, tensor_type::F16, bytes);
    }

    /// Serialises the whole file into `out`.
    pub fn write<W: Write>(&self, out: &mut W) -> io::Result<()> {
        out.write_all(&self.to_bytes())
    }

    /// Serialises the whole file into a byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut buf = Vec::new();

        // header
        buf.extend_from_slice(&GGUF_MAGIC);
        put_u32(&mut buf, GGUF_VERSION);
        put_u64(&mut buf, self.tensors.len() as u64);
        put_u64(&mut buf, self.kvs.len() as u64);

        // metadata
        for (key, value) in &self.kvs {
            put_str(&mut buf, key);
            put_value(&mut buf, value);
        }

        // tensor infos
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut buf, &t.name);
            put_u32(&mut buf, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut buf, d);
            }
            put_u32(&mut buf, t.ggml_type);
            put_u64(&mut buf, offset);
            offset += pad_to(t.data.len() as u64, alignment);
        }

        // data section
        pad_buf(&mut buf, alignment);
        for t in &self.tensors {
            buf.extend_from_slice(&t.data);
            pad_buf(&mut buf, alignment);
        }
        buf
    }

    /// Writes the file to `path` (created or truncated).
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn check_len(name: &str, dims: &[u64], len: usize) {
    let expected: u64 = dims.iter().product();
    assert_eq!(
        expected, len as u64,
        "tensor '{name}': dims {dims:?} need {expected} elements, got {len}"
    );
}

fn pad_to(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

fn pad_buf(buf: &mut Vec<u8>, alignment: u64) {
    let target = pad_to(buf.len() as u64, alignment) as usize;
    buf.resize(target, 0);
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U32(v) => {
            put_u32(buf, value_type::U32);
            put_u32(buf, *v);
        }
        Value::I32(v) => {
            put_u32(buf, value_type::I32);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Value::F32(v) => {
            put_u32(buf, value_type::F32);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            put_u32(buf, value_type::BOOL);
            buf.push(u8::from(*v));
        }
        Value::String(s) => {
            put_u32(buf, value_type::STRING);
            put_str(buf, s);
        }
        Value::StringArray(items) => {
            put_u32(buf, value_type::ARRAY);
            put_u32(buf, value_type::STRING);
            put_u64(buf, items.len() as u64);
            for s in items {
                put_str(buf, s);
            }
        }
        Value::F32Array(items) => {
            put_u32(buf, value_type::ARRAY);
            put_u32(buf, value_type::F32);
            put_u64(buf, items.len() as u64);
            for v in items {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        Value::I32Array(items) => {
            put_u32(buf, value_type::ARRAY);
            put_u32(buf, value_type::I32);
            put_u64(buf, items.len() as u64);
            for v in items {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Converts an `f32` to IEEE-754 binary16 bits, rounding to nearest even.
/// Overflow becomes infinity; NaN stays NaN (quiet).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x007f_ffff;

    if exp == 0xff {
        // Inf or NaN.
        let nan_bit = if mant != 0 { 0x0200 } else { 0 };
        return sign | 0x7c00 | nan_bit;
    }

    // Unbiased exponent, rebias for half precision.
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00; // overflow -> inf
    }

    if half_exp <= 0 {
        // Subnormal half (or zero).
        if half_exp < -10 {
            return sign; // too small: signed zero
        }
        let m = mant | 0x0080_0000; // implicit leading 1
        let shift = (14 - half_exp) as u32; // 24-bit mantissa -> 10-bit subnormal
        let half_m = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round_up = rem > halfway || (rem == halfway && (half_m & 1) == 1);
        return sign | (half_m + u32::from(round_up)) as u16;
    }

    let half_m = mant >> 13;
    let rem = mant & 0x1fff;
    let mut out = ((half_exp as u32) << 10) | half_m;
    if rem > 0x1000 || (rem == 0x1000 && (half_m & 1) == 1) {
        // Carry may propagate into the exponent (and to inf), which is correct.
        out += 1;
    }
    sign | out as u16
}

/// Converts IEEE-754 binary16 bits to `f32` (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x03ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: value = m * 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent minimal GGUF reader used to check the writer's output.
    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    #[derive(Debug, PartialEq)]
    enum V {
        U32(u32),
        I32(i32),
        F32(f32),
        Bool(bool),
        Str(String),
        Arr(Vec<V>),
    }

    #[derive(Debug)]
    struct Info {
        name: String,
        dims: Vec<u64>,
        ty: u32,
        offset: u64,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> &'a [u8] {
            let s = &self.buf[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn string(&mut self) -> String {
            let n = self.u64() as usize;
            String::from_utf8(self.take(n).to_vec()).unwrap()
        }
        fn value(&mut self, ty: u32) -> V {
            match ty {
                4 => V::U32(self.u32()),
                5 => V::I32(self.u32() as i32),
                6 => V::F32(f32::from_bits(self.u32())),
                7 => V::Bool(self.take(1)[0] != 0),
                8 => V::Str(self.string()),
                9 => {
                    let ety = self.u32();
                    let n = self.u64();
                    V::Arr((0..n).map(|_| self.value(ety)).collect())
                }
                other => panic!("unexpected value type {other}"),
            }
        }
    }

    struct Parsed {
        version: u32,
        kvs: Vec<(String, V)>,
        infos: Vec<Info>,
        data_offset: usize,
    }

    fn parse(buf: &[u8], alignment: usize) -> Parsed {
        let mut r = Reader { buf, pos: 0 };
        assert_eq!(r.take(4), b"GGUF");
        let version = r.u32();
        let n_tensors = r.u64();
        let n_kv = r.u64();
        let kvs = (0..n_kv)
            .map(|_| {
                let k = r.string();
                let ty = r.u32();
                (k, r.value(ty))
            })
            .collect();
        let infos = (0..n_tensors)
            .map(|_| {
                let name = r.string();
                let nd = r.u32();
                let dims = (0..nd).map(|_| r.u64()).collect();
                let ty = r.u32();
                let offset = r.u64();
                Info { name, dims, ty, offset }
            })
            .collect();
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        assert!(buf[r.pos..data_offset].iter().all(|&b| b == 0));
        Parsed {
            version,
            kvs,
            infos,
            data_offset,
        }
    }

    #[test]
    fn round_trip_through_independent_reader() {
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "llama");
        w.add_u32("a.u32", 7);
        w.add_i32("a.i32", -3);
        w.add_f32("a.f32", 1.5);
        w.add_bool("a.bool", true);
        w.add_string_array("a.strs", &["x", "▁y", ""]);
        w.add_f32_array("a.f32s", &[0.25, -2.0]);
        w.add_i32_array("a.i32s", &[1, -1, 6]);
        let t0: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t1: Vec<f32> = vec![0.5, -1.0, 65504.0];
        w.add_tensor_f32("t0", &[3, 2], &t0);
        w.add_tensor_f16("t1", &[3], &t1);

        let bytes = w.to_bytes();
        let p = parse(&bytes, 32);
        assert_eq!(p.version, 3);
        assert_eq!(p.kvs.len(), 8);
        assert_eq!(p.kvs[0], ("general.architecture".into(), V::Str("llama".into())));
        assert_eq!(p.kvs[1].1, V::U32(7));
        assert_eq!(p.kvs[2].1, V::I32(-3));
        assert_eq!(p.kvs[3].1, V::F32(1.5));
        assert_eq!(p.kvs[4].1, V::Bool(true));
        assert_eq!(
            p.kvs[5].1,
            V::Arr(vec![V::Str("x".into()), V::Str("▁y".into()), V::Str("".into())])
        );
        assert_eq!(p.kvs[6].1, V::Arr(vec![V::F32(0.25), V::F32(-2.0)]));
        assert_eq!(p.kvs[7].1, V::Arr(vec![V::I32(1), V::I32(-1), V::I32(6)]));

        assert_eq!(p.infos.len(), 2);
        assert_eq!(p.infos[0].name, "t0");
        assert_eq!(p.infos[0].dims, vec![3, 2]);
        assert_eq!(p.infos[0].ty, tensor_type::F32);
        assert_eq!(p.infos[0].offset, 0);
        assert_eq!(p.infos[1].name, "t1");
        assert_eq!(p.infos[1].ty, tensor_type::F16);
        assert_eq!(p.infos[1].offset, 32); // 24 bytes padded to 32

        assert_eq!(p.data_offset % 32, 0);
        let d0 = &bytes[p.data_offset..p.data_offset + 24];
        let back: Vec<f32> = d0
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, t0);
        let s1 = p.data_offset + p.infos[1].offset as usize;
        let back: Vec<f32> = bytes[s1..s1 + 6]
            .chunks_exact(2)
            .map(|c| f16_bits_to_f32(u16::from_le_bytes(c.try_into().unwrap())))
            .collect();
        assert_eq!(back, t1);
        // File ends padded to the alignment.
        assert_eq!(bytes.len(), p.data_offset + 64);
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut w = GgufWriter::new();
        w.add_u32("general.alignment", 64);
        w.add_tensor_f32("a", &[3], &[1.0, 2.0, 3.0]);
        w.add_tensor_f32("b", &[1], &[4.0]);
        let bytes = w.to_bytes();
        let p = parse(&bytes, 64);
        assert_eq!(p.infos[0].offset, 0);
        assert_eq!(p.infos[1].offset, 64);
        assert_eq!(p.data_offset % 64, 0);
        let b = p.data_offset + 64;
        assert_eq!(f32::from_le_bytes(bytes[b..b + 4].try_into().unwrap()), 4.0);
        assert_eq!(bytes.len() % 64, 0);
    }

    #[test]
    fn replacing_a_key_keeps_one_entry() {
        let mut w = GgufWriter::new();
        w.add_u32("k", 1);
        w.add_u32("k", 2);
        assert_eq!(w.kv_count(), 1);
        let p = parse(&w.to_bytes(), 32);
        assert_eq!(p.kvs, vec![("k".to_string(), V::U32(2))]);
    }

    #[test]
    fn f16_conversion() {
        let cases: &[(f32, u16)] = &[
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00), // rounds up to inf
            (1e9, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (5.960_464_5e-8, 0x0001),     // smallest subnormal
            (6.103_515_6e-5, 0x0400),     // smallest normal
            (1.0 + 1.0 / 2048.0, 0x3c00), // tie -> even
            (1.0 + 3.0 / 2048.0, 0x3c02), // tie -> even (up)
            (0.1, 0x2e66),
        ];
        for &(x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x}");
        }
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
        // Exhaustive round trip of every finite half value.
        for h in 0..=u16::MAX {
            let f = f16_bits_to_f32(h);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16_bits(f), h, "{h:#06x}");
        }
    }
}
