//! kafka-sidecar's transcoder: Kafka record batches (message format v2) straight to the
//! protobuf bytes of `kafkasidecar.v1.Record`, with aiokafka's consumer semantics, so records
//! never become Python objects. The Python package `kafka_sidecar_transcoder` wraps the
//! bindings (`python` feature) and holds a pure-Python implementation of the same API.
#![forbid(unsafe_code)]

pub mod codec;
pub mod kafka;
pub mod proto;

#[cfg(feature = "python")]
mod python;
