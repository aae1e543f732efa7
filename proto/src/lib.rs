//! The omnibus gRPC API contract: generated messages, clients and servers for
//! `omnibus.consumer.v1` and `omnibus.db.v1`, plus the encoded file descriptor set for
//! server reflection. The `.proto` files under `proto/omnibus/` are the source of truth.

/// Generated code for package `omnibus.consumer.v1`.
pub mod consumer {
    pub mod v1 {
        tonic::include_proto!("omnibus.consumer.v1");
    }
}

/// Generated code for package `omnibus.db.v1`.
pub mod db {
    pub mod v1 {
        tonic::include_proto!("omnibus.db.v1");
    }
}

pub mod json;
pub mod rows;
pub mod timestamp;

/// Encoded `FileDescriptorSet` of every omnibus proto file (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("omnibus_descriptor");

pub use json::method_streaming;

/// Fully-qualified gRPC service names, as used by health checks and reflection.
pub mod service_names {
    pub const CONSUMER: &str = "omnibus.consumer.v1.ConsumerService";
    pub const DATABASE: &str = "omnibus.db.v1.DatabaseService";
}
