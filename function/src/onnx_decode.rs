//! Decoding a shard's ONNX model with each weight read once, straight into the tensor tract
//! runs with.
//!
//! prost decodes an initializer's `raw_data` into a `Vec<u8>`, and tract then copies that
//! into an aligned tensor: two copies of every weight, each into memory a fresh process
//! faults in page by page (on ResNet-50 in a fresh process, decoding took 58 ms and the
//! conversion 20 more, for 98 MB). This decoder walks `ModelProto` → `graph` →
//! `initializer` itself, lets prost decode every other field, and copies a plain-typed
//! `raw_data` from the plaintext into a tract tensor of the type and shape declared before
//! it. Anything else (values in typed fields, external data, `Bool` and the types tract
//! reads another way, a layout changed after the data) stays a `TensorProto` for tract's
//! own `load_tensor`, so the result is the tensor tract would have made either way.
//!
//! Every other field goes through prost's generated per-field decoder
//! (`Message::merge_field`, which derived `Message` impls call for their fields), so the
//! rest of the model decodes exactly as `ModelProto::decode` would; the nested messages'
//! lengths are checked as prost's `merge_loop` checks them.

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint};
use tract_onnx::pb;
use tract_onnx::prelude::{DatumType, Tensor};

/// `ModelProto.graph`.
const MODEL_GRAPH: u32 = 7;
/// `GraphProto.initializer`.
const GRAPH_INITIALIZER: u32 = 5;
/// `TensorProto.raw_data`.
const TENSOR_RAW_DATA: u32 = 9;

/// A graph initializer, in the order the graph lists it.
pub(crate) enum Initializer {
    /// Plain-typed raw data, already in the tensor tract runs with.
    Loaded { name: String, value: Tensor },
    /// Left for tract's `load_tensor`.
    Proto(pb::TensorProto),
}

impl Initializer {
    pub(crate) fn name(&self) -> &str {
        match self {
            Initializer::Loaded { name, .. } => name,
            Initializer::Proto(proto) => &proto.name,
        }
    }
}

/// Not an ONNX model: the protobuf is malformed or truncated.
#[derive(Debug)]
pub(crate) struct Malformed;

impl From<prost::DecodeError> for Malformed {
    fn from(_: prost::DecodeError) -> Self {
        Malformed
    }
}

/// Decodes an ONNX model as prost would, except that the graph's initializers come back
/// on their own (the returned graph has none).
pub(crate) fn decode_model(
    buf: &mut impl Buf,
) -> Result<(pb::ModelProto, Vec<Initializer>), Malformed> {
    let mut model = pb::ModelProto::default();
    let mut initializers = Vec::new();
    let ctx = DecodeContext::default();
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(buf)?;
        if tag == MODEL_GRAPH && wire_type == WireType::LengthDelimited {
            // A message field given twice is merged, as prost does.
            let graph = model.graph.get_or_insert_with(Default::default);
            merge_nested(buf, |buf| {
                merge_graph_field(graph, &mut initializers, buf, ctx.clone())
            })?;
        } else {
            model.merge_field(tag, wire_type, buf, ctx.clone())?;
        }
    }
    Ok((model, initializers))
}

/// Reads a length-delimited message's length, then merges fields with `merge_field` until
/// exactly that many bytes are read (prost's `merge_loop`).
fn merge_nested<B: Buf>(
    buf: &mut B,
    mut merge_field: impl FnMut(&mut B) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let len = decode_varint(buf)?;
    let remaining = buf.remaining();
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= remaining)
        .ok_or(Malformed)?;
    let limit = remaining - len;
    while buf.remaining() > limit {
        merge_field(buf)?;
    }
    if buf.remaining() == limit {
        Ok(())
    } else {
        Err(Malformed)
    }
}

fn merge_graph_field<B: Buf>(
    graph: &mut pb::GraphProto,
    initializers: &mut Vec<Initializer>,
    buf: &mut B,
    ctx: DecodeContext,
) -> Result<(), Malformed> {
    let (tag, wire_type) = decode_key(buf)?;
    if tag == GRAPH_INITIALIZER && wire_type == WireType::LengthDelimited {
        let mut tensor = TensorFields::default();
        merge_nested(buf, |buf| merge_tensor_field(&mut tensor, buf, ctx.clone()))?;
        initializers.push(tensor.finish());
        Ok(())
    } else {
        Ok(graph.merge_field(tag, wire_type, buf, ctx)?)
    }
}

/// A `TensorProto` being decoded, its raw data possibly already in a tract tensor.
#[derive(Default)]
struct TensorFields {
    proto: pb::TensorProto,
    /// `raw_data`, in a tensor of the type and shape declared before it.
    loaded: Option<Tensor>,
}

fn merge_tensor_field<B: Buf>(
    tensor: &mut TensorFields,
    buf: &mut B,
    ctx: DecodeContext,
) -> Result<(), Malformed> {
    let (tag, wire_type) = decode_key(buf)?;
    if tag != TENSOR_RAW_DATA || wire_type != WireType::LengthDelimited {
        return Ok(tensor.proto.merge_field(tag, wire_type, buf, ctx)?);
    }
    let len = decode_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= buf.remaining())
        .ok_or(Malformed)?;
    // A later `raw_data` replaces an earlier one.
    tensor.loaded = None;
    tensor.proto.raw_data = Vec::new();
    match declared_layout(&tensor.proto).filter(|layout| len > 0 && layout.byte_len() == Some(len))
    {
        Some(layout) => {
            // The size was checked against the bytes at hand: this allocates no more.
            let mut value = Tensor::zero_dt(layout.dt, &layout.shape).map_err(|_| Malformed)?;
            buf.copy_to_slice(value.as_bytes_mut());
            tensor.loaded = Some(value);
        }
        None => {
            tensor.proto.raw_data = vec![0; len];
            buf.copy_to_slice(&mut tensor.proto.raw_data);
        }
    }
    Ok(())
}

impl TensorFields {
    fn finish(self) -> Initializer {
        let TensorFields { mut proto, loaded } = self;
        match loaded {
            Some(value)
                if declared_layout(&proto).is_some_and(|layout| {
                    layout.dt == value.datum_type() && layout.shape == value.shape()
                }) =>
            {
                Initializer::Loaded {
                    name: proto.name,
                    value,
                }
            }
            Some(value) => {
                // Type or dims changed after the data: tract decides what that means.
                proto.raw_data = value.as_bytes().to_vec();
                Initializer::Proto(proto)
            }
            None => Initializer::Proto(proto),
        }
    }
}

/// An element type tract loads from raw data by copying it, and a shape.
struct Layout {
    dt: DatumType,
    shape: Vec<usize>,
}

impl Layout {
    fn byte_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(self.dt.size_of(), |bytes, &d| bytes.checked_mul(d))
    }
}

/// The layout `proto` declares so far, if tract would copy its raw data as it is
/// (`tract_onnx::tensor::create_tensor`).
fn declared_layout(proto: &pb::TensorProto) -> Option<Layout> {
    use DatumType::*;
    let dt: DatumType = pb::tensor_proto::DataType::try_from(proto.data_type)
        .ok()?
        .try_into()
        .ok()?;
    if !matches!(
        dt,
        U8 | U16 | U32 | U64 | I8 | I16 | I32 | I64 | F16 | F32 | F64
    ) {
        return None;
    }
    let shape = proto
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<_>>>()?;
    Some(Layout { dt, shape })
}

/// Checks [`decode_model`] against prost on any bytes, handed over in pieces of at most
/// `piece` bytes (as a shard's chunks): both accept or both refuse, and when both accept,
/// the model apart from its initializers is prost's, and each initializer is, in order,
/// prost's `TensorProto` or (for raw data loaded here) a tensor holding exactly the bytes,
/// type and shape tract makes of that `TensorProto`. Panics on any difference. For the
/// property tests and the `onnx_model` fuzz target.
///
/// One difference is allowed: prost stops nesting at 100 levels, and this decoder, which
/// cannot enter prost's recursion counter for the graph and initializer levels it walks
/// itself, at 102; a model prost refuses only for its nesting may decode here.
#[cfg(any(test, fuzzing))]
pub fn assert_decodes_as_prost(bytes: &[u8], piece: usize) {
    let reference = pb::ModelProto::decode(bytes);
    let decoded = decode_model(&mut Pieces {
        bytes,
        piece: piece.max(1),
    });
    let (mut reference, (model, initializers)) = match (reference, decoded) {
        (Ok(reference), Ok(decoded)) => (reference, decoded),
        (Err(_), Err(_)) => return,
        (Err(refused), Ok(_)) if refused.to_string().contains("recursion limit") => return,
        (reference, decoded) => panic!(
            "prost {} the model, decode_model {}",
            if reference.is_ok() {
                "accepts"
            } else {
                "refuses"
            },
            if decoded.is_ok() {
                "accepts"
            } else {
                "refuses"
            },
        ),
    };
    let expected = reference
        .graph
        .as_mut()
        .map(|graph| std::mem::take(&mut graph.initializer))
        .unwrap_or_default();
    assert_same(&model, &reference, "the model apart from its initializers");
    assert_eq!(initializers.len(), expected.len(), "initializer count");
    for (ours, theirs) in initializers.into_iter().zip(expected) {
        match ours {
            Initializer::Proto(proto) => assert_same(&proto, &theirs, "an initializer"),
            Initializer::Loaded { name, value } => {
                assert_eq!(name, theirs.name);
                let onnx = tract_onnx::onnx();
                let tracts = tract_onnx::tensor::load_tensor(&*onnx.provider, &theirs, None)
                    .expect("tract loads what decode_model loaded");
                // Bytes, not values: NaN is not equal to itself.
                assert_eq!(
                    (value.datum_type(), value.shape(), value.as_bytes()),
                    (tracts.datum_type(), tracts.shape(), tracts.as_bytes()),
                    "initializer {name}"
                );
            }
        }
    }
}

/// Panics unless `ours` and `theirs` encode to the same bytes: equal messages, with a NaN
/// (in typed values or attributes) equal to the same NaN, which `PartialEq` denies.
#[cfg(any(test, fuzzing))]
fn assert_same<M: Message + std::fmt::Debug>(ours: &M, theirs: &M, what: &str) {
    assert!(
        ours.encode_to_vec() == theirs.encode_to_vec(),
        "{what} differs: {ours:?} against prost's {theirs:?}"
    );
}

/// A `Buf` over `bytes` cut into pieces of at most `piece` bytes, as a shard's chunks.
#[cfg(any(test, fuzzing))]
struct Pieces<'a> {
    bytes: &'a [u8],
    piece: usize,
}

#[cfg(any(test, fuzzing))]
impl Buf for Pieces<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len()
    }
    fn chunk(&self) -> &[u8] {
        &self.bytes[..self.bytes.len().min(self.piece)]
    }
    fn advance(&mut self, count: usize) {
        self.bytes = &self.bytes[count..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::pb::tensor_proto::DataType;

    fn tensor(name: &str, data_type: DataType, dims: &[i64], raw: Vec<u8>) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: data_type as i32,
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        }
    }

    fn model(initializers: Vec<pb::TensorProto>) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 8,
            producer_name: "test".into(),
            graph: Some(pb::GraphProto {
                name: "g".into(),
                initializer: initializers,
                node: vec![pb::NodeProto {
                    op_type: "Relu".into(),
                    input: vec!["x".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Each initializer's name and what tract makes of it (or why it cannot).
    type Weights = Vec<(String, Result<Tensor, String>)>;

    fn tract_load(proto: &pb::TensorProto) -> Result<Tensor, String> {
        let onnx = tract_onnx::onnx();
        tract_onnx::tensor::load_tensor(&*onnx.provider, proto, None).map_err(|e| e.to_string())
    }

    /// What tract makes of the same bytes through prost and `load_tensor`.
    fn tract_reference(bytes: &[u8]) -> (pb::ModelProto, Weights) {
        let mut model = pb::ModelProto::decode(bytes).unwrap();
        let graph = model.graph.as_mut().unwrap();
        let weights = std::mem::take(&mut graph.initializer)
            .iter()
            .map(|t| (t.name.clone(), tract_load(t)))
            .collect();
        (model, weights)
    }

    fn ours(initializers: Vec<Initializer>) -> Weights {
        initializers
            .into_iter()
            .map(|init| match init {
                Initializer::Loaded { name, value } => (name, Ok(value)),
                Initializer::Proto(t) => {
                    let value = tract_load(&t);
                    (t.name, value)
                }
            })
            .collect()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Decodes `bytes` handed over in pieces of at most `piece` bytes, checks that the model
    /// and every weight are what prost and tract make of the same bytes, and returns the
    /// weights with whether each came back as a tract tensor (the rest left to tract).
    fn decode_alike(bytes: &[u8], piece: usize) -> (Weights, Vec<bool>) {
        let (reference_model, reference) = tract_reference(bytes);
        let (decoded, initializers) = decode_model(&mut Pieces { bytes, piece }).unwrap();
        assert_eq!(decoded, reference_model);
        let loaded = initializers
            .iter()
            .map(|i| matches!(i, Initializer::Loaded { .. }))
            .collect();
        let weights = ours(initializers);
        assert_eq!(weights, reference);
        (weights, loaded)
    }

    #[test]
    fn plain_raw_data_lands_in_a_tract_tensor_equal_to_tracts_own() {
        let weights = vec![
            tensor(
                "w",
                DataType::Float,
                &[2, 3],
                f32_bytes(&[1., -2., 3., 4.5, 5., 6.]),
            ),
            tensor(
                "i",
                DataType::Int64,
                &[2],
                [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            tensor("h", DataType::Float16, &[1], vec![0x00, 0x3c]),
            tensor("s", DataType::Float, &[], f32_bytes(&[0.25])),
        ];
        let bytes = model(weights).encode_to_vec();
        let (_, loaded) = decode_alike(&bytes, bytes.len());
        assert!(loaded.iter().all(|&l| l), "{loaded:?}");
    }

    #[test]
    fn what_tract_reads_another_way_is_left_to_tract() {
        let mut typed = tensor("typed", DataType::Float, &[2], vec![]);
        typed.float_data = vec![1.0, 2.0];
        let weights = vec![
            typed,
            tensor("bool", DataType::Bool, &[2], vec![1, 0]),
            tensor("short", DataType::Float, &[3], f32_bytes(&[1.0, 2.0])),
            tensor("empty", DataType::Float, &[0], vec![]),
            tensor("negative", DataType::Float, &[-1], f32_bytes(&[1.0])),
        ];
        let bytes = model(weights).encode_to_vec();
        let (_, loaded) = decode_alike(&bytes, bytes.len());
        assert!(loaded.iter().all(|&l| !l), "{loaded:?}");
    }

    /// Appends one field of a `TensorProto` by hand: `dims` after `raw_data`, which prost
    /// never writes but the format allows.
    #[test]
    fn dims_given_after_the_data_are_honoured() {
        let first = tensor("w", DataType::Float, &[4], f32_bytes(&[1., 2., 3., 4.]));
        // Declared [4] before the data; a second dims entry after it makes the shape [4, 1].
        let mut tensor_bytes = first.encode_to_vec();
        prost::encoding::int64::encode_packed(1, &[1], &mut tensor_bytes);
        let mut graph = Vec::new();
        prost::encoding::encode_key(GRAPH_INITIALIZER, WireType::LengthDelimited, &mut graph);
        prost::encoding::encode_varint(tensor_bytes.len() as u64, &mut graph);
        graph.extend_from_slice(&tensor_bytes);
        let mut bytes = Vec::new();
        prost::encoding::encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut bytes);
        prost::encoding::encode_varint(graph.len() as u64, &mut bytes);
        bytes.extend_from_slice(&graph);

        let (weights, _) = decode_alike(&bytes, bytes.len());
        assert_eq!(weights[0].1.as_ref().unwrap().shape(), &[4, 1]);
    }

    #[test]
    fn truncated_and_malformed_models_are_refused() {
        let bytes = model(vec![tensor(
            "w",
            DataType::Float,
            &[2],
            f32_bytes(&[1., 2.]),
        )])
        .encode_to_vec();
        for cut in 1..bytes.len() {
            let prost_says = pb::ModelProto::decode(&bytes[..cut]).is_ok();
            let we_say = decode_model(&mut &bytes[..cut]).is_ok();
            assert_eq!(we_say, prost_says, "cut at {cut}");
        }
        // The graph field with the wrong wire type.
        let mut wrong = Vec::new();
        prost::encoding::encode_key(MODEL_GRAPH, WireType::Varint, &mut wrong);
        prost::encoding::encode_varint(1, &mut wrong);
        assert!(pb::ModelProto::decode(&wrong[..]).is_err());
        assert!(decode_model(&mut &wrong[..]).is_err());
    }

    /// A model holding every kind of initializer the decoder tells apart (raw data loaded
    /// here, typed values, `Bool`, data shorter than its shape) and a node with attributes.
    fn every_kind_of_initializer() -> Vec<u8> {
        let mut typed = tensor("typed", DataType::Int64, &[2], vec![]);
        typed.int64_data = vec![3, -4];
        let mut model = model(vec![
            tensor(
                "w",
                DataType::Float,
                &[2, 2],
                f32_bytes(&[1., -2., 3., 0.5]),
            ),
            typed,
            tensor("bool", DataType::Bool, &[2], vec![1, 0]),
            tensor("short", DataType::Float, &[3], f32_bytes(&[1.0])),
            tensor("h", DataType::Float16, &[1], vec![0x00, 0x3c]),
        ]);
        if let Some(graph) = model.graph.as_mut() {
            graph.node[0].attribute.push(pb::AttributeProto {
                name: "alpha".into(),
                f: 0.5,
                ints: vec![1, 2],
                ..Default::default()
            });
        }
        model.encode_to_vec()
    }

    /// A model whose graph nests `depth` graphs, each in an attribute of a node of the one
    /// above (three messages per level).
    fn nested_graphs(depth: usize) -> Vec<u8> {
        let mut graph = pb::GraphProto::default();
        for _ in 0..depth {
            graph = pb::GraphProto {
                node: vec![pb::NodeProto {
                    attribute: vec![pb::AttributeProto {
                        name: "body".into(),
                        g: Some(graph),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
        }
        pb::ModelProto {
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Found by the `onnx_model` fuzz target: a NaN in typed values made the check itself
    /// fail, comparing messages with `PartialEq`.
    #[test]
    fn nan_in_typed_values_and_attributes_decodes_as_prost_decodes_it() {
        let mut typed = tensor("typed", DataType::Float, &[2], vec![]);
        typed.float_data = vec![f32::NAN, 1.0];
        let mut model = model(vec![
            typed,
            tensor("raw", DataType::Float, &[1], f32_bytes(&[f32::NAN])),
        ]);
        if let Some(graph) = model.graph.as_mut() {
            graph.node[0].attribute.push(pb::AttributeProto {
                name: "alpha".into(),
                f: f32::NAN,
                ..Default::default()
            });
        }
        let bytes = model.encode_to_vec();
        assert_decodes_as_prost(&bytes, 7);
        assert_decodes_as_prost(&bytes, bytes.len());
    }

    #[test]
    fn nesting_is_bounded_as_prost_bounds_it_give_or_take_two_levels() {
        let refused_by_prost =
            (20..40).find(|&depth| pb::ModelProto::decode(&nested_graphs(depth)[..]).is_err());
        let refused_by_prost = refused_by_prost.expect("prost bounds nesting");
        for depth in refused_by_prost - 3..=refused_by_prost + 1 {
            assert_decodes_as_prost(&nested_graphs(depth), 5);
        }
        // Two levels deeper than prost's limit is refused here too.
        let deep = nested_graphs(refused_by_prost + 1);
        assert!(decode_model(&mut &deep[..]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Byte overwrites, insertions and deletions anywhere in a valid model: whatever
        /// they make of it, `decode_model` accepts and refuses as prost does, and what it
        /// accepts is what prost and tract make of the same bytes.
        #[test]
        fn damaged_models_decode_as_prost_decodes_them(
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
            piece in 1usize..64,
        ) {
            let mut bytes = every_kind_of_initializer();
            for (at, kind, byte) in edits {
                let at = at.index(bytes.len() + 1);
                match kind {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            assert_decodes_as_prost(&bytes, piece);
        }

        #[test]
        fn arbitrary_bytes_decode_as_prost_decodes_them(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            piece in 1usize..64,
        ) {
            assert_decodes_as_prost(&bytes, piece);
        }
    }

    proptest! {
        #[test]
        fn any_split_into_chunks_decodes_as_prost_and_tract_do(
            values in prop::collection::vec(-1e6f32..1e6, 0..64),
            extra in prop::collection::vec(any::<i32>(), 0..8),
            piece in 1usize..40,
        ) {
            let mut typed = tensor("typed", DataType::Int32, &[extra.len() as i64], vec![]);
            typed.int32_data = extra;
            let weights = vec![
                tensor("a", DataType::Float, &[values.len() as i64], f32_bytes(&values)),
                typed,
                tensor("b", DataType::Float, &[1, values.len() as i64], f32_bytes(&values)),
            ];
            let bytes = model(weights).encode_to_vec();
            decode_alike(&bytes, piece);
        }
    }
}
