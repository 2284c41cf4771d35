//! Generates the Weir API from proto/ with a vendored protoc, so a build needs no system protoc.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "weir/common/v1/common.proto",
    "weir/inference/v1/inference.proto",
    "weir/router/v1/router.proto",
    "weir/session/v1/session.proto",
    "weir/budget/v1/budget.proto",
    "weir/review/v1/review.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // protoc from crates.io, with the well-known types (google/protobuf/*.proto) beside it.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let includes = [proto_root.clone(), protoc_bin_vendored::include_path()?];

    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    tonic_prost_build::configure()
        // RPCs whose behaviour has not landed yet answer UNIMPLEMENTED instead of failing to build.
        .generate_default_stubs(true)
        // Encoded descriptors for gRPC reflection, so grpcurl works without the .proto files.
        .file_descriptor_set_path(out_dir.join("weir_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
