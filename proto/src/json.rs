//! The proto3 JSON mapping for omnibus messages, driven by the compiled descriptors: the
//! event bus's structured request form is "the JSON of the gRPC request message", and the
//! replies and the CLI's `--json` output use the same mapping, so there is one schema.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()));

#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the compiled descriptor set is unreadable: {0}")]
    Descriptors(String),
    #[error("unknown message type '{0}'")]
    UnknownType(String),
    #[error("invalid JSON for {message}: {reason}")]
    Invalid { message: String, reason: String },
    #[error("cannot convert {message}: {reason}")]
    Transcode { message: String, reason: String },
}

/// The descriptor of a message by its full name (e.g. `omnibus.db.v1.QueryRequest`).
pub fn message_descriptor(full_name: &str) -> Result<MessageDescriptor, JsonError> {
    let pool = POOL
        .as_ref()
        .map_err(|e| JsonError::Descriptors(e.clone()))?;
    pool.get_message_by_name(full_name)
        .ok_or_else(|| JsonError::UnknownType(full_name.to_string()))
}

/// Whether the gRPC path `/package.Service/Method` names a method of these protos, and if so
/// whether it streams requests and responses: `Some((client_streaming, server_streaming))`.
pub fn method_streaming(path: &str) -> Option<(bool, bool)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let pool = POOL.as_ref().ok()?;
    let method = pool
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    Some((method.is_client_streaming(), method.is_server_streaming()))
}

/// Parses proto3 JSON (either camelCase JSON names or the proto field names) into `T`, whose
/// full proto name is `full_name`. Unknown fields are an error, so typos are caught.
pub fn from_json<T: prost::Message + Default>(
    full_name: &str,
    json: &serde_json::Value,
) -> Result<T, JsonError> {
    let descriptor = message_descriptor(full_name)?;
    let dynamic =
        DynamicMessage::deserialize(descriptor, json).map_err(|e| JsonError::Invalid {
            message: full_name.to_string(),
            reason: e.to_string(),
        })?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| JsonError::Transcode {
            message: full_name.to_string(),
            reason: e.to_string(),
        })
}

/// [`to_json`] with every field written, default values included (`false`, `0`, `""`, empty
/// lists): for output people read field by field, where a missing `"nullable": false` would
/// look like an unknown.
pub fn to_json_with_defaults<T: prost::Message>(
    full_name: &str,
    message: &T,
    proto_names: bool,
) -> Result<serde_json::Value, JsonError> {
    serialize(
        full_name,
        message,
        SerializeOptions::new()
            .use_proto_field_name(proto_names)
            .skip_default_fields(false),
    )
}

/// Renders `message` as proto3 JSON. `proto_names` keeps the `.proto` field names
/// (snake_case) instead of the lowerCamelCase JSON names.
pub fn to_json<T: prost::Message>(
    full_name: &str,
    message: &T,
    proto_names: bool,
) -> Result<serde_json::Value, JsonError> {
    serialize(
        full_name,
        message,
        SerializeOptions::new().use_proto_field_name(proto_names),
    )
}

fn serialize<T: prost::Message>(
    full_name: &str,
    message: &T,
    options: SerializeOptions,
) -> Result<serde_json::Value, JsonError> {
    let descriptor = message_descriptor(full_name)?;
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic
        .transcode_from(message)
        .map_err(|e| JsonError::Transcode {
            message: full_name.to_string(),
            reason: e.to_string(),
        })?;
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| JsonError::Transcode {
            message: full_name.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_use_rfc3339() {
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        let j = to_json("google.protobuf.Timestamp", &ts, false).unwrap();
        assert_eq!(j, json!("2023-11-14T22:13:20Z"));
        let back: prost_types::Timestamp = from_json("google.protobuf.Timestamp", &j).unwrap();
        assert_eq!(back, ts);
    }

    #[test]
    fn unknown_types_and_bad_json_are_errors() {
        assert!(matches!(
            from_json::<prost_types::Timestamp>("no.such.Message", &json!({})),
            Err(JsonError::UnknownType(_))
        ));
        assert!(matches!(
            from_json::<prost_types::Timestamp>("google.protobuf.Timestamp", &json!("yesterday")),
            Err(JsonError::Invalid { .. })
        ));
    }
}
