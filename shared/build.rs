//! Generates the gRPC code of `proto/pdsno/v1/pdsno.proto` (messages, client and server
//! traits, without a transport: the node picks one) and the file descriptor set served
//! by gRPC reflection. `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC`
//! names another one, so no system package is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("..").join("proto");
    let proto = proto_root.join("pdsno").join("v1").join("pdsno.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .file_descriptor_set_path(out.join("pdsno_descriptor.bin"))
        .compile_with_config(config, &[proto], &[proto_root])?;
    Ok(())
}
