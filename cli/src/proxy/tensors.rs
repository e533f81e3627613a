//! Open Inference Protocol tensors to and from ShardSeal tensors, checked against the
//! verified pipeline manifest, and SDK errors to gRPC statuses.
//!
//! A request's claims (datatype, shape, element count, byte length) are checked before a
//! [`HostTensor`] exists; every refusal is `INVALID_ARGUMENT` with a message naming the
//! tensor. Plaintext taken out of a request is wiped once it has been copied or refused.

use std::collections::HashSet;

use shardseal_keys::TensorSpec;
use shardseal_proto::oip::infer_parameter::ParameterChoice;
use shardseal_proto::oip::model_infer_request::InferRequestedOutputTensor;
use shardseal_proto::oip::model_infer_response::InferOutputTensor;
use shardseal_proto::oip::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use shardseal_proto::tensor::{DType, HostTensor, byte_len};
use shardseal_sdk::Error;
use tonic::Status;
use zeroize::{Zeroize, Zeroizing};

/// The protocol's name of an element type.
pub(super) fn datatype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::I64 => "INT64",
        DType::I32 => "INT32",
        DType::U8 => "UINT8",
    }
}

/// The element type of a protocol datatype, if ShardSeal carries it.
fn dtype_of(datatype: &str) -> Option<DType> {
    DType::ALL
        .into_iter()
        .find(|&d| datatype_name(d) == datatype)
}

/// How the response carries output values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutputForm {
    /// `raw_output_contents`: what tritonclient reads, and the default.
    Raw,
    /// Typed `contents` fields.
    Typed,
}

impl OutputForm {
    /// Answers in the form the client used for its inputs (typed contents in, typed
    /// contents out), unless a requested output says `binary_data: false` (typed) or
    /// `binary_data: true` (raw), the parameter Triton's clients use for this choice.
    pub(super) fn asked_by(request: &ModelInferRequest) -> Self {
        let binary_data = request.outputs.iter().find_map(|o| {
            match o.parameters.get("binary_data")?.parameter_choice {
                Some(ParameterChoice::BoolParam(raw)) => Some(raw),
                _ => None,
            }
        });
        match binary_data {
            Some(true) => Self::Raw,
            Some(false) => Self::Typed,
            None if request.raw_input_contents.is_empty() && !request.inputs.is_empty() => {
                Self::Typed
            }
            None => Self::Raw,
        }
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// Refuses a request for an output the model does not have, before anything runs.
pub(super) fn check_requested_outputs(
    requested: &[InferRequestedOutputTensor],
    outputs: &[TensorSpec],
) -> Result<(), Status> {
    for wanted in requested {
        if outputs.iter().all(|o| o.name != wanted.name) {
            return Err(invalid(format!(
                "the model has no output {:?} (it has {})",
                wanted.name,
                names(outputs)
            )));
        }
    }
    Ok(())
}

fn names(specs: &[TensorSpec]) -> String {
    let quoted: Vec<String> = specs.iter().map(|s| format!("{:?}", s.name)).collect();
    quoted.join(", ")
}

fn describe(dtype: DType, shape: &[u64]) -> String {
    format!("{} {shape:?}", datatype_name(dtype))
}

/// Turns the request's inputs into tensors matching the manifest's `specs` exactly.
/// Raw input bytes are moved out of `request` (not copied); typed contents are wiped
/// from it after conversion.
pub(super) fn inputs_from_request(
    request: &mut ModelInferRequest,
    specs: &[TensorSpec],
) -> Result<Vec<HostTensor>, Status> {
    // Each raw buffer is wrapped at once, so whatever is not used is wiped on return.
    let mut raw: Vec<Zeroizing<Vec<u8>>> = std::mem::take(&mut request.raw_input_contents)
        .into_iter()
        .map(Zeroizing::new)
        .collect();
    let result = convert_inputs(request, &mut raw, specs);
    for input in &mut request.inputs {
        if let Some(contents) = &mut input.contents {
            wipe(contents);
        }
    }
    result
}

fn convert_inputs(
    request: &mut ModelInferRequest,
    raw: &mut [Zeroizing<Vec<u8>>],
    specs: &[TensorSpec],
) -> Result<Vec<HostTensor>, Status> {
    let use_raw = !raw.is_empty();
    if use_raw && raw.len() != request.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(request.inputs.len());
    for (index, input) in request.inputs.iter_mut().enumerate() {
        let name = input.name.clone();
        let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| {
            invalid(format!(
                "the model has no input {name:?} (it takes {})",
                names(specs)
            ))
        })?;
        if !seen.insert(name.clone()) {
            return Err(invalid(format!("input {name:?} appears twice")));
        }
        let expected = describe(spec.dtype, &spec.shape);
        let dtype = dtype_of(&input.datatype).ok_or_else(|| {
            invalid(format!(
                "input {name:?}: datatype {:?} is not supported here; the model expects {expected}",
                input.datatype
            ))
        })?;
        let shape_matches = input.shape.len() == spec.shape.len()
            && input
                .shape
                .iter()
                .zip(&spec.shape)
                .all(|(&got, &want)| u64::try_from(got) == Ok(want));
        if dtype != spec.dtype || !shape_matches {
            return Err(invalid(format!(
                "input {name:?} must be {expected}, got {} {:?}",
                input.datatype, input.shape
            )));
        }
        let shape: Vec<usize> = spec
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| invalid(format!("input {name:?}: shape {expected} is too large")))?;
        let needed = byte_len(dtype, &shape)
            .ok_or_else(|| invalid(format!("input {name:?}: shape {expected} is too large")))?;
        let bytes = if use_raw {
            if input.contents.is_some() {
                return Err(invalid(format!(
                    "input {name:?} has typed contents although raw_input_contents is used"
                )));
            }
            std::mem::take(&mut *raw[index])
        } else {
            let contents = input.contents.as_ref().ok_or_else(|| {
                invalid(format!(
                    "input {name:?} has no values (give contents or raw_input_contents)"
                ))
            })?;
            typed_to_bytes(&name, dtype, contents)?
        };
        if bytes.len() != needed {
            let bytes = Zeroizing::new(bytes);
            return Err(invalid(format!(
                "input {name:?}: {expected} needs {needed} bytes, got {}",
                bytes.len()
            )));
        }
        let tensor = HostTensor::new(name.clone(), dtype, shape, bytes)
            .map_err(|e| invalid(format!("input {name:?}: {e}")))?;
        tensors.push(tensor);
    }
    if let Some(missing) = specs.iter().find(|s| !seen.contains(&s.name)) {
        return Err(invalid(format!(
            "missing input {:?} ({})",
            missing.name,
            describe(missing.dtype, &missing.shape)
        )));
    }
    Ok(tensors)
}

/// The little-endian bytes of typed contents: only the field of `dtype` may hold values.
fn typed_to_bytes(
    name: &str,
    dtype: DType,
    contents: &InferTensorContents,
) -> Result<Vec<u8>, Status> {
    let (field, count) = match dtype {
        DType::F32 => ("fp32_contents", contents.fp32_contents.len()),
        DType::F64 => ("fp64_contents", contents.fp64_contents.len()),
        DType::I64 => ("int64_contents", contents.int64_contents.len()),
        DType::I32 => ("int_contents", contents.int_contents.len()),
        DType::U8 => ("uint_contents", contents.uint_contents.len()),
    };
    let all = contents.bool_contents.len()
        + contents.int_contents.len()
        + contents.int64_contents.len()
        + contents.uint_contents.len()
        + contents.uint64_contents.len()
        + contents.fp32_contents.len()
        + contents.fp64_contents.len()
        + contents.bytes_contents.len();
    if all != count {
        return Err(invalid(format!(
            "input {name:?}: {} values belong in {field} only",
            datatype_name(dtype)
        )));
    }
    let mut out = Vec::with_capacity(count * dtype.size());
    match dtype {
        DType::F32 => contents
            .fp32_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => contents
            .fp64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I64 => contents
            .int64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::I32 => contents
            .int_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::U8 => {
            for &v in &contents.uint_contents {
                match u8::try_from(v) {
                    Ok(byte) => out.push(byte),
                    Err(_) => {
                        out.zeroize();
                        return Err(invalid(format!(
                            "input {name:?}: {v} is out of range for UINT8"
                        )));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn wipe(contents: &mut InferTensorContents) {
    contents.bool_contents.zeroize();
    contents.int_contents.zeroize();
    contents.int64_contents.zeroize();
    contents.uint_contents.zeroize();
    contents.uint64_contents.zeroize();
    contents.fp32_contents.zeroize();
    contents.fp64_contents.zeroize();
    contents.bytes_contents.zeroize();
}

/// The response to `request`: the outputs it asked for (all of them, in the manifest's
/// order, when it named none), in `form`.
pub(super) fn infer_response(
    request: &ModelInferRequest,
    model_version: String,
    outputs: Vec<HostTensor>,
    form: OutputForm,
) -> Result<ModelInferResponse, Status> {
    let selected: Vec<&HostTensor> = if request.outputs.is_empty() {
        outputs.iter().collect()
    } else {
        request
            .outputs
            .iter()
            .map(|wanted| {
                outputs
                    .iter()
                    .find(|t| t.name() == wanted.name)
                    .ok_or_else(|| {
                        tracing::warn!(output = %wanted.name, "the pipeline did not return a manifest output");
                        Status::internal("the pipeline's outputs do not match its manifest")
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let mut response = ModelInferResponse {
        model_name: request.model_name.clone(),
        model_version,
        id: request.id.clone(),
        ..Default::default()
    };
    for tensor in selected {
        let contents = match form {
            OutputForm::Raw => {
                response.raw_output_contents.push(tensor.data().to_vec());
                None
            }
            OutputForm::Typed => Some(typed_contents(tensor)),
        };
        response.outputs.push(InferOutputTensor {
            name: tensor.name().to_owned(),
            datatype: datatype_name(tensor.dtype()).into(),
            shape: tensor
                .shape()
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
            parameters: Default::default(),
            contents,
        });
    }
    Ok(response)
}

fn typed_contents(tensor: &HostTensor) -> InferTensorContents {
    let data = tensor.data();
    let mut contents = InferTensorContents::default();
    match tensor.dtype() {
        DType::F32 => {
            contents.fp32_contents = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
        DType::F64 => {
            contents.fp64_contents = data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
        }
        DType::I64 => {
            contents.int64_contents = data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
        }
        DType::I32 => {
            contents.int_contents = data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
        DType::U8 => contents.uint_contents = data.iter().map(|&b| u32::from(b)).collect(),
    }
    contents
}

/// The one place SDK errors become gRPC statuses. The client is the data owner on this
/// machine, so the SDK's messages (names, shapes, never values) go through, except for
/// internal failures, whose detail goes to the log.
pub(super) fn status_from_sdk(model: &str, error: Error) -> Status {
    match error {
        Error::BadInput(m) | Error::BadTensorFile(m) => Status::invalid_argument(m),
        Error::ModelUnknown(_) => Status::not_found(format!("model {model:?} is not served")),
        Error::Untrusted(m) => Status::permission_denied(format!(
            "the pipeline of model {model:?} is not trusted: {m}"
        )),
        Error::AttestationRefused(m) => Status::permission_denied(format!("refused: {m}")),
        Error::Deadline(m) => Status::deadline_exceeded(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Overloaded(m) => Status::resource_exhausted(m),
        other => {
            tracing::warn!(error = %other, "inference failed");
            Status::internal("internal error in the ShardSeal proxy (see its log)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardseal_proto::oip::InferParameter;
    use shardseal_proto::oip::model_infer_request::InferInputTensor;
    use tonic::Code;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("x", DType::F32, vec![1, 3]),
            TensorSpec::new("ids", DType::I64, vec![2]),
        ]
    }

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A valid raw request for `specs()`.
    fn raw_request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input("x", "FP32", &[1, 3]), input("ids", "INT64", &[2])],
            raw_input_contents: vec![
                f32_bytes(&[1.0, -2.5, 3.25]),
                [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ],
            ..Default::default()
        }
    }

    fn typed_request() -> ModelInferRequest {
        let mut x = input("x", "FP32", &[1, 3]);
        x.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0, -2.5, 3.25],
            ..Default::default()
        });
        let mut ids = input("ids", "INT64", &[2]);
        ids.contents = Some(InferTensorContents {
            int64_contents: vec![7, -9],
            ..Default::default()
        });
        ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![ids, x],
            ..Default::default()
        }
    }

    fn refusal(mut request: ModelInferRequest) -> Status {
        inputs_from_request(&mut request, &specs()).expect_err("request accepted")
    }

    fn assert_invalid(status: &Status, needles: &[&str]) {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        for needle in needles {
            assert!(
                status.message().contains(needle),
                "{:?} lacks {needle:?}",
                status.message()
            );
        }
    }

    #[test]
    fn raw_and_typed_contents_give_the_same_tensors() {
        let mut raw = raw_request();
        let from_raw = inputs_from_request(&mut raw, &specs()).unwrap();
        assert!(raw.raw_input_contents.is_empty(), "raw bytes moved out");
        let mut typed = typed_request();
        let mut from_typed = inputs_from_request(&mut typed, &specs()).unwrap();
        // Typed inputs came in another order; the tensors keep the request's order.
        from_typed.reverse();
        assert_eq!(from_raw, from_typed);
        assert_eq!(from_raw[0].to_f32().unwrap(), vec![1.0, -2.5, 3.25]);
        assert_eq!(from_raw[1].to_f64_lossy(), vec![7.0, -9.0]);
        assert_eq!(from_raw[1].shape(), &[2]);
        // The typed values were wiped from the request after conversion.
        let wiped = typed.inputs[1].contents.as_ref().unwrap();
        assert!(wiped.fp32_contents.is_empty());
    }

    #[test]
    fn unsupported_and_mismatched_datatypes_are_invalid_and_named() {
        let mut request = raw_request();
        request.inputs[0].datatype = "FP16".into();
        assert_invalid(&refusal(request), &["\"x\"", "FP16", "FP32 [1, 3]"]);

        let mut request = raw_request();
        request.inputs[1].datatype = "INT32".into();
        assert_invalid(
            &refusal(request),
            &["input \"ids\" must be INT64 [2], got INT32 [2]"],
        );
    }

    #[test]
    fn wrong_shapes_are_invalid() {
        let mut request = raw_request();
        request.inputs[0].shape = vec![3, 1];
        assert_invalid(&refusal(request), &["input \"x\" must be FP32 [1, 3]"]);
        let mut request = raw_request();
        request.inputs[0].shape = vec![-1, 3];
        assert_invalid(&refusal(request), &["\"x\"", "[-1, 3]"]);
    }

    #[test]
    fn a_wrong_byte_length_is_invalid_and_named() {
        let mut request = raw_request();
        request.raw_input_contents[0].pop();
        assert_invalid(
            &refusal(request),
            &["input \"x\": FP32 [1, 3] needs 12 bytes, got 11"],
        );
        let mut request = typed_request();
        request.inputs[1].contents.as_mut().unwrap().fp32_contents = vec![1.0, 2.0, 3.0, 4.0];
        assert_invalid(&refusal(request), &["\"x\"", "needs 12 bytes, got 16"]);
    }

    #[test]
    fn values_in_the_wrong_typed_field_are_invalid() {
        let mut request = typed_request();
        let ids = request.inputs[0].contents.as_mut().unwrap();
        ids.int_contents = std::mem::take(&mut ids.int64_contents)
            .into_iter()
            .map(|v| v as i32)
            .collect();
        assert_invalid(&refusal(request), &["\"ids\"", "int64_contents"]);
    }

    #[test]
    fn uint8_values_out_of_range_are_invalid() {
        let specs = vec![TensorSpec::new("pixels", DType::U8, vec![2])];
        let mut pixels = input("pixels", "UINT8", &[2]);
        pixels.contents = Some(InferTensorContents {
            uint_contents: vec![255, 256],
            ..Default::default()
        });
        let mut request = ModelInferRequest {
            inputs: vec![pixels.clone()],
            ..Default::default()
        };
        let status = inputs_from_request(&mut request, &specs).unwrap_err();
        assert_invalid(&status, &["\"pixels\"", "256"]);
        pixels.contents.as_mut().unwrap().uint_contents = vec![0, 255];
        let mut request = ModelInferRequest {
            inputs: vec![pixels],
            ..Default::default()
        };
        let tensors = inputs_from_request(&mut request, &specs).unwrap();
        assert_eq!(tensors[0].data(), &[0, 255]);
    }

    #[test]
    fn missing_extra_duplicate_and_mixed_inputs_are_invalid() {
        let mut request = raw_request();
        request.inputs.pop();
        request.raw_input_contents.pop();
        assert_invalid(&refusal(request), &["missing input \"ids\" (INT64 [2])"]);

        let mut request = raw_request();
        request.inputs[1].name = "mask".into();
        assert_invalid(&refusal(request), &["no input \"mask\"", "\"x\", \"ids\""]);

        let mut request = raw_request();
        request.inputs[1] = request.inputs[0].clone();
        request.raw_input_contents[1] = request.raw_input_contents[0].clone();
        assert_invalid(&refusal(request), &["input \"x\" appears twice"]);

        let mut request = raw_request();
        request.raw_input_contents.pop();
        assert_invalid(
            &refusal(request),
            &["raw_input_contents has 1 entries for 2"],
        );

        let mut request = raw_request();
        request.inputs[0].contents = Some(InferTensorContents::default());
        assert_invalid(&refusal(request), &["\"x\"", "raw_input_contents"]);

        let mut request = typed_request();
        request.inputs[0].contents = None;
        assert_invalid(&refusal(request), &["input \"ids\" has no values"]);
    }

    #[test]
    fn unknown_requested_outputs_are_invalid() {
        let outputs = vec![TensorSpec::new("y", DType::F32, vec![1])];
        let wanted = |name: &str| InferRequestedOutputTensor {
            name: name.into(),
            ..Default::default()
        };
        check_requested_outputs(&[wanted("y")], &outputs).unwrap();
        let status = check_requested_outputs(&[wanted("z")], &outputs).unwrap_err();
        assert_invalid(&status, &["no output \"z\" (it has \"y\")"]);
    }

    #[test]
    fn outputs_are_raw_or_typed_as_asked_and_filtered() {
        let y = HostTensor::from_f32("y", vec![2], &[0.5, -1.0]).unwrap();
        let n = HostTensor::new("n", DType::I32, vec![1], 42i32.to_le_bytes().to_vec()).unwrap();
        let raw = raw_request();
        assert_eq!(OutputForm::asked_by(&raw), OutputForm::Raw);
        let mut with_id = raw.clone();
        with_id.id = "req-1".into();
        let response = infer_response(
            &with_id,
            "3".into(),
            vec![y.clone(), n.clone()],
            OutputForm::Raw,
        )
        .unwrap();
        assert_eq!(response.id, "req-1");
        assert_eq!(response.model_version, "3");
        assert_eq!(response.outputs.len(), 2);
        assert_eq!(response.outputs[0].datatype, "FP32");
        assert_eq!(response.outputs[0].shape, vec![2]);
        assert!(response.outputs[0].contents.is_none());
        assert_eq!(response.raw_output_contents[0], f32_bytes(&[0.5, -1.0]));
        assert_eq!(response.raw_output_contents[1], 42i32.to_le_bytes());

        let typed = typed_request();
        assert_eq!(OutputForm::asked_by(&typed), OutputForm::Typed);
        let mut only_n = typed.clone();
        only_n.outputs = vec![InferRequestedOutputTensor {
            name: "n".into(),
            ..Default::default()
        }];
        let response =
            infer_response(&only_n, "1".into(), vec![y.clone(), n], OutputForm::Typed).unwrap();
        assert!(response.raw_output_contents.is_empty());
        assert_eq!(response.outputs.len(), 1);
        assert_eq!(response.outputs[0].name, "n");
        assert_eq!(response.outputs[0].datatype, "INT32");
        assert_eq!(
            response.outputs[0].contents.as_ref().unwrap().int_contents,
            vec![42]
        );

        // `binary_data` on a requested output overrides the input form.
        let mut asks_typed = raw_request();
        asks_typed.outputs = vec![InferRequestedOutputTensor {
            name: "y".into(),
            parameters: [(
                "binary_data".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::BoolParam(false)),
                },
            )]
            .into(),
        }];
        assert_eq!(OutputForm::asked_by(&asks_typed), OutputForm::Typed);
    }

    proptest::proptest! {
        /// Whatever a client claims, conversion either yields a tensor of exactly the
        /// manifest's dtype, shape and byte length, or refuses with INVALID_ARGUMENT.
        #[test]
        fn any_request_is_converted_exactly_or_refused_as_invalid(
            spec_dtype in proptest::sample::select(DType::ALL.to_vec()),
            spec_shape in proptest::collection::vec(0u64..4, 0..3),
            datatype in proptest::sample::select(
                vec!["FP32", "FP64", "INT64", "INT32", "UINT8", "FP16", "BYTES", ""]),
            shape in proptest::collection::vec(-1i64..4, 0..3),
            raw in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..80)),
            fp32 in proptest::collection::vec(proptest::num::f32::ANY, 0..16),
            uint in proptest::collection::vec(0u32..300, 0..16),
            int64 in proptest::collection::vec(proptest::num::i64::ANY, 0..16),
        ) {
            let specs = vec![TensorSpec::new("t", spec_dtype, spec_shape.clone())];
            let mut tensor = input("t", datatype, &shape);
            let mut request = ModelInferRequest::default();
            match raw {
                Some(bytes) => request.raw_input_contents = vec![bytes],
                None => {
                    tensor.contents = Some(InferTensorContents {
                        fp32_contents: fp32,
                        uint_contents: uint,
                        int64_contents: int64,
                        ..Default::default()
                    })
                }
            }
            request.inputs = vec![tensor];
            match inputs_from_request(&mut request, &specs) {
                Ok(tensors) => {
                    let shape: Vec<usize> = spec_shape.iter().map(|&d| d as usize).collect();
                    proptest::prop_assert_eq!(tensors[0].dtype(), spec_dtype);
                    proptest::prop_assert_eq!(tensors[0].shape(), shape.as_slice());
                    proptest::prop_assert_eq!(
                        tensors[0].data().len(),
                        byte_len(spec_dtype, &shape).unwrap()
                    );
                }
                Err(status) => proptest::prop_assert_eq!(status.code(), Code::InvalidArgument),
            }
        }
    }

    #[test]
    fn sdk_errors_map_to_their_statuses() {
        let cases = [
            (Error::BadInput("b".into()), Code::InvalidArgument),
            (Error::ModelUnknown("m".into()), Code::NotFound),
            (Error::Untrusted("u".into()), Code::PermissionDenied),
            (
                Error::AttestationRefused("a".into()),
                Code::PermissionDenied,
            ),
            (Error::Deadline("d".into()), Code::DeadlineExceeded),
            (Error::Unavailable("u".into()), Code::Unavailable),
            (Error::Overloaded("o".into()), Code::ResourceExhausted),
            (Error::Internal("secret cause".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let status = status_from_sdk("mlp", error);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(!status.message().contains("secret cause"));
        }
        assert_eq!(
            status_from_sdk("mlp", Error::ModelUnknown("x".into())).message(),
            "model \"mlp\" is not served"
        );
    }
}
