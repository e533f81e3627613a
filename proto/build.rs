//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler), so a
//! fresh machine needs no `protoc`.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect(root, &mut files)?;
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [root])?;
    // Sealed payloads (activations, model inputs and outputs: up to hundreds of MiB) decode
    // as slices of the received buffer instead of copies, and the coordinator relays them
    // to the next hop (and keeps them for a retry) without copying them again.
    // A tensor's values are read out of an opened bundle in place (one copy, into the
    // tensor) instead of through an intermediate copy.
    tonic_prost_build::configure()
        .bytes(".shardseal.v1.Sealed")
        .bytes(".shardseal.v1.Tensor.data")
        .compile_fds(descriptors)?;
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
