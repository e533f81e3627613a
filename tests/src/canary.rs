//! Plaintext canaries: models and inputs full of a recognisable byte pattern, and a reader
//! of another process's memory, to check that nothing outside the functions ever holds
//! them (what an honest-but-curious host, or a core dump, would see).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The weight canary: every initializer of a canary model holds it
/// ([`fill_f32_initializers`]). An `f32` whose bytes occur nowhere by chance.
pub const WEIGHT: f32 = 1234.5677;
/// The input canary: every element of a canary input.
pub const INPUT: f32 = -7654.3213;

/// Whether `bytes` hold `value` four times in a row, as a tensor or initializer full of it
/// would in any copy: the trace a canary leaves.
pub fn holds(bytes: &[u8], value: f32) -> bool {
    let pattern = value.to_le_bytes().repeat(4);
    bytes.windows(pattern.len()).any(|w| w == pattern)
}

/// Every readable, non-file-backed region of `pid`'s memory (heap, stacks, anonymous
/// mappings), concatenated. Needs the right to ptrace the process (same user and a
/// dumpable process, or root).
pub fn read_process_memory(pid: u32) -> io::Result<Vec<u8>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let _offset = fields.next();
        let _device = fields.next();
        let inode = fields.next().unwrap_or("0");
        let path = fields.next().unwrap_or("");
        // Anonymous memory and the heap/stack: where data lives. Mapped files are on disk
        // and scanned as files.
        if !perms.starts_with('r')
            || (inode != "0" && !path.starts_with('['))
            || path == "[vvar]"
            || path == "[vsyscall]"
        {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_ok() {
            out.extend_from_slice(&buf);
        }
    }
    Ok(out)
}

/// `model` (ONNX bytes) with every f32 initializer set to `value`: a weight canary.
pub fn fill_f32_initializers(model: &[u8], value: f32) -> Vec<u8> {
    use prost::Message;
    use tract_onnx::pb;
    let mut proto = pb::ModelProto::decode(model).expect("an ONNX model");
    let graph = proto.graph.as_mut().expect("a graph");
    for init in &mut graph.initializer {
        if init.data_type == pb::tensor_proto::DataType::Float as i32 {
            let count: i64 = init.dims.iter().product();
            init.float_data.clear();
            init.raw_data = std::iter::repeat_n(value.to_le_bytes(), count as usize)
                .flatten()
                .collect();
        }
    }
    proto.encode_to_vec()
}
