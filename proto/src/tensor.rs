//! Tensors as they cross a seal: the plaintext of a sealed activation, model input or
//! model output.
//!
//! A [`TensorBundle`](crate::v1::TensorBundle) is decoded from bytes that just left an
//! AEAD, so its claims are checked before anything trusts them: a known element type, a
//! shape whose element count does not overflow, and exactly as many data bytes as the
//! shape says. Element bytes live in zeroizing buffers, so a plaintext tensor is wiped
//! when it is dropped.

use std::fmt;

use bytes::Bytes;
use prost::Message;
use zeroize::Zeroizing;

use crate::v1;

/// The element types ShardSeal carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit unsigned integer.
    U8,
}

impl DType {
    /// Every supported element type.
    pub const ALL: [DType; 5] = [DType::F32, DType::F64, DType::I64, DType::I32, DType::U8];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    /// The wire name (`"f32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Result<Self, TensorError> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| TensorError::UnknownDType(name.chars().take(16).collect()))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why bytes are not a valid tensor or bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The element type is not one ShardSeal carries.
    #[error("unknown element type {0:?} (expected f32, f64, i64, i32 or u8)")]
    UnknownDType(String),
    /// The shape's element count or byte size does not fit in memory.
    #[error("tensor {name:?}: shape {shape:?} is too large")]
    ShapeTooLarge {
        /// The tensor.
        name: String,
        /// Its declared shape.
        shape: Vec<u64>,
    },
    /// The data length disagrees with dtype and shape.
    #[error("tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes, got {actual}")]
    DataLength {
        /// The tensor.
        name: String,
        /// Its element type.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape requires.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// Two tensors of a bundle share a name.
    #[error("tensor {0:?} appears twice")]
    DuplicateName(String),
    /// The bytes are not a protobuf `TensorBundle`.
    #[error("not a tensor bundle")]
    Malformed,
}

/// The largest tensor ShardSeal accepts in one message (4 GiB): a declared shape larger
/// than this is refused before any allocation.
pub const MAX_TENSOR_BYTES: usize = 4 << 30;

/// A named tensor whose element bytes are wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct HostTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the values: a tensor is somebody's data.
        f.debug_struct("HostTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

impl HostTensor {
    /// Builds a tensor from little-endian, row-major element bytes, checking that their
    /// length matches `dtype` and `shape`.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        let data = Zeroizing::new(data);
        let expected = byte_len(dtype, &shape).ok_or_else(|| TensorError::ShapeTooLarge {
            name: name.clone(),
            shape: shape.iter().map(|&d| d as u64).collect(),
        })?;
        if expected != data.len() {
            return Err(TensorError::DataLength {
                name,
                dtype,
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self {
            name,
            dtype,
            shape,
            data,
        })
    }

    /// A tensor of `f32` values.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<Self, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(name, DType::F32, shape, data)
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The little-endian, row-major element bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The values as `f32`, if that is the element type.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The values widened to `f64`, whatever the element type: what comparisons of
    /// outputs use.
    pub fn to_f64_lossy(&self) -> Vec<f64> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            DType::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            DType::I32 => d
                .chunks_exact(4)
                .map(|c| f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::U8 => d.iter().map(|&b| f64::from(b)).collect(),
        }
    }

    /// The index of the first NaN or infinite element, if the tensor is floating point and
    /// holds one. ShardSeal refuses such model inputs: tract's plans of a whole model and of
    /// its stages do not propagate them alike (a fused kernel keeps a NaN that a separate
    /// `Relu` drops), so a sealed answer for them would not be the model's answer.
    pub fn first_non_finite(&self) -> Option<usize> {
        let d = &self.data;
        match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
            DType::F64 => d
                .chunks_exact(8)
                .position(|c| !f64::from_le_bytes(c.try_into().unwrap_or([0; 8])).is_finite()),
            DType::I64 | DType::I32 | DType::U8 => None,
        }
    }

    /// Renames the tensor (stage boundaries keep ONNX names; clients may not).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// The element count and byte length of a shape, or `None` when they overflow or pass
/// [`MAX_TENSOR_BYTES`].
pub fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bytes = elements.checked_mul(dtype.size())?;
    (bytes <= MAX_TENSOR_BYTES).then_some(bytes)
}

/// Encodes tensors as a protobuf `TensorBundle`, into a buffer wiped on drop.
pub fn encode_bundle(tensors: &[HostTensor]) -> Zeroizing<Vec<u8>> {
    encode_bundle_with_spare(tensors, 0)
}

/// As [`encode_bundle`], leaving `spare` bytes of capacity after the bundle, so that a
/// sealer can append its tag in place (see `shardseal_keys::seal_activation_in_place`).
///
/// Each tensor's values are copied once, straight from the tensor into the bundle; the
/// bytes are those prost writes for the same `TensorBundle` (fields in number order,
/// empty fields left out).
pub fn encode_bundle_with_spare(tensors: &[HostTensor], spare: usize) -> Zeroizing<Vec<u8>> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    const TENSORS: u32 = 1; // TensorBundle.tensors
    const DATA: u32 = 4; // Tensor.data
    // Each tensor's fields but its values, which are appended after them.
    let heads: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            v1::Tensor {
                name: t.name.clone(),
                dtype: t.dtype.name().to_owned(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                data: Bytes::new(),
            }
            .encode_to_vec()
        })
        .collect();
    let data_len = |t: &HostTensor| match t.data.len() {
        0 => 0,
        n => key_len(DATA) + encoded_len_varint(n as u64) + n,
    };
    let tensor_len = |head: &[u8], t: &HostTensor| head.len() + data_len(t);
    let total: usize = heads
        .iter()
        .zip(tensors)
        .map(|(head, t)| {
            let len = tensor_len(head, t);
            key_len(TENSORS) + encoded_len_varint(len as u64) + len
        })
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(total + spare));
    for (head, t) in heads.iter().zip(tensors) {
        encode_key(TENSORS, WireType::LengthDelimited, &mut *out);
        encode_varint(tensor_len(head, t) as u64, &mut *out);
        out.extend_from_slice(head);
        if !t.data.is_empty() {
            encode_key(DATA, WireType::LengthDelimited, &mut *out);
            encode_varint(t.data.len() as u64, &mut *out);
            out.extend_from_slice(&t.data);
        }
    }
    debug_assert_eq!(out.len(), total);
    out
}

/// Decodes and validates a protobuf `TensorBundle` (names unique, dtypes known, data
/// lengths matching shapes). The bytes are copied into a buffer wiped on drop first; a
/// caller that owns its plaintext saves that copy with [`decode_bundle_shared`].
pub fn decode_bundle(bytes: &[u8]) -> Result<Vec<HostTensor>, TensorError> {
    decode_bundle_shared(Bytes::from_owner(Zeroizing::new(bytes.to_vec())))
}

/// As [`decode_bundle`], reading each tensor's values straight out of `plaintext` into the
/// tensor: one copy. `plaintext` should wipe itself when its last slice drops (an opened
/// activation's `SecretBytes::into_shared` does); this function holds no other copy.
pub fn decode_bundle_shared(plaintext: Bytes) -> Result<Vec<HostTensor>, TensorError> {
    let bundle = v1::TensorBundle::decode(plaintext).map_err(|_| TensorError::Malformed)?;
    let mut out: Vec<HostTensor> = Vec::with_capacity(bundle.tensors.len());
    for mut t in bundle.tensors {
        let data = std::mem::take(&mut t.data).to_vec();
        let tensor = from_wire(t, data)?;
        if out.iter().any(|o| o.name == tensor.name) {
            return Err(TensorError::DuplicateName(tensor.name.clone()));
        }
        out.push(tensor);
    }
    Ok(out)
}

fn from_wire(t: v1::Tensor, data: Vec<u8>) -> Result<HostTensor, TensorError> {
    // Wiped on every early return; moved out (not copied) on success.
    let mut data = Zeroizing::new(data);
    let dtype = DType::parse(&t.dtype)?;
    let too_large = || TensorError::ShapeTooLarge {
        name: t.name.clone(),
        shape: t.shape.clone(),
    };
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| too_large()))
        .collect::<Result<Vec<_>, _>>()?;
    HostTensor::new(t.name, dtype, shape, std::mem::take(&mut *data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bundle_round_trip() {
        let a = HostTensor::from_f32("x", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let b = HostTensor::new("ids", DType::I64, vec![2], vec![7; 16]).unwrap();
        let bytes = encode_bundle(&[a.clone(), b.clone()]);
        assert_eq!(decode_bundle(&bytes).unwrap(), vec![a.clone(), b]);
        assert_eq!(a.to_f32().unwrap()[5], 6.5);
        assert_eq!(a.to_f64_lossy()[5], 6.5);
    }

    #[test]
    fn the_first_non_finite_element_is_found_in_float_tensors_only() {
        let finite = HostTensor::from_f32("x", vec![3], &[f32::MAX, f32::MIN_POSITIVE, -0.0]);
        assert_eq!(finite.unwrap().first_non_finite(), None);
        for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = HostTensor::from_f32("x", vec![4], &[1.0, 2.0, special, special]).unwrap();
            assert_eq!(t.first_non_finite(), Some(2), "{special}");
        }
        let f64s: Vec<u8> = [0.5f64, f64::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = HostTensor::new("y", DType::F64, vec![2], f64s).unwrap();
        assert_eq!(t.first_non_finite(), Some(1));
        // The same bytes as integers are just numbers.
        let nan_bits = f32::NAN.to_le_bytes().repeat(2);
        let t = HostTensor::new("ids", DType::I32, vec![2], nan_bits).unwrap();
        assert_eq!(t.first_non_finite(), None);
    }

    #[test]
    fn lies_about_size_are_refused() {
        assert!(matches!(
            HostTensor::new("x", DType::F32, vec![2, 2], vec![0; 15]),
            Err(TensorError::DataLength {
                expected: 16,
                actual: 15,
                ..
            })
        ));
        let huge = v1::TensorBundle {
            tensors: vec![v1::Tensor {
                name: "x".into(),
                dtype: "f32".into(),
                shape: vec![u64::MAX, u64::MAX],
                data: Bytes::new(),
            }],
        };
        assert!(matches!(
            decode_bundle(&huge.encode_to_vec()),
            Err(TensorError::ShapeTooLarge { .. })
        ));
        let dup = encode_bundle(&[
            HostTensor::new("x", DType::U8, vec![1], vec![1]).unwrap(),
            HostTensor::new("x", DType::U8, vec![1], vec![2]).unwrap(),
        ]);
        assert_eq!(
            decode_bundle(&dup),
            Err(TensorError::DuplicateName("x".into()))
        );
        let unknown = v1::TensorBundle {
            tensors: vec![v1::Tensor {
                name: "x".into(),
                dtype: "bf16".into(),
                shape: vec![1],
                data: vec![0, 0].into(),
            }],
        };
        assert_eq!(
            decode_bundle(&unknown.encode_to_vec()),
            Err(TensorError::UnknownDType("bf16".into()))
        );
        assert_eq!(decode_bundle(&[0xff, 0xff]), Err(TensorError::Malformed));
    }

    #[test]
    fn debug_shows_no_values() {
        let t = HostTensor::from_f32("secret", vec![1], &[1234.5]).unwrap();
        let shown = format!("{t:?}");
        assert!(
            shown.contains("secret") && !shown.contains("1234"),
            "{shown}"
        );
    }

    /// The tensors own their values; the shared plaintext is let go of (so wiped by its
    /// owner) by the time decoding returns, whatever the outcome.
    #[test]
    fn shared_decoding_keeps_no_hold_on_the_plaintext() {
        struct Owner(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Owner {
            fn drop(&mut self) {
                self.1.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let t = HostTensor::from_f32("x", vec![3], &[1.0, 2.0, 3.0]).unwrap();
        let good = encode_bundle(std::slice::from_ref(&t)).to_vec();
        let mut duplicate = good.clone();
        duplicate.extend_from_slice(&good);
        for (bytes, ok) in [(good, true), (duplicate, false), (vec![0xff; 9], false)] {
            let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let plaintext = Bytes::from_owner(Owner(bytes, dropped.clone()));
            let decoded = decode_bundle_shared(plaintext);
            assert_eq!(decoded.is_ok(), ok, "{decoded:?}");
            assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
            if let Ok(tensors) = decoded {
                assert_eq!(tensors, vec![t.clone()]);
            }
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_bundle(&bytes);
        }

        #[test]
        fn every_valid_bundle_round_trips(
            dims in proptest::collection::vec(0usize..5, 0..4),
            dtype in proptest::sample::select(DType::ALL.to_vec()),
            seed in any::<u8>(),
        ) {
            let len = byte_len(dtype, &dims).unwrap();
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let t = HostTensor::new("t", dtype, dims, data).unwrap();
            prop_assert_eq!(decode_bundle(&encode_bundle(std::slice::from_ref(&t))).unwrap(), vec![t]);
        }

        /// Decoding from a shared buffer gives what decoding a copy gives, for any bundle.
        #[test]
        fn shared_and_copied_decoding_agree(
            dims in proptest::collection::vec(0usize..6, 0..4),
            dtype in proptest::sample::select(DType::ALL.to_vec()),
        ) {
            let len = byte_len(dtype, &dims).unwrap();
            let t = HostTensor::new("t", dtype, dims, (0..len).map(|i| i as u8).collect()).unwrap();
            let bundle = encode_bundle(std::slice::from_ref(&t));
            let shared = decode_bundle_shared(Bytes::copy_from_slice(&bundle)).unwrap();
            prop_assert_eq!(&shared, &decode_bundle(&bundle).unwrap());
            prop_assert_eq!(shared, vec![t]);
        }

        /// The hand-laid encoding is byte for byte what prost writes for the same message,
        /// for any number of tensors, empty ones and long names included.
        #[test]
        fn the_bundle_encoding_is_prosts(
            tensors in proptest::collection::vec(
                (
                    "[a-z]{0,200}",
                    proptest::sample::select(DType::ALL.to_vec()),
                    proptest::collection::vec(0usize..40, 0..4),
                ),
                0..4,
            ),
            spare in 0usize..64,
        ) {
            let tensors: Vec<HostTensor> = tensors
                .into_iter()
                .map(|(name, dtype, dims)| {
                    let len = byte_len(dtype, &dims).unwrap();
                    HostTensor::new(name, dtype, dims, vec![7; len]).unwrap()
                })
                .collect();
            let by_prost = v1::TensorBundle {
                tensors: tensors
                    .iter()
                    .map(|t| v1::Tensor {
                        name: t.name().to_owned(),
                        dtype: t.dtype().name().to_owned(),
                        shape: t.shape().iter().map(|&d| d as u64).collect(),
                        data: t.data().to_vec().into(),
                    })
                    .collect(),
            }
            .encode_to_vec();
            let ours = encode_bundle_with_spare(&tensors, spare);
            prop_assert_eq!(&*ours, &by_prost);
            prop_assert!(ours.capacity() >= ours.len() + spare);
        }
    }
}
