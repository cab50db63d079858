//! Generates the tonic/prost code for `tandem/v1/*.proto` with Debian's
//! `protoc` (or `$PROTOC`), plus the file descriptor set that server
//! reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "tandem/v1/generate.proto",
        "tandem/v1/kv_transfer.proto",
        "tandem/v1/worker.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tandem_v1_descriptor.bin"))
        // KV payloads are large: decode them as `Bytes` slices of the
        // receive buffer instead of copying into a fresh `Vec<u8>`.
        .bytes(".tandem.v1.KvBlock.payload")
        .compile_protos(&protos, &["."])?;
    Ok(())
}
