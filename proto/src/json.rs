//! The proto3 JSON mapping of the API's messages, and JSON Schemas of them,
//! driven by the descriptor set the build compiled: so the gRPC API and the
//! HTTP/JSON API are described by one document, `control.proto`.
//!
//! The mapping is the canonical one (<https://protobuf.dev/programming-guides/json/>):
//! lowerCamelCase field names (either spelling is accepted on input),
//! 64-bit integers as decimal strings, enums by name, timestamps in RFC
//! 3339. Unlike the minimal form, every field without presence is written
//! even when it holds its default (`"nextPageToken": ""`, `"listenerIds":
//! []`), so a reply always has the same fields; a proto3 `optional` or a
//! message field appears only when set.
//!
//! It goes through [`prost_reflect`] rather than generated serde code: the
//! generated types keep `prost_types::Timestamp`, which the CLI uses, and
//! the JSON Schemas come from the same descriptors.

use std::{collections::BTreeSet, sync::OnceLock};

use prost::{Message, Name};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions,
};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

/// The descriptors of the API and its imports.
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET).expect("the descriptor set compiled at build time is valid")
    })
}

fn descriptor<M: Name>() -> MessageDescriptor {
    let name = M::full_name();
    descriptor_pool()
        .get_message_by_name(&name)
        .unwrap_or_else(|| panic!("{name} is generated from the same descriptor set"))
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new().skip_default_fields(false)
}

/// `message` in the proto3 JSON mapping.
pub fn to_json<M: Message + Name>(message: &M) -> Value {
    let mut dynamic = DynamicMessage::new(descriptor::<M>());
    dynamic.transcode_from(message).expect("a message decodes with its own descriptor");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .expect("a message has a JSON form")
}

/// A JSON request body (or query) that is not the message it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    message: String,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JsonError {}

/// Parses `json` as message `M` in the proto3 JSON mapping. Unknown fields
/// are refused, so that a misspelt field is not silently ignored.
///
/// # Errors
///
/// [`JsonError`] naming the message and, from the parser, the field, line
/// and column.
pub fn from_json<M: Message + Name + Default>(json: &[u8]) -> Result<M, JsonError> {
    let error = |e: &dyn std::fmt::Display| JsonError { message: format!("invalid {}: {e}", M::NAME) };
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let dynamic =
        DynamicMessage::deserialize_with_options(descriptor::<M>(), &mut deserializer, &DeserializeOptions::new())
            .map_err(|e| error(&e))?;
    deserializer.end().map_err(|e| error(&e))?;
    dynamic.transcode_to::<M>().map_err(|e| error(&e))
}

/// Builds message `M` from URL query parameters, as gRPC-gateway does:
/// each parameter names a scalar field (either spelling, `listener_id` or
/// `listenerId`); booleans are `true` or `false`, enums go by name, and a
/// repeated field takes the parameter repeatedly or comma-separated.
///
/// # Errors
///
/// [`JsonError`] naming the parameter: unknown, given twice, not of its
/// field's type, or a field that a query cannot set (a message, a map).
pub fn from_query<M: Message + Name + Default>(pairs: &[(String, String)]) -> Result<M, JsonError> {
    let message = descriptor::<M>();
    let error = |message: String| JsonError { message };
    let mut dynamic = DynamicMessage::new(message.clone());
    let mut given = BTreeSet::new();
    for (name, text) in pairs {
        let field =
            message.get_field_by_name(name).or_else(|| message.get_field_by_json_name(name)).ok_or_else(|| {
                let names: Vec<String> = message.fields().map(|f| f.name().to_string()).collect();
                error(format!("unknown query parameter {name:?}; this call takes {}", names.join(", ")))
            })?;
        if field.is_map() || matches!(field.kind(), Kind::Message(_)) {
            return Err(error(format!("query parameter {name:?} cannot be given in the query")));
        }
        if field.is_list() {
            let values = text
                .split(',')
                .map(|item| {
                    query_value(&field.kind(), item.trim()).map_err(|e| error(format!("query parameter {name}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut list = dynamic.get_field(&field).into_owned();
            if let prost_reflect::Value::List(items) = &mut list {
                items.extend(values);
            }
            dynamic.set_field(&field, list);
        } else {
            if !given.insert(field.number()) {
                return Err(error(format!("query parameter {name} is given twice")));
            }
            let value = query_value(&field.kind(), text).map_err(|e| error(format!("query parameter {name}: {e}")))?;
            dynamic.set_field(&field, value);
        }
    }
    dynamic.transcode_to::<M>().map_err(|e| error(format!("invalid {}: {e}", M::NAME)))
}

/// One scalar of a query parameter.
fn query_value(kind: &Kind, text: &str) -> Result<prost_reflect::Value, String> {
    use prost_reflect::Value;
    fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
        text.parse().map_err(|_| format!("{text:?} is not {what}"))
    }
    Ok(match kind {
        Kind::Double => Value::F64(number(text, "a number")?),
        Kind::Float => Value::F32(number(text, "a number")?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(number(text, "a 32-bit integer")?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(number(text, "a 64-bit integer")?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(number(text, "a whole number below 2^32")?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(number(text, "a whole number below 2^64")?),
        Kind::Bool => match text {
            "true" | "1" | "" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(format!("{text:?} is not true or false")),
        },
        Kind::String => Value::String(text.to_string()),
        Kind::Bytes => return Err("bytes cannot be given in the query".to_string()),
        Kind::Enum(enumeration) => match enumeration.get_value_by_name(text) {
            Some(value) => Value::EnumNumber(value.number()),
            None => return Err(format!("{text:?} is not one of {}", enum_names(enumeration).join(", "))),
        },
        Kind::Message(_) => return Err("a message cannot be given in the query".to_string()),
    })
}

fn enum_names(enumeration: &prost_reflect::EnumDescriptor) -> Vec<String> {
    enumeration.values().map(|v| v.name().to_string()).collect()
}

/// The query parameters of message `name` as OpenAPI parameter objects: one
/// per field a query can set ([`from_query`]), under its proto name, with
/// its schema and comment; `except` leaves out fields the path gives.
///
/// # Panics
///
/// If `name` is not a message of the API.
pub fn query_parameters(name: &str, except: &[&str]) -> Vec<Value> {
    let message = descriptor_pool().get_message_by_name(name).unwrap_or_else(|| panic!("no message {name}"));
    let file = message.parent_file();
    let mut todo = Vec::new();
    message
        .fields()
        .filter(|f| !f.is_map() && !matches!(f.kind(), Kind::Message(_)) && !except.contains(&f.name()))
        .map(|field| {
            let mut parameter =
                json!({ "name": field.name(), "in": "query", "schema": field_schema(&field, &mut todo) });
            if field.is_list() {
                parameter["style"] = "form".into();
                parameter["explode"] = true.into();
            }
            if let Some(text) = comment(file.file_descriptor_proto(), field.path()) {
                parameter["description"] = text.into();
            }
            parameter
        })
        .collect()
}

/// The comment above a message, enum, service or method of the API, by
/// its full name (`asyncore.v1.Listener`, `asyncore.v1.Listeners.StartListener`).
pub fn description(full_name: &str) -> Option<String> {
    let pool = descriptor_pool();
    if let Some(message) = pool.get_message_by_name(full_name) {
        return comment(message.parent_file().file_descriptor_proto(), message.path());
    }
    if let Some(enumeration) = pool.get_enum_by_name(full_name) {
        return comment(enumeration.parent_file().file_descriptor_proto(), enumeration.path());
    }
    if let Some(service) = pool.get_service_by_name(full_name) {
        return comment(service.parent_file().file_descriptor_proto(), service.path());
    }
    let (service, method) = full_name.rsplit_once('.')?;
    let method = pool.get_service_by_name(service)?.methods().find(|m| m.name() == method)?;
    comment(method.parent_file().file_descriptor_proto(), method.path())
}

/// The leading comment of the element at `path`, on one line per paragraph.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let location = file.source_code_info.as_ref()?.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?.trim();
    let paragraphs: Vec<String> = text
        .split("\n\n")
        .map(|p| p.lines().map(str::trim).collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect();
    (!paragraphs.is_empty()).then(|| paragraphs.join("\n\n"))
}

/// The JSON Schemas (OpenAPI 3.0 dialect) of the messages named, and of
/// every message they contain, keyed by full name (`asyncore.v1.Listener`);
/// a field that holds a message refers to it as
/// `#/components/schemas/NAME`. Messages reached from `responses` list as
/// `required` the fields a reply always carries (those without presence);
/// request messages require nothing, as every field has a default.
///
/// # Panics
///
/// If a name is not a message of the API.
pub fn schemas(responses: &[&str], requests: &[&str]) -> Map<String, Value> {
    let pool = descriptor_pool();
    let mut reached_from_requests = BTreeSet::new();
    let mut out = Map::new();
    for (roots, is_request) in [(requests, true), (responses, false)] {
        let mut todo: Vec<MessageDescriptor> = roots
            .iter()
            .map(|name| pool.get_message_by_name(name).unwrap_or_else(|| panic!("no message {name}")))
            .collect();
        let mut seen = BTreeSet::new();
        while let Some(message) = todo.pop() {
            if !seen.insert(message.full_name().to_string()) {
                continue;
            }
            if is_request {
                reached_from_requests.insert(message.full_name().to_string());
            }
            let required = !is_request && !reached_from_requests.contains(message.full_name());
            out.insert(message.full_name().to_string(), message_schema(&message, required, &mut todo));
        }
    }
    out
}

fn message_schema(message: &MessageDescriptor, required: bool, todo: &mut Vec<MessageDescriptor>) -> Value {
    let file = message.parent_file();
    let mut properties = Map::new();
    let mut required_fields = Vec::new();
    for field in message.fields() {
        let mut schema = field_schema(&field, todo);
        if let (Some(text), Value::Object(schema)) = (comment(file.file_descriptor_proto(), field.path()), &mut schema)
        {
            // OpenAPI 3.0 ignores siblings of `$ref`: wrap it to keep the
            // description.
            if let Some(reference) = schema.remove("$ref") {
                schema.insert("allOf".into(), json!([{ "$ref": reference }]));
            }
            schema.insert("description".into(), Value::String(text));
        }
        if required && !field.supports_presence() {
            required_fields.push(Value::String(field.json_name().to_string()));
        }
        properties.insert(field.json_name().to_string(), schema);
    }
    let mut schema = Map::new();
    schema.insert("type".into(), "object".into());
    if let Some(text) = comment(file.file_descriptor_proto(), message.path()) {
        schema.insert("description".into(), Value::String(text));
    }
    schema.insert("properties".into(), Value::Object(properties));
    if !required_fields.is_empty() {
        schema.insert("required".into(), Value::Array(required_fields));
    }
    Value::Object(schema)
}

fn field_schema(field: &FieldDescriptor, todo: &mut Vec<MessageDescriptor>) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else { unreachable!("a map field is a message of entries") };
        return json!({ "type": "object", "additionalProperties": kind_schema(&entry.map_entry_value_field().kind(), todo) });
    }
    let schema = kind_schema(&field.kind(), todo);
    if field.is_list() { json!({ "type": "array", "items": schema }) } else { schema }
}

/// One value of a kind, as the proto3 JSON mapping writes it.
fn kind_schema(kind: &Kind, todo: &mut Vec<MessageDescriptor>) -> Value {
    match kind {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({ "type": "integer", "format": "int32" }),
        Kind::Uint32 | Kind::Fixed32 => json!({ "type": "integer", "format": "int64", "minimum": 0 }),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => json!({ "type": "string", "format": "int64" }),
        Kind::Uint64 | Kind::Fixed64 => json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" }),
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Enum(enumeration) => {
            json!({ "type": "string", "enum": enum_names(enumeration) })
        }
        Kind::Message(message) => match message.full_name() {
            "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
            "google.protobuf.Duration" => json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$" }),
            "google.protobuf.Empty" => json!({ "type": "object" }),
            name => {
                todo.push(message.clone());
                json!({ "$ref": format!("#/components/schemas/{name}") })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    #[test]
    fn messages_map_to_canonical_json_with_every_field() {
        let listener = v1::Listener {
            id: 7,
            address: "127.0.0.1:7007".into(),
            plugin: "echo".into(),
            state: v1::ListenerState::Listening as i32,
            created_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            ..Default::default()
        };
        let json = to_json(&listener);
        assert_eq!(json["id"], "7");
        assert_eq!(json["state"], "LISTENER_STATE_LISTENING");
        assert_eq!(json["channelCount"], "0");
        assert_eq!(json["config"], json!({}));
        assert_eq!(json["createdAt"], "2023-11-14T22:13:20Z");
        let page = to_json(&v1::ListChannelsResponse::default());
        assert_eq!(page, json!({ "channels": [], "nextPageToken": "" }));
    }

    #[test]
    fn requests_parse_in_either_spelling_and_refuse_unknown_fields() {
        let request: v1::StopListenerRequest = from_json(br#"{"id": "3", "closeChannels": true}"#).unwrap();
        assert_eq!(request, v1::StopListenerRequest { id: 3, close_channels: true, drain_timeout_ms: None });
        let request: v1::StopListenerRequest = from_json(br#"{"id": 3, "close_channels": true}"#).unwrap();
        assert!(request.close_channels);
        let error = from_json::<v1::StopListenerRequest>(br#"{"closeChanels": true}"#).unwrap_err();
        assert!(error.to_string().contains("closeChanels"), "{error}");
        assert!(from_json::<v1::StopListenerRequest>(b"{} trailing").is_err());
    }

    #[test]
    fn queries_set_scalar_and_repeated_fields() {
        let pairs =
            |list: &[(&str, &str)]| list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let request: v1::WatchStatsRequest = from_query(&pairs(&[
            ("interval_ms", "250"),
            ("listenerId", "4"),
            ("channel_ids", "1,2"),
            ("channel_ids", "3"),
        ]))
        .unwrap();
        assert_eq!(
            request,
            v1::WatchStatsRequest {
                interval_ms: 250,
                listener_id: Some(4),
                channel_ids: vec![1, 2, 3],
                changed_only: false
            }
        );
        let request: v1::StopListenerRequest = from_query(&pairs(&[("close_channels", "true")])).unwrap();
        assert!(request.close_channels);
        let error = from_query::<v1::ListChannelsRequest>(&pairs(&[("page_size", "ten")])).unwrap_err().to_string();
        assert_eq!(error, "query parameter page_size: \"ten\" is not a whole number below 2^32");
        let error = from_query::<v1::ListChannelsRequest>(&pairs(&[("limit", "1")])).unwrap_err().to_string();
        assert!(error.contains("\"limit\"") && error.contains("page_size"), "{error}");
        assert!(from_query::<v1::ListChannelsRequest>(&pairs(&[("page_size", "1"), ("pageSize", "2")])).is_err());
    }

    #[test]
    fn schemas_follow_the_mapping_and_carry_the_comments() {
        let schemas = schemas(&["asyncore.v1.ListListenersResponse"], &["asyncore.v1.StartListenerRequest"]);
        let listener = &schemas["asyncore.v1.Listener"];
        assert_eq!(listener["properties"]["id"]["type"], "string");
        assert_eq!(listener["properties"]["createdAt"]["format"], "date-time");
        assert_eq!(listener["properties"]["config"]["additionalProperties"]["type"], "string");
        assert!(listener["required"].as_array().unwrap().contains(&json!("channelCount")));
        let address = listener["properties"]["address"]["description"].as_str().unwrap();
        assert!(address.contains("actually bound"), "{address}");
        assert!(schemas["asyncore.v1.StartListenerRequest"].get("required").is_none());
        assert!(description("asyncore.v1.Listeners.StartListener").unwrap().contains("Binds"));
    }
}
