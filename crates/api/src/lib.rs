//! The REST API's contract: the resources control serves under `/v1`, the request bodies it
//! accepts, the RFC 9457 problem document it answers errors with, and a typed [`Client`].
//!
//! Control derives its OpenAPI document from these types (utoipa), and the CLI, the CSI driver
//! and the tests talk to control through [`Client`], so the three can never disagree about a
//! field. Every resource has a `spec` (what was asked for, persisted) and a `status` (what was
//! last observed).

mod client;
mod model;
mod problem;

pub use client::{Client, ClientError, is_loopback, parse_address};
pub use model::*;
pub use problem::Problem;

/// The content type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";
