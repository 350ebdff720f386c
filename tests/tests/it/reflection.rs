//! What grpcurl needs with no .proto at hand: server reflection (v1 and
//! v1alpha) listing and describing the API, and the standard health service.

use asyncore_tests::{InProcessDaemon, within};
use tokio_stream::StreamExt;
use tonic_reflection::pb::{v1, v1alpha};

use crate::runtime;

#[test]
fn reflection_lists_and_describes_the_api_and_health_serves() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let client = daemon.client().await;

        // v1, as grpcurl speaks first: `grpcurl -plaintext ADDR list`.
        let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(client.channel.clone());
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut answers = v1_client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let answer = within("a reflection answer", answers.next()).await.unwrap().unwrap();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = answer.message_response
        else {
            panic!("unexpected answer {answer:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in [
            "asyncore.v1.Listeners",
            "asyncore.v1.Channels",
            "asyncore.v1.Plugins",
            "asyncore.v1.Daemon",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
        }

        // `grpcurl describe`: the file of a symbol, with its imports
        // resolvable (google/protobuf/timestamp.proto).
        for symbol in ["asyncore.v1.Channels", "google.protobuf.Timestamp"] {
            let request = v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    symbol.to_string(),
                )),
            };
            let mut answers =
                v1_client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
            let answer = within("a reflection answer", answers.next()).await.unwrap().unwrap();
            match answer.message_response {
                Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) => {
                    assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
                }
                other => panic!("{symbol}: {other:?}"),
            }
        }

        // v1alpha, for evans and older clients.
        let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(client.channel.clone());
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut answers = alpha.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let answer = within("a reflection answer", answers.next()).await.unwrap().unwrap();
        assert!(
            matches!(
                answer.message_response,
                Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(ref l))
                    if l.service.iter().any(|s| s.name == "asyncore.v1.Listeners")
            ),
            "{answer:?}"
        );

        // grpc.health.v1.Health
        let mut health = tonic_health::pb::health_client::HealthClient::new(client.channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: "asyncore.v1.Listeners".to_string() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    });
}
