//! Per-node cost estimates in floating-point operations, from static shapes alone.
//!
//! The planner estimates rather than profiles: an estimate is deterministic (the same model
//! always gets the same plan, which the signed manifest depends on), needs no execution of the
//! model at plan time (the model owner may plan on a machine that cannot run it, and nothing
//! is leaked by timing it), and ranks stages correctly where it matters, because in the
//! models ShardSeal targets the convolutions and matrix products dominate by orders of
//! magnitude.

use tract_onnx::pb::NodeProto;

/// Estimated FLOPs of one node.
///
/// `inputs` and `outputs` hold the shape of each positional input and output (weights
/// included), `None` where the slot is empty or the shape is unknown.
///
/// - Conv, ConvTranspose, MatMul, Gemm and the recurrent layers: 2 × multiply-accumulates
///   (plus one add per output for a bias).
/// - Pools: one operation per window element per output.
/// - Shape-only operators (Shape, Reshape, Flatten, Squeeze, Unsqueeze, Identity, Constant):
///   zero, as they move no data in tract.
/// - Everything else (elementwise, normalisation, reductions, softmax, concat, ...): one
///   operation per element of its largest input or output.
pub(crate) fn node_flops(
    node: &NodeProto,
    inputs: &[Option<&[u64]>],
    outputs: &[Option<&[u64]>],
) -> u64 {
    let input = |i: usize| inputs.get(i).copied().flatten();
    let output_elements = outputs
        .first()
        .copied()
        .flatten()
        .map(elements)
        .unwrap_or(0);
    let has_input = |i: usize| input(i).is_some();
    match node.op_type.as_str() {
        "Conv" | "ConvInteger" | "QLinearConv" => {
            // Weights are [M, C/group, k...]: each output element reads C/group × k... of them.
            let weight = if node.op_type == "QLinearConv" { 3 } else { 1 };
            let per_output = input(weight)
                .map(|w| elements(w.get(1..).unwrap_or(&[])))
                .unwrap_or(0);
            let bias = if node.op_type == "Conv" && has_input(2) {
                output_elements
            } else {
                0
            };
            output_elements
                .saturating_mul(per_output)
                .saturating_mul(2)
                .saturating_add(bias)
        }
        "ConvTranspose" => {
            // Weights are [C, M/group, k...]: each input element scatters into M/group × k...
            let per_input = input(1)
                .map(|w| elements(w.get(1..).unwrap_or(&[])))
                .unwrap_or(0);
            let input_elements = input(0).map(elements).unwrap_or(0);
            let bias = if has_input(2) { output_elements } else { 0 };
            input_elements
                .saturating_mul(per_input)
                .saturating_mul(2)
                .saturating_add(bias)
        }
        "MatMul" | "MatMulInteger" | "QLinearMatMul" | "Gemm" => {
            let a = input(0).unwrap_or(&[]);
            let transposed = node.op_type == "Gemm" && int_attribute(node, "transA") == Some(1);
            let inner = match (node.op_type.as_str(), transposed) {
                ("Gemm", true) => a.first().copied(),
                ("Gemm", false) => a.get(1).copied(),
                _ => a.last().copied(),
            }
            .unwrap_or(0);
            let bias = if node.op_type == "Gemm" && has_input(2) {
                output_elements
            } else {
                0
            };
            output_elements
                .saturating_mul(inner)
                .saturating_mul(2)
                .saturating_add(bias)
        }
        "LSTM" | "GRU" | "RNN" => {
            // X is [seq, batch, input]; W and R hold every gate of every direction, so each
            // step and batch row multiplies through all of W and R once.
            let steps = input(0)
                .map(|x| elements(&x[..x.len().min(2)]))
                .unwrap_or(0);
            let weights = input(1)
                .map(elements)
                .unwrap_or(0)
                .saturating_add(input(2).map(elements).unwrap_or(0));
            steps.saturating_mul(weights).saturating_mul(2)
        }
        "MaxPool" | "AveragePool" | "LpPool" => {
            let window: u64 = node
                .attribute
                .iter()
                .find(|a| a.name == "kernel_shape")
                .map(|a| {
                    a.ints
                        .iter()
                        .map(|&k| u64::try_from(k).unwrap_or(1))
                        .product()
                })
                .unwrap_or(1);
            output_elements.saturating_mul(window)
        }
        "Shape" | "Size" | "Constant" | "Identity" | "Reshape" | "Flatten" | "Squeeze"
        | "Unsqueeze" => 0,
        _ => inputs
            .iter()
            .chain(outputs)
            .filter_map(|shape| shape.map(elements))
            .max()
            .unwrap_or(0),
    }
}

fn elements(shape: &[u64]) -> u64 {
    shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

fn int_attribute(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op_type: &str) -> NodeProto {
        NodeProto {
            op_type: op_type.into(),
            ..NodeProto::default()
        }
    }

    #[test]
    fn conv_counts_two_flops_per_multiply_accumulate_plus_bias() {
        // 1x3x8x8 -> 16 channels, 3x3 kernel: 16*8*8 outputs, each 3*3*3 MACs.
        let flops = node_flops(
            &node("Conv"),
            &[Some(&[1, 3, 8, 8]), Some(&[16, 3, 3, 3]), Some(&[16])],
            &[Some(&[1, 16, 8, 8])],
        );
        assert_eq!(flops, 2 * 1024 * 27 + 1024);
    }

    #[test]
    fn matmul_and_gemm_use_the_inner_dimension() {
        let matmul = node_flops(
            &node("MatMul"),
            &[Some(&[4, 32]), Some(&[32, 10])],
            &[Some(&[4, 10])],
        );
        assert_eq!(matmul, 2 * 40 * 32);
        let gemm = node_flops(
            &node("Gemm"),
            &[Some(&[4, 32]), Some(&[10, 32]), None],
            &[Some(&[4, 10])],
        );
        assert_eq!(gemm, 2 * 40 * 32);
    }

    #[test]
    fn elementwise_costs_one_per_element_and_reshape_nothing() {
        let add = node_flops(&node("Add"), &[Some(&[2, 5]), Some(&[5])], &[Some(&[2, 5])]);
        assert_eq!(add, 10);
        let reshape = node_flops(
            &node("Reshape"),
            &[Some(&[2, 5]), Some(&[2])],
            &[Some(&[10])],
        );
        assert_eq!(reshape, 0);
    }
}
