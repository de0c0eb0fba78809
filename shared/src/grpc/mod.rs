//! Generated gRPC code (package `pdsno.v1`) and the exact mapping between its typed
//! messages and envelopes (see `proto/pdsno/v1/pdsno.proto` for the rule).

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("pdsno.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pdsno_descriptor");
}

mod convert;

pub use convert::{ConvertError, TypedMessage};
