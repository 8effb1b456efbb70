//! The gRPC contract between control and the engines, generated from `proto/trireme.proto`.
//! Conversions to and from domain types live with the servers that own those types.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("trireme.v1");
}

pub use v1::*;
