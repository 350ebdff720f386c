//! The asyncored control API, generated from `asyncore/v1/control.proto`.
//!
//! Only the daemon's gRPC and HTTP layers and the CLI use these types; the
//! engine never sees them. [`json`] is their proto3 JSON mapping, which the
//! HTTP API speaks.

#![forbid(unsafe_code)]
#![allow(unreachable_pub, missing_docs, clippy::all)]

pub mod json;

/// Package `asyncore.v1`.
pub mod v1 {
    tonic::include_proto!("asyncore.v1");
}

/// The encoded `FileDescriptorSet` of the API and its imports, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/asyncore_descriptor.bin"));

/// Converts a `SystemTime` into the protobuf timestamp the API uses.
pub fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}
