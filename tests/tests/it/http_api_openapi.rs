//! `GET /v1/openapi.json` against the daemon's real answers: every
//! operation the document lists is called and answers 200, and its body
//! (for the SSE stream, an event's data) fits the documented schema: the
//! required fields are there, no field is undocumented, and each value has
//! its documented type, recursively. An operation added to the document or
//! to this test alone fails it.

use std::collections::BTreeSet;

use asyncore_tests::{InProcessDaemon, connect};
use serde_json::{Value, json};

use crate::{
    http_api::{Events, Http},
    runtime,
};

/// Checks `value` against an OpenAPI 3.0 schema (the subset the document
/// uses); `at` names the place for the failure message.
#[track_caller]
fn validate(value: &Value, schema: &Value, schemas: &Value, at: &str) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.strip_prefix("#/components/schemas/").expect("a local reference");
        assert!(schemas.get(name).is_some(), "{at}: {name} is not defined");
        return validate(value, &schemas[name], schemas, at);
    }
    for part in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        validate(value, part, schemas, at);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let object = value.as_object().unwrap_or_else(|| panic!("{at}: not an object: {value}"));
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                    let required = required.as_str().unwrap();
                    assert!(object.contains_key(required), "{at}: documented field {required} is missing from {value}");
                }
                for (name, field) in object {
                    let documented =
                        properties.get(name).unwrap_or_else(|| panic!("{at}: field {name} is not documented"));
                    validate(field, documented, schemas, &format!("{at}.{name}"));
                }
            }
            if let Some(additional) = schema.get("additionalProperties") {
                for (name, field) in object {
                    validate(field, additional, schemas, &format!("{at}.{name}"));
                }
            }
        }
        Some("array") => {
            let items = value.as_array().unwrap_or_else(|| panic!("{at}: not an array: {value}"));
            for (i, item) in items.iter().enumerate() {
                validate(item, &schema["items"], schemas, &format!("{at}[{i}]"));
            }
        }
        Some("string") => {
            let text = value.as_str().unwrap_or_else(|| panic!("{at}: not a string: {value}"));
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
                assert!(allowed.contains(value), "{at}: {text} is not one of {allowed:?}");
            }
            if schema.get("pattern").and_then(Value::as_str) == Some("^[0-9]+$") {
                assert!(!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()), "{at}: {text} is not a number");
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time") {
                assert!(text.len() >= 20 && text.ends_with('Z') && text.as_bytes()[10] == b'T', "{at}: {text}");
            }
        }
        Some("integer") => assert!(value.is_i64() || value.is_u64(), "{at}: not an integer: {value}"),
        Some("number") => assert!(value.is_number(), "{at}: not a number: {value}"),
        Some("boolean") => assert!(value.is_boolean(), "{at}: not a boolean: {value}"),
        Some(other) => panic!("{at}: the test knows no type {other}"),
        None => {}
    }
}

#[test]
fn every_documented_operation_answers_as_documented() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let document = http.get("/v1/openapi.json").await.ok();
        assert_eq!(document["openapi"], "3.0.3");
        let schemas = &document["components"]["schemas"];
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }

        let mut client = daemon.client().await;
        let library = std::fs::read_dir(daemon.dir().join("plugins")).unwrap().next().unwrap().unwrap().path();
        let (listener, address) = client.start_listener("echo", &[]).await;
        let mut peer = connect(address);
        std::io::Write::write_all(&mut peer, b"ping").unwrap();
        let channel = client.channel_by_peer(listener, peer.local_addr().unwrap()).await.id;

        // Every operation, in an order that keeps what the later ones need.
        let calls: Vec<(&str, &str, String, Option<Value>)> = vec![
            ("get", "/v1/listeners", "/v1/listeners".into(), None),
            (
                "post",
                "/v1/listeners",
                "/v1/listeners".into(),
                Some(json!({ "address": "127.0.0.1:0", "plugin": "echo" })),
            ),
            ("get", "/v1/listeners/{id}", format!("/v1/listeners/{listener}"), None),
            ("post", "/v1/listeners:setLimits", "/v1/listeners:setLimits".into(), Some(json!({}))),
            ("post", "/v1/listeners/{id}:suspend", format!("/v1/listeners/{listener}:suspend"), Some(json!({}))),
            ("post", "/v1/listeners/{id}:resume", format!("/v1/listeners/{listener}:resume"), Some(json!({}))),
            (
                "post",
                "/v1/listeners/{id}:setLimits",
                format!("/v1/listeners/{listener}:setLimits"),
                Some(json!({ "maxConnections": "100" })),
            ),
            // The listener the POST above started: it has no channels, so
            // the drain answers at once.
            (
                "post",
                "/v1/listeners/{id}:drain",
                format!("/v1/listeners/{}:drain", listener + 1),
                Some(json!({ "drainTimeoutMs": "1000" })),
            ),
            ("get", "/v1/channels", "/v1/channels".into(), None),
            ("get", "/v1/channels/{id}", format!("/v1/channels/{channel}"), None),
            ("get", "/v1/stats/watch", "/v1/stats/watch?interval_ms=20".into(), None),
            ("delete", "/v1/channels/{id}", format!("/v1/channels/{channel}"), None),
            ("get", "/v1/plugins", "/v1/plugins".into(), None),
            ("post", "/v1/plugins", "/v1/plugins".into(), Some(json!({ "path": library.display().to_string() }))),
            ("get", "/v1/plugins/{name}", "/v1/plugins/echo".into(), None),
            (
                "post",
                "/v1/plugins/{name}:activate",
                "/v1/plugins/echo:activate".into(),
                Some(json!({ "generation": 2 })),
            ),
            ("post", "/v1/plugins/{name}:reload", "/v1/plugins/echo:reload".into(), Some(json!({}))),
            ("post", "/v1/plugins/{name}:unload", "/v1/plugins/echo:unload".into(), Some(json!({ "generation": 2 }))),
            ("delete", "/v1/plugins/{name}", "/v1/plugins/echo?generation=1&force=true".into(), None),
            ("delete", "/v1/listeners/{id}", format!("/v1/listeners/{listener}?close_channels=true"), None),
            ("get", "/v1/daemon", "/v1/daemon".into(), None),
            ("get", "/v1/daemon/loop-stats", "/v1/daemon/loop-stats".into(), None),
            ("post", "/v1/config:reload", "/v1/config:reload".into(), Some(json!({}))),
            ("get", "/healthz", "/healthz".into(), None),
            ("get", "/readyz", "/readyz".into(), None),
            ("get", "/metrics", "/metrics".into(), None),
            ("get", "/v1/openapi.json", "/v1/openapi.json".into(), None),
        ];
        let exercised: BTreeSet<(String, String)> =
            calls.iter().map(|(method, template, _, _)| (method.to_string(), template.to_string())).collect();
        assert_eq!(documented, exercised, "the document's operations and the test's");

        for (method, template, path, body) in calls {
            let at = format!("{} {path}", method.to_uppercase());
            let ok = &document["paths"][template][method]["responses"]["200"];
            let content = ok["content"].as_object().unwrap_or_else(|| panic!("{at}: no content documented"));
            let (content_type, media) = content.iter().next().unwrap();
            match content_type.as_str() {
                "text/event-stream" => {
                    let response = http.send(&method.to_uppercase(), &path, None).await;
                    assert_eq!(response.status().as_u16(), 200, "{at}");
                    let event = Events::new(response).next().await.expect("an event");
                    let data: Value = serde_json::from_str(&event.data).unwrap();
                    validate(&data, &ok["x-event-data"], schemas, &at);
                }
                "application/json" => {
                    let answer = http.call(&method.to_uppercase(), &path, body.map(|b| b.to_string())).await;
                    validate(&answer.ok(), &media["schema"], schemas, &at);
                }
                "text/plain" => {
                    let answer = http.call(&method.to_uppercase(), &path, None).await;
                    assert_eq!(answer.status, 200, "{at}");
                    assert!(answer.content_type.starts_with("text/plain"), "{at}: {}", answer.content_type);
                    let text = answer.text();
                    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
                }
                other => panic!("{at}: the test knows no content type {other}"),
            }
        }

        // Errors are documented with one schema, and fit it.
        let error = http.get("/v1/listeners/999").await;
        assert_eq!(error.status, 404);
        let documented_error = &document["paths"]["/v1/listeners/{id}"]["get"]["responses"]["default"];
        validate(&error.json(), &documented_error["content"]["application/json"]["schema"], schemas, "an error");
    });
}
