//! Tensors in files: NumPy `.npy` (one tensor) and JSON (named tensors).
//!
//! JSON form, one object per tensor:
//!
//! ```json
//! {"tensors": [{"name": "input", "dtype": "f32", "shape": [1, 3], "data": [0.5, "NaN", 2]}]}
//! ```
//!
//! JSON has no NaN or infinity, so floats may also be the strings `"NaN"`, `"Infinity"`
//! and `"-Infinity"`; that is how they are written too. Both decoders take untrusted
//! bytes: every size is checked against the data before anything is allocated for it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shardseal_proto::tensor::{DType, HostTensor, byte_len};

use crate::Error;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a `.npy` file's bytes as a tensor called `name`.
pub fn read_npy(name: &str, bytes: &[u8]) -> Result<HostTensor, Error> {
    let bad = |why: &str| Error::BadTensorFile(format!(".npy: {why}"));
    let rest = bytes
        .strip_prefix(NPY_MAGIC)
        .ok_or_else(|| bad("not a .npy file (bad magic)"))?;
    let (major, rest) = rest
        .split_at_checked(2)
        .ok_or_else(|| bad("truncated header"))?;
    let (header_len, rest) = match major[0] {
        1 => {
            let (len, rest) = rest
                .split_at_checked(2)
                .ok_or_else(|| bad("truncated header"))?;
            (usize::from(u16::from_le_bytes([len[0], len[1]])), rest)
        }
        2 | 3 => {
            let (len, rest) = rest
                .split_at_checked(4)
                .ok_or_else(|| bad("truncated header"))?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
            (
                usize::try_from(len).map_err(|_| bad("header too long"))?,
                rest,
            )
        }
        v => return Err(bad(&format!("unsupported format version {v}"))),
    };
    let (header, data) = rest
        .split_at_checked(header_len)
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;

    let descr = dict_value(header, "descr").ok_or_else(|| bad("no 'descr' in header"))?;
    let dtype = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => DType::F32,
        "<f8" => DType::F64,
        "<i8" => DType::I64,
        "<i4" => DType::I32,
        "|u1" | "<u1" => DType::U8,
        other => {
            return Err(bad(&format!(
                "unsupported dtype {other:?} (use <f4, <f8, <i8, <i4 or |u1)"
            )));
        }
    };
    let fortran =
        dict_value(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order' in header"))?;
    if fortran.trim() != "False" {
        return Err(bad(
            "Fortran-ordered arrays are not supported; save with C order",
        ));
    }
    let shape_text = dict_value(header, "shape").ok_or_else(|| bad("no 'shape' in header"))?;
    let shape = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| bad(&format!("bad dimension {d:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let expected = byte_len(dtype, &shape).ok_or_else(|| bad("shape too large"))?;
    if data.len() != expected {
        return Err(bad(&format!(
            "shape {shape:?} of {dtype} needs {expected} bytes, file has {}",
            data.len()
        )));
    }
    HostTensor::new(name, dtype, shape, data.to_vec())
        .map_err(|e| Error::BadTensorFile(e.to_string()))
}

/// Writes a tensor as `.npy` (format 1.0, C order, little-endian).
pub fn write_npy(tensor: &HostTensor) -> Vec<u8> {
    let descr = match tensor.dtype() {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::U8 => "|u1",
    };
    let dims: Vec<String> = tensor.shape().iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic + version + length + header is a multiple of 64, ending in '\n'.
    let unpadded = NPY_MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + tensor.data().len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(tensor.data());
    out
}

/// The text of `key`'s value in a Python dict literal as `.npy` headers write them.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let after = &header[start + key.len() + 2..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let end = if after.starts_with('(') {
        after.find(')')? + 1
    } else {
        after.find(',').or_else(|| after.find('}'))?
    };
    Some(&after[..end])
}

#[derive(Serialize, Deserialize)]
struct JsonTensors {
    tensors: Vec<JsonTensor>,
}

#[derive(Serialize, Deserialize)]
struct JsonTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    data: Vec<Value>,
}

/// Reads named tensors from JSON (see the module doc for the form).
pub fn read_json(bytes: &[u8]) -> Result<Vec<HostTensor>, Error> {
    let bad = |why: String| Error::BadTensorFile(format!("JSON: {why}"));
    let parsed: JsonTensors = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    parsed
        .tensors
        .into_iter()
        .map(|t| {
            let dtype = DType::parse(&t.dtype).map_err(|e| bad(e.to_string()))?;
            let shape = t
                .shape
                .iter()
                .map(|&d| {
                    usize::try_from(d).map_err(|_| bad(format!("{}: dimension too large", t.name)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let count = byte_len(dtype, &shape)
                .ok_or_else(|| bad(format!("{}: shape too large", t.name)))?
                / dtype.size();
            if count != t.data.len() {
                return Err(bad(format!(
                    "{}: shape {shape:?} needs {count} values, found {}",
                    t.name,
                    t.data.len()
                )));
            }
            let mut data = Vec::with_capacity(count * dtype.size());
            for (i, v) in t.data.iter().enumerate() {
                let value_error = || bad(format!("{}: value {i} is not a valid {dtype}", t.name));
                match dtype {
                    DType::F32 => data.extend_from_slice(
                        &(json_float(v).ok_or_else(value_error)? as f32).to_le_bytes(),
                    ),
                    DType::F64 => data
                        .extend_from_slice(&json_float(v).ok_or_else(value_error)?.to_le_bytes()),
                    DType::I64 => {
                        data.extend_from_slice(&v.as_i64().ok_or_else(value_error)?.to_le_bytes())
                    }
                    DType::I32 => {
                        let n = v
                            .as_i64()
                            .and_then(|n| i32::try_from(n).ok())
                            .ok_or_else(value_error)?;
                        data.extend_from_slice(&n.to_le_bytes());
                    }
                    DType::U8 => data.push(
                        v.as_u64()
                            .and_then(|n| u8::try_from(n).ok())
                            .ok_or_else(value_error)?,
                    ),
                }
            }
            HostTensor::new(t.name, dtype, shape, data).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// Writes named tensors as JSON (see the module doc for the form).
pub fn write_json(tensors: &[HostTensor]) -> String {
    let tensors = tensors
        .iter()
        .map(|t| JsonTensor {
            name: t.name().to_owned(),
            dtype: t.dtype().name().to_owned(),
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            data: match t.dtype() {
                DType::F32 | DType::F64 => t.to_f64_lossy().into_iter().map(float_json).collect(),
                // Not through f64, which holds integers exactly only up to 2^53.
                DType::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|c| Value::from(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                    .collect(),
                _ => t
                    .to_f64_lossy()
                    .into_iter()
                    .map(|v| Value::from(v as i64))
                    .collect(),
            },
        })
        .collect();
    serde_json::to_string(&JsonTensors { tensors }).unwrap_or_default()
}

fn json_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn float_json(v: f64) -> Value {
    if v.is_nan() {
        Value::from("NaN")
    } else if v.is_infinite() {
        Value::from(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        Value::from(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn npy_round_trip_every_dtype() {
        for dtype in DType::ALL {
            for shape in [vec![], vec![3], vec![2, 3], vec![1, 2, 2, 1]] {
                let n = byte_len(dtype, &shape).unwrap();
                let t =
                    HostTensor::new("x", dtype, shape.clone(), (0..n).map(|i| i as u8).collect())
                        .unwrap();
                let back = read_npy("x", &write_npy(&t)).unwrap();
                assert_eq!(back, t, "{dtype} {shape:?}");
            }
        }
    }

    #[test]
    fn reads_numpy_written_header() {
        // np.save of np.arange(4, dtype=np.float32).reshape(2, 2), header as numpy writes it.
        let mut file = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
        let mut header = header.to_owned();
        header.push_str(&" ".repeat(118 - header.len() - 1));
        header.push('\n');
        file.extend_from_slice(header.as_bytes());
        for v in [0.0f32, 1.0, 2.0, 3.0] {
            file.extend_from_slice(&v.to_le_bytes());
        }
        let t = read_npy("x", &file).unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert_eq!(t.to_f32().unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn npy_lies_are_refused() {
        let t = HostTensor::from_f32("x", vec![2], &[1.0, 2.0]).unwrap();
        let good = write_npy(&t);
        assert!(
            read_npy("x", &good[..good.len() - 1]).is_err(),
            "truncated data"
        );
        assert!(read_npy("x", b"PK\x03\x04").is_err(), "not npy");
        let fortran = String::from_utf8_lossy(&good).replace("False", "True ");
        assert!(read_npy("x", fortran.as_bytes()).is_err());
        let huge = String::from_utf8_lossy(&good).replace("(2,)", "(99999999999999,)");
        assert!(read_npy("x", huge.as_bytes()).is_err());
    }

    #[test]
    fn json_round_trip_with_nan_and_infinity() {
        let t = HostTensor::from_f32(
            "in",
            vec![4],
            &[1.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
        )
        .unwrap();
        let ids = HostTensor::new(
            "ids",
            DType::I64,
            vec![2],
            [-3i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
        let text = write_json(&[t.clone(), ids.clone()]);
        assert!(
            text.contains("\"NaN\"") && text.contains("\"-Infinity\""),
            "{text}"
        );
        let back = read_json(text.as_bytes()).unwrap();
        assert_eq!(back[1], ids);
        let v = back[0].to_f32().unwrap();
        assert_eq!(v[0], 1.5);
        assert!(v[1].is_nan() && v[2] == f32::INFINITY && v[3] == f32::NEG_INFINITY);
    }

    #[test]
    fn json_lies_are_refused() {
        let wrong_count =
            br#"{"tensors":[{"name":"x","dtype":"f32","shape":[2,2],"data":[1,2,3]}]}"#;
        assert!(
            matches!(read_json(wrong_count), Err(Error::BadTensorFile(m)) if m.contains("needs 4 values"))
        );
        let huge = br#"{"tensors":[{"name":"x","dtype":"f32","shape":[4294967296,4294967296],"data":[]}]}"#;
        assert!(read_json(huge).is_err());
        let out_of_range = br#"{"tensors":[{"name":"x","dtype":"u8","shape":[1],"data":[256]}]}"#;
        assert!(read_json(out_of_range).is_err());
        assert!(read_json(b"[1,2").is_err());
    }

    proptest! {
        #[test]
        fn npy_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut with_magic = NPY_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = read_npy("x", &bytes);
            let _ = read_npy("x", &with_magic);
        }

        #[test]
        fn json_decoder_never_panics(text in ".{0,200}") {
            let _ = read_json(text.as_bytes());
        }
    }
}
