//! Compiles `asyncore/v1/control.proto` with protox (pure Rust), so building
//! needs no system `protoc`.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "asyncore/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");

    let mut compiler = protox::Compiler::new(["."])?;
    // Imports are included so that reflection can answer for
    // google/protobuf/timestamp.proto; source info carries the comments
    // above into `grpcurl describe` and into the HTTP API's OpenAPI
    // document.
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(proto)?;
    let descriptor_set = compiler.file_descriptor_set();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("asyncore_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    // Type names (`prost::Name`) let the JSON mapping find each message's
    // descriptor in the set above.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(descriptor_set, config)?;
    Ok(())
}
