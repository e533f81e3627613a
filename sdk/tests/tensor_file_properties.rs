//! A data owner's tensor files (`.npy` and JSON) are untrusted bytes: whatever they hold,
//! the readers answer a tensor or `Error::BadTensorFile`, never a panic or a huge
//! allocation; every tensor round-trips exactly through both forms; and a header or shape
//! that lies about the data is refused.

use proptest::prelude::*;
use shardseal_sdk::tensor_file::{read_json, read_npy, write_json, write_npy};
use shardseal_sdk::{DType, Error, HostTensor};

fn tensor() -> impl Strategy<Value = HostTensor> {
    (
        prop::sample::select(DType::ALL.to_vec()),
        prop::collection::vec(0usize..5, 0..4),
        any::<u64>(),
    )
        .prop_map(|(dtype, shape, seed)| {
            let n: usize = shape.iter().product();
            let mut state = seed | 1;
            let mut data = Vec::with_capacity(n * dtype.size());
            for _ in 0..n * dtype.size() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(state as u8);
            }
            HostTensor::new("t", dtype, shape, data).unwrap()
        })
}

/// Equal values, with every NaN equal to every NaN (JSON has one NaN; its payload is lost).
fn same_values(a: &HostTensor, b: &HostTensor) -> bool {
    if (a.name(), a.dtype(), a.shape()) != (b.name(), b.dtype(), b.shape()) {
        return false;
    }
    match a.dtype() {
        DType::F32 => a
            .to_f32()
            .unwrap()
            .iter()
            .zip(b.to_f32().unwrap())
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())),
        DType::F64 => a
            .data()
            .chunks_exact(8)
            .zip(b.data().chunks_exact(8))
            .all(|(x, y)| {
                let (x, y) = (
                    f64::from_le_bytes(x.try_into().unwrap()),
                    f64::from_le_bytes(y.try_into().unwrap()),
                );
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            }),
        _ => a.data() == b.data(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_tensor_round_trips_through_npy_bit_for_bit(t in tensor()) {
        prop_assert_eq!(read_npy("t", &write_npy(&t)).unwrap(), t);
    }

    #[test]
    fn every_tensor_round_trips_through_json(t in tensor()) {
        let back = read_json(write_json(std::slice::from_ref(&t)).as_bytes()).unwrap();
        prop_assert_eq!(back.len(), 1);
        prop_assert!(same_values(&back[0], &t), "{:?} changed through JSON", t);
    }

    #[test]
    fn arbitrary_bytes_give_a_tensor_or_bad_tensor_file(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        for result in [read_npy("x", &bytes).map(|_| ()), read_json(&bytes).map(|_| ())] {
            prop_assert!(matches!(result, Ok(()) | Err(Error::BadTensorFile(_))));
        }
    }

    #[test]
    fn any_cut_of_an_npy_file_is_refused(t in tensor(), cut in any::<usize>()) {
        let file = write_npy(&t);
        let keep = cut % file.len();
        prop_assert!(matches!(read_npy("t", &file[..keep]), Err(Error::BadTensorFile(_))));
    }

    #[test]
    fn npy_headers_that_lie_about_the_data_are_refused(
        t in tensor(),
        dims in prop::collection::vec(0u64..1 << 40, 0..4),
    ) {
        let file = write_npy(&t);
        // magic (6) + version (2) + header length (2), then the header text.
        let text = std::str::from_utf8(&file[10..file.len() - t.data().len()]).unwrap();
        let declared: Vec<String> = dims.iter().map(u64::to_string).collect();
        let shape = match declared.len() {
            1 => format!("({},)", declared[0]),
            _ => format!("({})", declared.join(", ")),
        };
        let start = text.find("'shape': ").unwrap() + "'shape': ".len();
        let end = start + text[start..].find(')').unwrap() + 1;
        let lie = format!("{}{shape}{}", &text[..start], &text[end..]);
        let mut bytes = file[..8].to_vec();
        bytes.extend_from_slice(&u16::try_from(lie.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(lie.as_bytes());
        bytes.extend_from_slice(t.data());
        let declared_len = dims
            .iter()
            .try_fold(t.dtype().size() as u64, |acc, &d| acc.checked_mul(d));
        match read_npy("t", &bytes) {
            Ok(back) => prop_assert_eq!(declared_len, Some(t.data().len() as u64), "{:?}", back),
            Err(Error::BadTensorFile(_)) => {
                prop_assert_ne!(declared_len, Some(t.data().len() as u64))
            }
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn json_shapes_that_lie_about_the_values_are_refused(
        dims in prop::collection::vec(0u64..1 << 33, 0..4),
        values in prop::collection::vec(-10i64..10, 0..20),
    ) {
        let text = serde_json::json!({
            "tensors": [{"name": "x", "dtype": "i64", "shape": dims, "data": values}]
        })
        .to_string();
        let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        match read_json(text.as_bytes()) {
            Ok(t) => {
                prop_assert_eq!(count, Some(values.len() as u64));
                prop_assert_eq!(t[0].shape().len(), dims.len());
            }
            Err(Error::BadTensorFile(_)) => prop_assert_ne!(count, Some(values.len() as u64)),
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }
}

#[test]
fn i64_values_beyond_2_pow_53_survive_json() {
    let values = [i64::MAX, i64::MIN, (1 << 53) + 1, -(1 << 53) - 1];
    let t = HostTensor::new(
        "ids",
        DType::I64,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap();
    let back = read_json(write_json(std::slice::from_ref(&t)).as_bytes()).unwrap();
    assert_eq!(back[0], t);
}
