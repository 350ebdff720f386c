//! Compiles `asyncore/v1/control.proto` with protox (pure Rust), so building
//! needs no system `protoc`.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "asyncore/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");

    let mut compiler = protox::Compiler::new(["."])?;
    // Imports are included so that reflection can answer for
    // google/protobuf/timestamp.proto; source info carries the comments
    // above into `grpcurl describe`.
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(proto)?;
    let descriptor_set = compiler.file_descriptor_set();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("asyncore_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptor_set)?;
    Ok(())
}
